"""`llmesh bench serve`: one engine in-process vs the same engine served by the mesh,
through its gRPC API and through its OpenAI-compatible HTTP API.

Same workload every way, in one run: N requests (P-token prompts, M new tokens each,
greedy, no EOS stop; defaults 128 x 128 -> 128, like `bench engine`), C of them in
flight at any time (closed loop: a new request starts when one finishes).

    direct   an LLMEngine in this process, stepped in a loop (no RPC at all)
    mesh     scheduler + gateway + 1 worker as separate processes on loopback; C client
             streams through the gateway's gRPC API (dispatch, Submit, output push,
             chunk stream)
    http     the same mesh, C streaming POST /v1/completions (server-sent events)

Throughput = output tokens / wall time from the first request to the last token. The
ratio mesh/direct is the serving overhead (target >= 0.8 at 64 streams); http/grpc
is the HTTP face's cost over gRPC (target >= 0.8). All runs use the same torch thread
count (--threads) and must produce identical tokens. TTFT/TPOT percentiles of the two
mesh clients are reported as `vllm bench serve` does (bench/_serve_clients.py).

The mesh is started once; then the runs alternate for --rounds rounds and the best
round of each counts, so load from other processes on the machine hits all alike. Then
the mesh with tracing and metrics on vs off (bench/_observability.py). The last stdout
line is JSON with `direct_tokens_per_s`, `mesh_tokens_per_s`, `ratio`,
`grpc_tokens_per_s` (= mesh), `http_tokens_per_s`, `http_vs_grpc`,
`http_p99_ttft_ms`, `http_p99_tpot_ms`, the other percentiles and
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

from bench._serve_clients import grpc_clients, http_clients, latency_summary


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


def _best(runs):
    return min(runs, key=lambda run: run.elapsed_s)


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
        direct_runs, grpc_runs, http_runs = [], [], []
        is_identical = True
        for round_index in range(args.rounds):
            direct_s, direct_tokens = run_direct(engine, args, prompts)
            direct_runs.append(direct_s)
            grpc_runs.append(asyncio.run(grpc_clients(mesh.gateway_address, args, prompts)))
            http_runs.append(asyncio.run(http_clients(mesh.gateway_http_address, args, prompts)))
            print(
                f"round {round_index + 1}: direct {num_tokens / direct_s:8.1f} tokens/s   "
                f"mesh (gRPC) {num_tokens / grpc_runs[-1].elapsed_s:8.1f} tokens/s   "
                f"mesh (HTTP) {num_tokens / http_runs[-1].elapsed_s:8.1f} tokens/s",
                flush=True,
            )
            for name, run in (("gRPC", grpc_runs[-1]), ("HTTP", http_runs[-1])):
                if run.tokens != direct_tokens:
                    print(f"MISMATCH: the mesh ({name}) produced different tokens than the engine")
                    is_identical = False
            if not is_identical:
                break
        observability = _observability(args, prompts, mesh, direct_tokens) if is_identical else {}
    finally:
        mesh.stop()
    direct_tps = num_tokens / min(direct_runs)
    grpc, http = _best(grpc_runs), _best(http_runs)
    grpc_tps, http_tps = num_tokens / grpc.elapsed_s, num_tokens / http.elapsed_s
    latencies = {**latency_summary("grpc", grpc.timings), **latency_summary("http", http.timings)}
    _print_table(direct_tps, grpc_tps, http_tps, latencies, is_identical)
    print(
        json.dumps(
            {
                "direct_tokens_per_s": round(direct_tps, 1),
                "mesh_tokens_per_s": round(grpc_tps, 1),
                "ratio": round(grpc_tps / direct_tps, 3),
                "grpc_tokens_per_s": round(grpc_tps, 1),
                "http_tokens_per_s": round(http_tps, 1),
                "http_vs_grpc": round(http_tps / grpc_tps, 3),
                **latencies,
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


def _print_table(direct_tps, grpc_tps, http_tps, latencies, is_identical) -> None:
    print(f"best:    direct {direct_tps:8.1f}   mesh (gRPC) {grpc_tps:8.1f}   mesh (HTTP) {http_tps:8.1f} tokens/s")  # fmt: skip
    print(f"ratio mesh/direct {grpc_tps / direct_tps:.3f}   http/grpc {http_tps / grpc_tps:.3f}   identical tokens: {is_identical}")  # fmt: skip
    print(f"{'':18}{'mean':>10}{'median':>10}{'p99':>10}")
    for client in ("grpc", "http"):
        for metric in ("ttft", "tpot"):
            values = [
                latencies[f"{client}_{stat}_{metric}_ms"] for stat in ("mean", "median", "p99")
            ]
            print(
                f"{client.upper() + ' ' + metric.upper() + ' (ms)':18}"
                + "".join(f"{v:10.2f}" for v in values)
            )
    sys.stdout.flush()


def _timed_tokens(run) -> tuple[float, list[list[int]]]:
    """A gRPC client run as the observability comparison takes it: (seconds, tokens)."""
    return run.elapsed_s, run.tokens


def _observability(args, prompts, mesh, expected) -> dict:
    """Tracing and metrics on vs off (bench/_observability.py)."""
    from bench._observability import measure

    return measure(
        lambda env: start_mesh(args, env),
        lambda address: _timed_tokens(asyncio.run(grpc_clients(address, args, prompts))),
        mesh.gateway_address,
        max(args.rounds, 3),  # a few-percent difference needs more than two rounds
        args.requests * args.max_tokens,
        expected,
    )


if __name__ == "__main__":
    sys.exit(main())
