"""`llmesh bench engine`: llmesh's engine vs Hugging Face transformers' generate().

Same tiny Llama weights (the embedded `tiny` model loaded into LlamaForCausalLM), same
torch threads, greedy decoding with no EOS stop, two workloads of N requests:

  uniform  every prompt P tokens, every request M new tokens (the issue's example);
  mixed    prompt and output lengths drawn uniformly around P and M (same means), as
           a server sees them. generate() left-pads the batch and decodes every row
           until the longest request is done; the engine batches continuously.

Runs are interleaved (llmesh, HF, llmesh, HF, ...) so load from other processes hits
both alike, and the best round of each counts. Decode throughput = requested tokens
after each request's first / the time from the moment every request has its first
token (llmesh: that step; HF: the streamer's first put of new tokens) to the end. The last stdout line is JSON:
llmesh_tokens_per_s, transformers_tokens_per_s and ratio (uniform workload), the same
for the mixed workload (mixed_*), end-to-end figures, and whether the tokens matched.
"""

from __future__ import annotations

import argparse
import json
import os
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
    parser.add_argument("--prompt-len", type=int, default=128, help="prompt tokens (mean, mixed)")
    parser.add_argument("--max-tokens", type=int, default=128, help="new tokens (mean, mixed)")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds; the best counts")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--budget-s", type=float, default=150.0, help="skip further rounds once this is spent"
    )
    return parser.parse_args(argv)


