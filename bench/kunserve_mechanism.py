"""`llmesh bench kunserve_mechanism --json`: KunServe's parameter dropping on real
worker processes: KV capacity before and after a drop, drop and restore latency,
pipeline throughput, and activation latency while KV is exchanged.

Model: a seeded Llama checkpoint written once to the temp dir (8 layers, hidden 512,
8 heads of 64, MLP 1376, vocab 258, float32: 102 MB of weights, the embedding and
head 1% of them) and a worker memory limit (--memory-capacity-bytes) of weights /
0.55: weights are 55% of each worker's memory, as for a 7B model (13.5 GB in bf16) on
a 24 GB GPU. 32 KiB of KV per token, so each worker alone holds about 2,500 tokens.

One run, on a mesh of 4 workers (bench/_kunserve_mesh.py), for g = 2 and g = 4,
--rounds rounds each (medians count; each round drops and restores once):
  capacity   the members' pools alone (load reports) vs the group's pool (DropGroup
             reply), in tokens, next to the formula (g - w) / (g (1 - w));
  drop       DropGroup while 2 requests per member decode (their KV is exchanged):
             drop_ms is stage 0's, from the order to the new capacity being usable;
             decode_step_ms from those requests' streams just before;
  pipeline   one batch served by the g members unpipelined, then by the group: tokens/s
             of both (the ratio: median of the rounds'), the tokens checked identical
             (and equal to one local engine's, as those of every other request);
  restore    RestoreGroup while requests run in the group: restore_ms, stage 0's.
Then, in this process and a child (bench/_kunserve_activations.py): activation
one-way p99 between two stages idle vs during a real KVExchange to the same peer
(target <= 3x; median of 3 runs of each), and the exchange's throughput.

Every process it starts is stopped by PID, on failure too. The last stdout line is
one JSON object (--json is accepted; the line is always printed).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from bench._checkpoint import llama_config, write_checkpoint
from bench._cpu import available_cores
from bench._kunserve_figures import ACTIVATION_TARGET, group_figures, summarize, target_ratio

MODEL_SHAPE = {
    "num_layers": 8,
    "hidden_size": 512,
    "num_heads": 8,
    "num_kv_heads": 8,
    "head_dim": 64,
    "intermediate_size": 1376,
    "max_position_embeddings": 4096,
}
BLOCK_SIZE = 16  # the workers' default
NUM_WORKERS = 4
MAX_NUM_SEQS = 16  # per worker: a group of g cuts it into micro-batches of 16 / g


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="llmesh bench kunserve_mechanism", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--json", action="store_true", help="(the JSON line is always last)")
    parser.add_argument(
        "--weight-share", type=float, default=0.55, help="weights / worker memory (default 0.55)"
    )
    parser.add_argument("--stages", default="2,4", help="group sizes, comma-separated")
    parser.add_argument("--batch", type=int, default=16, help="requests in the throughput batch")
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=64, help="new tokens per request")
    parser.add_argument(
        "--rounds", type=int, default=3, help="rounds per g (medians count; default 3)"
    )
    parser.add_argument("--activations", type=int, default=300, help="latency samples per run")
    parser.add_argument(
        "--interval-s",
        type=float,
        default=0.004,
        help="between two micro-batches (activations), seconds",
    )
    parser.add_argument("--log-dir", default=None, help="where the mesh logs (default: temp)")
    args = parser.parse_args(argv)
    args.stages = [int(g) for g in args.stages.split(",")]
    if any(MODEL_SHAPE["num_layers"] % g or not 2 <= g <= NUM_WORKERS for g in args.stages):
        parser.error(f"--stages must divide {MODEL_SHAPE['num_layers']} and be 2..{NUM_WORKERS}")
    if not 0 < args.weight_share < 1:
        parser.error(f"--weight-share must be in (0, 1), got {args.weight_share}")
    for name in ("batch", "prompt_len", "max_tokens", "rounds", "activations"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be > 0")
    return args


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def main(argv: list[str]) -> int:
    args = _parse(argv)
    progress = _progress(args.json)
    from services.common.logging import setup_logging

    setup_logging("bench-kunserve", level="WARNING")
    started = time.monotonic()
    load_at_start = [round(x, 2) for x in os.getloadavg()]
    config = llama_config(**MODEL_SHAPE)
    model_dir = write_checkpoint(
        Path(tempfile.gettempdir()) / "llmesh-bench-kunserve-model", config
    )
    weight_nbytes = config.num_params() * 4  # float32: the engine's real tensor sizes
    memory_nbytes = round(weight_nbytes / args.weight_share)
    weight_share = weight_nbytes / memory_nbytes
    progress(
        f"model {model_dir}: {config.num_layers} layers, {weight_nbytes / 1e6:.1f} MB of weights; "
        f"worker memory {memory_nbytes} bytes (--memory-capacity-bytes): weights {weight_share:.1%}"
    )
    rounds = _run_mesh(args, model_dir, memory_nbytes, progress)
    from bench._kunserve_activations import ActivationBench, ActivationOptions

    options = ActivationOptions(num_samples=args.activations, interval_s=args.interval_s)
    activation = asyncio.run(ActivationBench(config, BLOCK_SIZE, options).run(progress))
    summary = summarize(
        weight_share,
        {g: runs[0].capacity for g, runs in rounds.items()},
        {g: group_figures([r.figures() for r in runs]) for g, runs in rounds.items()},
        activation,
        _extra(args, rounds, activation, weight_nbytes, memory_nbytes, load_at_start, started),
    )
    _print_table(summary)
    print(json.dumps(summary))
    return 0


def _progress(to_stderr: bool):
    def progress(line: str) -> None:
        print(line, file=sys.stderr if to_stderr else sys.stdout, flush=True)

    return progress


def _run_mesh(args, model_dir: Path, memory_nbytes: int, progress) -> dict:
    import torch

    from bench._kunserve_mesh import MeshBench
    from bench._kunserve_workload import make_workloads, reference_tokens
    from services.common.procs import LocalMesh

    workloads = make_workloads(args.stages, args.batch, args.prompt_len, args.max_tokens)
    num_requests = sum(map(len, workloads.values()))
    progress(f"reference tokens of {num_requests} requests on a local engine")
    torch.set_num_threads(available_cores())
    expected = reference_tokens(model_dir, workloads)
    torch.set_num_threads(1)
    mesh = LocalMesh(
        log_dir=Path(args.log_dir or tempfile.mkdtemp(prefix="llmesh-bench-kunserve-")),
        num_workers=NUM_WORKERS,
        model=str(model_dir),
        worker_args=(
            "--torch-threads", "1", "--memory-capacity-bytes", str(memory_nbytes),
            "--max-num-seqs", str(MAX_NUM_SEQS), "--log-level", "WARNING",
        ),
        scheduler_args=("--migration-policy", "none", "--group-policy", "none"),
        gateway_args=("--log-level", "WARNING"),
    )  # fmt: skip
    progress(f"starting {NUM_WORKERS} worker processes (logs in {mesh.log_dir})")
    mesh.start()
    try:
        bench = MeshBench(mesh, workloads, expected, BLOCK_SIZE, progress)
        return asyncio.run(bench.run(args.stages, args.rounds))
    finally:
        mesh.stop()
        alive = [p.name for p in mesh.processes() if p.is_alive()]
        if alive:
            for p in mesh.processes():
                p.kill()
            raise RuntimeError(f"processes still alive after the mesh stopped: {alive}")


PIPELINE_BOUND = (
    "CPU: the g member processes (one torch thread each), the gateway, the scheduler and "
    "this client share {cores} cores, and both runs keep them busy (machine_busy_share in "
    "pipeline_cpu). Both do the same FLOPs, so with g >= cores the pipeline cannot gain from "
    "overlapping stages as g accelerators would: the ratio weighs its overheads on shared "
    "cores (activation transfers, micro-batch bookkeeping, bubbles) against each stage's "
    "smaller working set (1/g of the weights), and moves with other load on the host (see "
    "pipeline_vs_unpipelined_samples)"
)


def _extra(args, rounds, activation, weight_nbytes, memory_nbytes, load_at_start, started):
    def per_g(fn) -> dict:
        return {str(g): [fn(r) for r in runs] for g, runs in sorted(rounds.items())}

    return {
        "model": {**MODEL_SHAPE, "vocab_size": 258, "dtype": "float32"},
        "weight_nbytes": weight_nbytes,
        "memory_capacity_bytes": memory_nbytes,
        # Every member frees all but its share: together (g - 1) x the weights.
        "weight_share_from_drop": per_g(
            lambda r: round(r.freed_weight_bytes / (r.num_stages - 1) / memory_nbytes, 4)
        ),
        "block_size": BLOCK_SIZE,
        "capacity_same_every_round": {
            str(g): len({r.capacity for r in runs}) == 1 for g, runs in sorted(rounds.items())
        },
        "num_group_blocks_in_load_report": per_g(lambda r: r.num_group_blocks_reported),
        "layer_ranges": {str(g): runs[0].layer_ranges for g, runs in sorted(rounds.items())},
        "drop_rpc_ms": per_g(lambda r: round(r.drop_rpc_ms, 3)),
        "restore_rpc_ms": per_g(lambda r: round(r.restore_rpc_ms, 3)),
        "decode_step_ms_samples": per_g(lambda r: round(r.decode_step_ms, 3)),
        "num_running_at_drop": per_g(lambda r: r.num_running_at_drop),
        "drop_stall_ms_max": per_g(lambda r: round(r.drop_stall_ms, 3)),
        "restore_stall_ms_max": per_g(lambda r: round(r.restore_stall_ms, 3)),
        "restore_moved_preempted": per_g(lambda r: [r.num_moved, r.num_preempted]),
        "pipeline_cpu": per_g(lambda r: r.cpu),
        "pipeline_bound": PIPELINE_BOUND.format(cores=available_cores()),
        "batch": {
            "requests": args.batch,
            "prompt_len": args.prompt_len,
            "max_tokens": args.max_tokens,
            "max_num_seqs": MAX_NUM_SEQS,
        },  # fmt: skip
        "num_rounds": args.rounds,
        "activation_p50_idle_ms": round(activation["p50_idle_ms"], 3),
        "activation_p50_exchange_ms": round(activation["p50_exchange_ms"], 3),
        "activation_bytes": activation["activation_bytes"],
        "activation_interval_ms": activation["interval_ms"],
        "num_activation_samples": activation["num_samples"],
        "num_activation_runs": activation["num_pairs"],
        "activation_p99_idle_ms_samples": _rounded(activation["p99_idle_ms_samples"]),
        "activation_p99_exchange_ms_samples": _rounded(activation["p99_exchange_ms_samples"]),
        "exchange_mib_per_round": activation["exchange_mib_per_round"],
        "exchange_num_rounds": activation["exchange_num_rounds"],
        "exchange_num_pauses": activation["exchange_num_pauses"],
        "host": {
            "cpu": cpu_model(),
            "cores": available_cores(),
            "load_avg_at_start": load_at_start,
            "load_avg_at_end": [round(x, 2) for x in os.getloadavg()],
        },
        "elapsed_s": round(time.monotonic() - started, 1),
    }


def _rounded(values: list[float]) -> list[float]:
    return [round(v, 3) for v in values]


def _print_table(summary: dict) -> None:
    w = summary["weight_share"]
    print(
        f"KunServe mechanism: weights {w:.1%} of {summary['memory_capacity_bytes']} bytes "
        f"per worker (--memory-capacity-bytes), block {summary['block_size']} tokens"
    )
    print(
        f"{'g':>2} {'tokens before':>13} {'after':>7} {'ratio':>6} {'target':>6} {'<=5%':>5} "
        f"{'drop ms':>8} {'restore ms':>10} {'step ms':>8} {'pipe/unpipe':>11} {'tok/s u':>8} "
        f"{'tok/s p':>8} {'exact':>5}"
    )
    stages = sorted(int(g) for g in summary["capacity_tokens_before"])
    for g in stages:
        k = str(g)
        print(
            f"{g:>2} {summary['capacity_tokens_before'][k]:>13} "
            f"{summary['capacity_tokens_after'][k]:>7} {summary['capacity_ratio'][k]:>6.3f} "
            f"{target_ratio(g, w):>6.3f} {str(summary['capacity_within_5pct'][k]):>5} "
            f"{summary['drop_ms'][k]:>8.1f} {summary['restore_ms'][k]:>10.1f} "
            f"{summary['decode_step_ms'][k]:>8.1f} {summary['pipeline_vs_unpipelined'][k]:>11.3f} "
            f"{summary['unpipelined_tokens_per_s'][k]:>8.1f} "
            f"{summary['pipelined_tokens_per_s'][k]:>8.1f} "
            f"{str(summary['tokens_identical'][k]):>5}"
        )
    print(f"pipeline bound: {summary['pipeline_bound']}")
    for g in stages:
        rounds = summary["pipeline_cpu"][str(g)]
        for mode in ("unpipelined", "pipelined"):
            busy = [r[mode].get("machine_busy_share") for r in rounds]
            cpu_s = [r[mode].get("members_cpu_s") for r in rounds]
            print(f"  g={g} {mode:>11}: machine busy share {busy}, members' CPU s {cpu_s}")
    ratio = summary["activation_exchange_over_idle"]
    verdict = "meets" if summary["activation_within_3x"] else "MISSES"
    print(
        f"activation one-way ({summary['activation_bytes']} B every "
        f"{summary['activation_interval_ms']} ms): p99 idle {summary['activation_p99_idle_ms']:.3f} ms, "
        f"during the KV exchange {summary['activation_p99_exchange_ms']:.3f} ms = {ratio}x idle "
        f"({verdict} the {ACTIVATION_TARGET:.0f}x target); exchange {summary['exchange_gbps']:.2f} GB/s, "
        f"{summary['exchange_num_pauses']} pauses"
    )
    print(
        f"  p99 per run (median counts): idle {summary['activation_p99_idle_ms_samples']}, "
        f"during the exchange {summary['activation_p99_exchange_ms_samples']}"
    )
    host = summary["host"]
    print(
        f"host: {host['cpu']}, {host['cores']} cores, load average {host['load_avg_at_start']} -> "
        f"{host['load_avg_at_end']}; {summary['elapsed_s']} s"
    )
