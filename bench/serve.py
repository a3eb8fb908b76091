"""`llmesh bench serve`: one engine in-process vs the same engine served by the mesh.

Same workload both ways, in one run: N requests (P-token prompts, M new tokens each,
greedy, no EOS stop; defaults 128 x 128 -> 128, like `bench engine`), C of them in
flight at any time (closed loop: a new request starts when one finishes).

    direct   an LLMEngine in this process, stepped in a loop (no RPC at all)
    mesh     scheduler + gateway + 1 worker as separate processes on loopback; C client
             streams through the gateway (dispatch, Submit, output push, chunk stream)

Throughput = output tokens / wall time from the first request to the last token. The
ratio mesh/direct is the serving overhead (target >= 0.8 at 64 streams). Both runs
use the same torch thread count (--threads) and must produce identical tokens.

The mesh is started once; then direct and mesh runs alternate for --rounds rounds and
the best round of each counts, so load from other processes on the machine hits both
alike. Then the mesh with tracing and metrics on vs off (bench/_observability.py). The
last stdout line is JSON with `direct_tokens_per_s`, `mesh_tokens_per_s`, `ratio` and
`observability_overhead_pct` (target < 5).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="llmesh bench serve", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--json", action="store_true", help="(the JSON line is always printed last)"
    )
    parser.add_argument("--concurrency", type=int, default=64, help="streams in flight")
    parser.add_argument("--requests", type=int, default=128, help="requests in total")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--model", default="tiny")
    parser.add_argument(
        "--rounds", type=int, default=2, help="alternating rounds; the best of each counts"
    )
    parser.add_argument(
        "--max-num-seqs", type=int, default=64, help="engine running-batch limit (both runs)"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads of the engine (both runs; 1 leaves a core for the gateway and clients)",
    )
    parser.add_argument(
        "--log-dir", default=None, help="where the mesh processes log (default: a temp dir)"
    )
    args = parser.parse_args(argv)
    for name in (
        "concurrency",
        "requests",
        "prompt_len",
        "max_tokens",
        "max_num_seqs",
        "threads",
        "rounds",
    ):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
    return args


def _workload(args) -> list[list[int]]:
    return [[(31 * i + 7 * j) % 256 for j in range(args.prompt_len)] for i in range(args.requests)]


def make_engine(args):
    import torch

    from services.common.config import load_config
    from services.worker.engine import EngineConfig, LLMEngine, SamplingParams

    torch.set_num_threads(args.threads)
    overrides = {"model": args.model, "max_num_seqs": args.max_num_seqs}
    engine = LLMEngine.from_config(load_config(EngineConfig, "ENGINE", overrides))
    engine.generate([[1, 2, 3]], SamplingParams(max_tokens=2))  # warm-up
    return engine


def run_direct(engine, args, prompts: list[list[int]]) -> tuple[float, list[list[int]]]:
    """Closed loop on an in-process engine; returns (seconds, tokens per request)."""
    from services.worker.engine import SamplingParams

    params = SamplingParams(max_tokens=args.max_tokens, ignore_eos=True)
    tokens: dict[str, list[int]] = {}
    next_index = 0
    run_id = time.monotonic_ns()

    def admit() -> None:
        nonlocal next_index
        request_id = f"{run_id}-{next_index}"
        engine.add_request(request_id, prompts[next_index], params)
        tokens[request_id] = []
        next_index += 1

    start = time.perf_counter()
    while next_index < min(args.concurrency, len(prompts)):
        admit()
    while engine.has_unfinished_requests():
        for output in engine.step():
            tokens[output.request_id] += output.new_token_ids
            if output.finished and next_index < len(prompts):
                admit()
    elapsed = time.perf_counter() - start
    return elapsed, [tokens[f"{run_id}-{i}"] for i in range(len(prompts))]


async def _mesh_clients(address: str, args, prompts) -> tuple[float, list[list[int]]]:
    from gateway.client import AsyncClient

    results: list[list[int]] = [[] for _ in prompts]
    async with AsyncClient(address, timeout_s=600) as client:
        await client.generate(
            prompt_token_ids=prompts[0], max_tokens=args.max_tokens, ignore_eos=True
        )
        queue: asyncio.Queue[int] = asyncio.Queue()
        for i in range(len(prompts)):
            queue.put_nowait(i)

        async def stream_worker() -> None:
            while not queue.empty():
                i = queue.get_nowait()
                async for chunk in client.generate_stream(
                    prompt_token_ids=prompts[i], max_tokens=args.max_tokens, ignore_eos=True
                ):
                    results[i].extend(chunk.token_ids)

        start = time.perf_counter()
        await asyncio.gather(*(stream_worker() for _ in range(min(args.concurrency, len(prompts)))))
        elapsed = time.perf_counter() - start
    return elapsed, results


def start_mesh(args, env: dict[str, str] | None = None):
    """The mesh; without `env` (the observability comparison's "on" mesh sets its
    OTLP endpoint) tracing is not exported and /metrics is off."""
    from bench._observability import TELEMETRY_OFF
    from services.common.procs import LocalMesh

    log_dir = Path(args.log_dir or tempfile.mkdtemp(prefix="llmesh-bench-serve-"))
    mesh = LocalMesh(
        log_dir=log_dir,
        num_workers=1,
        model=args.model,
        worker_args=(
            "--max-num-seqs",
            str(args.max_num_seqs),
            "--torch-threads",
            str(args.threads),
        ),
        gateway_args=("--log-level", "WARNING"),
        scheduler_args=("--log-level", "WARNING"),
        env={"LLMESH_WORKER_LOG_LEVEL": "WARNING", **(env or TELEMETRY_OFF)},
    )
    return mesh.start()


def main(argv: list[str] | None = None) -> int:
    args = _parse(sys.argv[1:] if argv is None else argv)
    prompts = _workload(args)
    num_tokens = args.requests * args.max_tokens
    print(
        f"workload: {args.requests} requests, {args.prompt_len}-token prompts, {args.max_tokens} new tokens, "
        f"{args.concurrency} in flight, model {args.model}, {args.threads} torch thread(s)",
        flush=True,
    )
    mesh = start_mesh(args)
    try:
        engine = make_engine(args)
        direct_runs, mesh_runs = [], []
        for round_index in range(args.rounds):
            direct_s, direct_tokens = run_direct(engine, args, prompts)
            direct_runs.append(direct_s)
            mesh_s, mesh_tokens = asyncio.run(_mesh_clients(mesh.gateway_address, args, prompts))
            mesh_runs.append(mesh_s)
            print(
                f"round {round_index + 1}: direct {num_tokens / direct_s:8.1f} tokens/s   "
                f"mesh {num_tokens / mesh_s:8.1f} tokens/s",
                flush=True,
            )
            if direct_tokens != mesh_tokens:
                print("MISMATCH: the mesh produced different tokens than the engine", flush=True)
                is_identical = False
                break
        else:
            is_identical = True
        observability = _observability(args, prompts, mesh, direct_tokens) if is_identical else {}
    finally:
        mesh.stop()
    direct_tps, mesh_tps = num_tokens / min(direct_runs), num_tokens / min(mesh_runs)
    print(f"best:    direct {direct_tps:8.1f} tokens/s   mesh {mesh_tps:8.1f} tokens/s", flush=True)
    print(f"ratio   {mesh_tps / direct_tps:.3f}   identical tokens: {is_identical}", flush=True)
    print(
        json.dumps(
            {
                "direct_tokens_per_s": round(direct_tps, 1),
                "mesh_tokens_per_s": round(mesh_tps, 1),
                "ratio": round(mesh_tps / direct_tps, 3),
                "concurrency": args.concurrency,
                "requests": args.requests,
                "prompt_len": args.prompt_len,
                "max_tokens": args.max_tokens,
                "model": args.model,
                "threads": args.threads,
                "rounds": len(direct_runs),
                "identical_tokens": is_identical,
                **observability,
            }
        )
    )
    return 0 if is_identical else 1


def _observability(args, prompts, mesh, expected) -> dict:
    """Tracing and metrics on vs off (bench/_observability.py)."""
    from bench._observability import measure

    return measure(
        lambda env: start_mesh(args, env),
        lambda address: asyncio.run(_mesh_clients(address, args, prompts)),
        mesh.gateway_address,
        max(args.rounds, 3),  # a few-percent difference needs more than two rounds
        args.requests * args.max_tokens,
        expected,
    )


if __name__ == "__main__":
    sys.exit(main())
