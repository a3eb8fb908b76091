"""`llmesh bench engine`: llmesh's engine vs Hugging Face transformers' generate().

Same tiny Llama weights (the embedded `tiny` model loaded into LlamaForCausalLM),
same workload (N requests, P-token prompts, M new tokens each, greedy, no EOS stop),
same threads, measured in one run and interleaved (llmesh, HF, llmesh, HF, ...)
so that load from other processes hits both alike; the best round of each counts.

Decode throughput = (N * (M - 1)) tokens / (total time - prefill time): for llmesh the
steps after the last prompt is fully computed, for HF its generate() time minus a
max_new_tokens=1 generate() on the same batch. The last stdout line is JSON:
llmesh_tokens_per_s, transformers_tokens_per_s (decode) and ratio, plus end-to-end
figures and whether both produced identical tokens.
"""

from __future__ import annotations

import argparse
import json
import random
import time


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="llmesh bench engine", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "--json", action="store_true", help="(the JSON line is always printed last)"
    )
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds; the best counts")
    parser.add_argument("--threads", type=int, default=2)
    return parser.parse_args(argv)


def _run_llmesh(engine, prompts, max_tokens):
    from services.worker.engine import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    for i, prompt in enumerate(prompts):
        engine.add_request(f"b{i}", prompt, params)
    tokens: dict[str, list[int]] = {f"b{i}": [] for i in range(len(prompts))}
    start = time.perf_counter()
    decode_start = None
    while engine.has_unfinished_requests():
        for out in engine.step():
            tokens[out.request_id] += out.new_token_ids
        if decode_start is None and all(len(t) >= 1 for t in tokens.values()):
            decode_start = time.perf_counter()  # every prompt computed, first tokens out
    end = time.perf_counter()
    return end - start, end - decode_start, [tokens[f"b{i}"] for i in range(len(prompts))]


def _run_hf(model, input_ids, max_tokens):
    import torch

    kwargs = dict(
        attention_mask=torch.ones_like(input_ids),
        do_sample=False,
        pad_token_id=0,
        eos_token_id=None,
    )
    with torch.inference_mode():
        start = time.perf_counter()
        model.generate(input_ids, max_new_tokens=1, **kwargs)
        prefill = time.perf_counter() - start
        start = time.perf_counter()
        out = model.generate(input_ids, max_new_tokens=max_tokens, **kwargs)
        total = time.perf_counter() - start
    return total, total - prefill, out[:, input_ids.shape[1] :].tolist()


def main(argv: list[str]) -> int:
    args = _parse(argv)
    import torch

    torch.set_num_threads(args.threads)
    try:
        import transformers
    except ImportError:
        print("llmesh bench engine: needs transformers (pip install llmesh[bench])")
        return 2
    from services.worker.engine import EngineConfig, LLMEngine
    from services.worker.engine.tiny import TINY_MODEL_CONFIG
    from services.worker.engine.weights import to_hf_tensors

    transformers.logging.set_verbosity_error()
    n, p, m = args.requests, args.prompt_len, args.max_tokens
    print(
        f"workload: {n} requests x {p}-token prompts, {m} new tokens each, greedy; torch threads={args.threads}"
    )
    engine = LLMEngine(EngineConfig(max_num_seqs=max(n, 1), max_num_batched_tokens=max(512, p)))
    hf_model = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(**TINY_MODEL_CONFIG.to_hf_dict())
    ).eval()
    hf_model.load_state_dict(to_hf_tensors(TINY_MODEL_CONFIG, engine.model.weights), strict=False)
    rng = random.Random(0)
    prompts = [[rng.randrange(1, 256) for _ in range(p)] for _ in range(n)]
    input_ids = torch.tensor(prompts)

    print("warm-up ...")
    _run_llmesh(engine, prompts[:2], 4)
    _run_hf(hf_model, input_ids[:2], 4)

    best = {"llmesh": (float("inf"), float("inf")), "transformers": (float("inf"), float("inf"))}
    outputs = {}
    for round_no in range(1, args.rounds + 1):
        total, decode, outputs["llmesh"] = _run_llmesh(engine, prompts, m)
        print(f"round {round_no}: llmesh        total {total:7.2f} s   decode {decode:7.2f} s")
        best["llmesh"] = min(best["llmesh"], (total, decode), key=lambda t: t[1])
        total, decode, outputs["transformers"] = _run_hf(hf_model, input_ids, m)
        print(f"round {round_no}: transformers  total {total:7.2f} s   decode {decode:7.2f} s")
        best["transformers"] = min(best["transformers"], (total, decode), key=lambda t: t[1])

    decode_tokens, total_tokens = n * (m - 1), n * m
    result = {
        "llmesh_tokens_per_s": round(decode_tokens / best["llmesh"][1], 1),
        "transformers_tokens_per_s": round(decode_tokens / best["transformers"][1], 1),
        "llmesh_e2e_tokens_per_s": round(total_tokens / best["llmesh"][0], 1),
        "transformers_e2e_tokens_per_s": round(total_tokens / best["transformers"][0], 1),
        "tokens_match": outputs["llmesh"] == outputs["transformers"],
        "requests": n,
        "prompt_len": p,
        "max_tokens": m,
        "threads": args.threads,
    }
    result["ratio"] = round(result["llmesh_tokens_per_s"] / result["transformers_tokens_per_s"], 2)
    print()
    print(f"{'':14} {'decode tok/s':>14} {'end-to-end tok/s':>18}")
    print(
        f"{'llmesh':14} {result['llmesh_tokens_per_s']:>14.1f} {result['llmesh_e2e_tokens_per_s']:>18.1f}"
    )
    print(
        f"{'transformers':14} {result['transformers_tokens_per_s']:>14.1f} {result['transformers_e2e_tokens_per_s']:>18.1f}"
    )
    print(f"ratio (decode): {result['ratio']:.2f}x   identical tokens: {result['tokens_match']}")
    print(json.dumps(result))
    return 0
