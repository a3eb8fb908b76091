"""`llmesh generate`: generate tokens through the gateway, or with --local in-process.

    ./llmesh generate "Hello"                      stream text from the gateway
    ./llmesh generate --prompt-ids 1,2,3 --json    one JSON object at the end
    ./llmesh generate --prompts-file FILE [--local]

Input lines: {"prompt_ids": [...]} or {"prompt": "text"}, plus optional max_tokens,
temperature, top_p, top_k, seed, stop_token_ids, ignore_eos. Output (--json): one
object per request, in input order: {"index", "token_ids", "text", "finish_reason"}
(or {"index", "error"} for a request the engine refused).

`--local` runs the engine in this process (generate_local); the mode that goes
through the gateway (run_gateway) reuses read_requests and format_result around the
gateway client SDK.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.common.config import flag_type

HELP = "generate tokens for a prompt through the gateway (--local: engine in this process)"

PARAM_FIELDS = (
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "seed",
    "stop_token_ids",
    "ignore_eos",
)


@dataclass
class GenerateRequest:
    index: int  # line number among the non-empty input lines, from 0
    prompt: str | None  # text to tokenize, or
    prompt_ids: list[int] | None  # token ids as given
    params: dict[str, Any]  # SamplingParams fields from the line


def add_arguments(parser) -> None:
    parser.add_argument("--local", action="store_true", help="run the engine in this process")
    parser.add_argument(
        "--model", default="tiny", help="'tiny' (embedded) or a local HF checkpoint directory"
    )
    parser.add_argument(
        "prompt", nargs="?", default=None, help="text prompt (or use --prompt-ids / --prompts-file)"
    )
    parser.add_argument(
        "--prompt-ids", default=None, help="comma-separated prompt token ids, e.g. 1,2,3"
    )
    parser.add_argument("--prompts-file", default=None, help="JSONL file of prompts ('-' = stdin)")
    parser.add_argument(
        "--gateway",
        default=None,
        help="gateway host:port (default $LLMESH_GATEWAY_ADDRESS or 127.0.0.1:50051)",
    )
    parser.add_argument(
        "--api-key", default=None, help="the gateway's API key (default $LLMESH_API_KEY)"
    )
    parser.add_argument(
        "--ca",
        default=None,
        help="PEM CA of a TLS gateway (default $LLMESH_GATEWAY_CA; none = plaintext)",
    )
    parser.add_argument("--temperature", type=float, default=None, help="0 = greedy (default)")
    parser.add_argument("--top-p", dest="top_p", type=float, default=None)
    parser.add_argument("--top-k", dest="top_k", type=int, default=None)
    parser.add_argument(
        "--seed", type=int, default=None, help="sampling seed (default: chosen and reported)"
    )
    parser.add_argument("--ignore-eos", dest="ignore_eos", action="store_true", default=None)
    parser.add_argument(
        "--timeout", type=float, default=120.0, help="deadline of the whole generation (s)"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object per request")
    parser.add_argument(
        "--max-tokens", type=int, default=16, help="default max_tokens for lines without one"
    )
    parser.add_argument("--block-size", type=int, default=16, help="KV block size in tokens")
    parser.add_argument(
        "--memory-capacity-bytes",
        type=flag_type(int, "memory_capacity_bytes", "--memory-capacity-bytes"),
        default=None,
        help="weights + KV memory: bytes, or 256MiB, 2GiB",
    )
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")


def read_requests(lines: Iterable[str], default_max_tokens: int = 16) -> list[GenerateRequest]:
    """Parses JSONL lines; raises ValueError naming the line for malformed input."""
    requests = []
    for line_no, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"line {line_no}: not JSON ({exc.msg})") from None
        if not isinstance(obj, dict):
            raise ValueError(f"line {line_no}: expected a JSON object")
        has_text, has_ids = "prompt" in obj, "prompt_ids" in obj
        if has_text == has_ids:
            raise ValueError(f"line {line_no}: give exactly one of 'prompt' and 'prompt_ids'")
        if has_text and not isinstance(obj["prompt"], str):
            raise ValueError(f"line {line_no}: 'prompt' must be a string")
        if has_ids and not isinstance(obj["prompt_ids"], list):
            raise ValueError(f"line {line_no}: 'prompt_ids' must be a list of ints")
        unknown = set(obj) - {"prompt", "prompt_ids", *PARAM_FIELDS}
        if unknown:
            raise ValueError(f"line {line_no}: unknown fields {sorted(unknown)}")
        params = {k: obj[k] for k in PARAM_FIELDS if k in obj}
        params.setdefault("max_tokens", default_max_tokens)
        requests.append(
            GenerateRequest(len(requests), obj.get("prompt"), obj.get("prompt_ids"), params)
        )
    return requests


def format_result(
    index: int, token_ids: list[int], text: str, finish_reason: str | None
) -> dict[str, Any]:
    return {"index": index, "token_ids": token_ids, "text": text, "finish_reason": finish_reason}


def generate_local(requests: list[GenerateRequest], engine_config) -> list[dict[str, Any]]:
    """Runs every request on an in-process LLMEngine; results in request order."""
    from services.worker.engine import EngineInputError, LLMEngine, SamplingParams

    engine = LLMEngine.from_config(engine_config)
    results: dict[int, dict[str, Any]] = {}
    tokens: dict[str, list[int]] = {}
    for request in requests:
        request_id = str(request.index)
        try:
            prompt_ids = (
                request.prompt_ids
                if request.prompt is None
                else engine.tokenizer.encode(request.prompt)
            )
            params = dict(request.params)
            if "stop_token_ids" in params and isinstance(params["stop_token_ids"], list):
                params["stop_token_ids"] = tuple(params["stop_token_ids"])
            engine.add_request(request_id, prompt_ids, SamplingParams(**params))
        except (EngineInputError, TypeError) as exc:
            results[request.index] = {
                "index": request.index,
                "error": f"{type(exc).__name__}: {exc}",
            }
            continue
        tokens[request_id] = []
    while engine.has_unfinished_requests():
        for out in engine.step():
            tokens[out.request_id] += out.new_token_ids
            if out.finished:
                index = int(out.request_id)
                ids = tokens[out.request_id]
                results[index] = format_result(
                    index, ids, engine.tokenizer.decode(ids), out.finish_reason
                )
    return [results[r.index] for r in requests]


def run(args) -> int:
    if not args.local:
        return run_gateway(args)
    from services.common.config import load_config
    from services.worker.engine import EngineConfig

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    try:
        requests = requests_from_args(args)
        config_fields = {"model": args.model, "block_size": args.block_size, "dtype": args.dtype}
        if args.memory_capacity_bytes is not None:
            config_fields["memory_capacity_bytes"] = args.memory_capacity_bytes
        results = generate_local(requests, load_config(EngineConfig, "ENGINE", config_fields))
    except (OSError, ValueError) as exc:
        print(f"llmesh generate: {exc}", file=sys.stderr)
        return 2
    for result in results:
        if args.json:
            print(json.dumps(result))
        elif "error" in result:
            print(f"[{result['index']}] error: {result['error']}")
        else:
            print(f"[{result['index']}] ({result['finish_reason']}) {result['text']!r}")
    return 1 if any("error" in r for r in results) else 0


# ---- through the gateway -------------------------------------------------------------


def requests_from_args(args) -> list[GenerateRequest]:
    """The prompt argument, --prompt-ids, or --prompts-file (exactly one), with the
    sampling flags applied to every request that does not set them itself."""
    sources = [args.prompt is not None, args.prompt_ids is not None, args.prompts_file is not None]
    if sum(sources) != 1:
        raise ValueError("give exactly one of: a prompt, --prompt-ids, --prompts-file")
    if args.prompts_file is not None:
        if args.prompts_file == "-":
            requests = read_requests(sys.stdin, args.max_tokens)
        else:
            with open(args.prompts_file, encoding="utf-8") as f:
                requests = read_requests(f, args.max_tokens)
    elif args.prompt_ids is not None:
        try:
            ids = [int(t) for t in args.prompt_ids.split(",") if t.strip()]
        except ValueError:
            raise ValueError(
                f"--prompt-ids={args.prompt_ids!r} must be comma-separated ints"
            ) from None
        requests = [GenerateRequest(0, None, ids, {"max_tokens": args.max_tokens})]
    else:
        requests = [GenerateRequest(0, args.prompt, None, {"max_tokens": args.max_tokens})]
    flags = {
        k: getattr(args, k, None) for k in ("temperature", "top_p", "top_k", "seed", "ignore_eos")
    }
    for request in requests:
        for key, value in flags.items():
            if value is not None:
                request.params.setdefault(key, value)
    return requests


def run_gateway(args) -> int:
    """Stream each request from the gateway; text as it comes, or JSON at the end."""
    from gateway.client import Client, GatewayError
    from services.cli.status import default_addresses

    defaults = default_addresses()
    address = args.gateway or defaults.gateway_address
    try:
        requests = requests_from_args(args)
        ca_path = args.ca or defaults.gateway_ca
        root_certificates = Path(ca_path).read_bytes() if ca_path else None
    except (OSError, ValueError) as exc:
        print(f"llmesh generate: {exc}", file=sys.stderr)
        return 2
    is_streaming_text = not args.json and len(requests) == 1
    num_failed = 0
    api_key = args.api_key or defaults.api_key or None
    with Client(
        address, timeout_s=args.timeout, api_key=api_key, root_certificates=root_certificates
    ) as client:
        try:
            client.model_info(timeout_s=3.0)
        except GatewayError as exc:
            if exc.code.name == "UNAUTHENTICATED":
                print(f"llmesh generate: {exc.details}; pass --api-key", file=sys.stderr)
                return 2
            print(
                f"llmesh generate: cannot reach the gateway at {address} ({exc.code.name}); "
                "start the mesh with ./llmesh up, or pass --gateway / --local",
                file=sys.stderr,
            )
            return 2
        for request in requests:
            params = dict(request.params)
            token_ids: list[int] = []
            text: list[str] = []
            finish_reason, seed, request_id = None, None, ""
            try:
                for chunk in client.generate_stream(
                    request.prompt, prompt_token_ids=request.prompt_ids, detokenize=True, **params
                ):
                    token_ids.extend(chunk.token_ids)
                    text.append(chunk.text)
                    finish_reason, request_id = chunk.finish_reason, chunk.request_id
                    seed = chunk.seed if chunk.seed is not None else seed
                    if is_streaming_text:
                        print(chunk.text, end="", flush=True)
            except GatewayError as exc:
                num_failed += 1
                hint = (
                    " (is the mesh up? start it with ./llmesh up)"
                    if exc.code.name == "UNAVAILABLE"
                    else ""
                )
                if args.json:
                    print(
                        json.dumps(
                            {"index": request.index, "error": f"{exc.code.name}: {exc.details}"}
                        )
                    )
                else:
                    print(f"llmesh generate: {exc.code.name}: {exc.details}{hint}", file=sys.stderr)
                continue
            result = format_result(request.index, token_ids, "".join(text), finish_reason)
            result.update(request_id=request_id, seed=seed)
            if args.json:
                print(json.dumps(result))
            elif is_streaming_text:
                print(f"\n[{finish_reason}, {len(token_ids)} tokens, seed {seed}]")
            else:
                print(f"[{request.index}] ({finish_reason}) {result['text']!r}")
    return 1 if num_failed else 0