def _workloads(n: int, p: int, m: int) -> dict[str, tuple[list[list[int]], list[int]]]:
    rng = random.Random(0)
    uniform = ([[rng.randrange(1, 256) for _ in range(p)] for _ in range(n)], [m] * n)
    lo_p, lo_m = max(1, p // 8), max(2, m // 8)
    mixed = (
        [[rng.randrange(1, 256) for _ in range(rng.randint(lo_p, 2 * p - lo_p))] for _ in range(n)],
        [rng.randint(lo_m, 2 * m - lo_m) for _ in range(n)],
    )
    return {"uniform": uniform, "mixed": mixed}


def _run_llmesh(engine, prompts: list[list[int]], max_tokens: list[int]):
    from services.worker.engine import SamplingParams

    for i, (prompt, m) in enumerate(zip(prompts, max_tokens, strict=True)):
        engine.add_request(f"b{i}", prompt, SamplingParams(max_tokens=m, ignore_eos=True))
    tokens: dict[str, list[int]] = {f"b{i}": [] for i in range(len(prompts))}
    start = time.perf_counter()
    decode_start = None
    while engine.has_unfinished_requests():
        for out in engine.step():
            tokens[out.request_id] += out.new_token_ids
        if decode_start is None and all(tokens.values()):
            decode_start = time.perf_counter()  # every prompt computed, first tokens out
    end = time.perf_counter()
    return end - start, end - decode_start, [tokens[f"b{i}"] for i in range(len(prompts))]


class _FirstTokenClock:
    """A generate() streamer that notes when the first new tokens come out."""

    def __init__(self) -> None:
        self.num_puts = 0
        self.first_token_time: float | None = None

    def put(self, value) -> None:
        self.num_puts += 1  # the first put is the prompt, the second the first tokens
        if self.num_puts == 2:
            self.first_token_time = time.perf_counter()

    def end(self) -> None:
        pass


def _run_hf(model, prompts: list[list[int]], max_tokens: list[int]):
    import torch

    width = max(len(p) for p in prompts)  # left padding, as batched generate() needs
    input_ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    clock = _FirstTokenClock()
    with torch.inference_mode():
        start = time.perf_counter()
        out = model.generate(
            input_ids,
            attention_mask=mask,
            max_new_tokens=max(max_tokens),
            do_sample=False,
            pad_token_id=0,
            eos_token_id=None,
            streamer=clock,
        )
        end = time.perf_counter()
    rows = out[:, width:].tolist()
    return (
        end - start,
        end - clock.first_token_time,
        [row[:m] for row, m in zip(rows, max_tokens, strict=True)],
    )


def main(argv: list[str]) -> int:
    args = _parse(argv)
    import torch

    torch.set_num_threads(args.threads)
    try:
        import transformers
    except ImportError:
        print("llmesh bench engine: needs transformers (pip install llmesh[bench])")
        return 2
    from services.common.config import load_config
    from services.worker.engine import EngineConfig, LLMEngine
    from services.worker.engine.tiny import TINY_MODEL_CONFIG
    from services.worker.engine.weights import to_hf_tensors

    transformers.logging.set_verbosity_error()
    n, p, m = args.requests, args.prompt_len, args.max_tokens
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    if load > cores:
        # With several threads per op, a core taken by another process stalls every op.
        print(
            f"warning: load {load:.1f} on {cores} cores; timings are unreliable (try --threads 1)"
        )
    print(
        f"{n} requests, prompts ~{p} tokens, ~{m} new tokens each, greedy; torch threads={args.threads}"
    )
    overrides = {"max_num_seqs": max(n, 1), "max_num_batched_tokens": max(512, 2 * p)}
    engine = LLMEngine.from_config(load_config(EngineConfig, "ENGINE", overrides))
    hf_model = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(**TINY_MODEL_CONFIG.to_hf_dict())
    ).eval()
    hf_model.load_state_dict(to_hf_tensors(TINY_MODEL_CONFIG, engine.model.weights), strict=False)
    print("warm-up ...")
    _run_llmesh(engine, [[1] * 8] * 2, [4, 4])
    _run_hf(hf_model, [[1] * 8] * 2, [4, 4])

    result: dict[str, object] = {}
    started = time.perf_counter()
    workloads = _workloads(n, p, m)
    for index, (name, (prompts, max_tokens)) in enumerate(workloads.items()):
        best = {
            "llmesh": (float("inf"), float("inf")),
            "transformers": (float("inf"), float("inf")),
        }
        outputs = {}
        for round_no in range(1, args.rounds + 1):
            if round_no > 1 and time.perf_counter() - started > args.budget_s * (index + 1) / len(
                workloads
            ):
                print(f"{name:8} round {round_no}: skipped (time budget)")
                break
            for system, run in (("llmesh", _run_llmesh), ("transformers", _run_hf)):
                target = engine if system == "llmesh" else hf_model
                total, decode, outputs[system] = run(target, prompts, max_tokens)
                print(
                    f"{name:8} round {round_no}: {system:13} total {total:6.2f} s   decode {decode:6.2f} s"
                )
                best[system] = min(best[system], (total, decode), key=lambda t: t[1])
        decode_tokens, total_tokens = sum(max_tokens) - n, sum(max_tokens)
        prefix = "" if name == "uniform" else f"{name}_"
        llmesh, hf = decode_tokens / best["llmesh"][1], decode_tokens / best["transformers"][1]
        result.update(
            {
                f"{prefix}llmesh_tokens_per_s": round(llmesh, 1),
                f"{prefix}transformers_tokens_per_s": round(hf, 1),
                f"{prefix}ratio": round(llmesh / hf, 2),
                f"{prefix}llmesh_e2e_tokens_per_s": round(total_tokens / best["llmesh"][0], 1),
                f"{prefix}transformers_e2e_tokens_per_s": round(
                    total_tokens / best["transformers"][0], 1
                ),
                f"{prefix}tokens_match": outputs["llmesh"] == outputs["transformers"],
            }
        )
    result.update({"requests": n, "prompt_len": p, "max_tokens": m, "threads": args.threads})

    print()
    print(
        f"{'workload':9} {'system':13} {'decode tok/s':>13} {'end-to-end tok/s':>17} {'ratio':>6}  same tokens"
    )
    for name, prefix in (("uniform", ""), ("mixed", "mixed_")):
        for system in ("llmesh", "transformers"):
            ratio = f"{result[prefix + 'ratio']:.2f}x" if system == "llmesh" else ""
            same = str(result[prefix + "tokens_match"]) if system == "llmesh" else ""
            print(
                f"{name:9} {system:13} {result[f'{prefix}{system}_tokens_per_s']:>13.1f} "
                f"{result[f'{prefix}{system}_e2e_tokens_per_s']:>17.1f} {ratio:>6}  {same}"
            )
    print(json.dumps(result))
    return 0
