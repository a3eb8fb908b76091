"""`./llmesh bench migration --json`: live-migration downtime vs blocking copy vs recompute.

Two real engines (each on its own thread, one torch thread each) exchange KV over a
real UCX transport in this process. The model has a realistic KV size per token for its
layer count (8 layers x 8 KV heads x 64 dims, fp32: 32 KiB/token). For each context
length a request is prefilled on instance a, decodes beside 3 background requests, and
is moved a -> b by each method (moved back live, unmeasured, between methods).

Downtime is the time the request makes no progress. For live and blocking-copy
migration that is the source coordinator's measure: from suspending the request (right
after the step that produced its last token there) until the destination has adopted
it (the destination's next step runs it). A recompute migration's request is adopted
without KV and re-prefills first, so its downtime is taken from the token stream: the
gap between its last token on the source and its first on the destination, minus one
decode step on the destination (the step it would have spent anyway). That stream
figure is reported for live migration too (`live_stream_gap_ms`): it carries a whole
destination step's jitter (+-15% of a 200 ms step at 8192 tokens on the CI machine),
so it bounds rather than measures a 20 ms stall. Live migration is repeated
--live-repeats times per length (there and back) and the median counts. Last line:
one JSON object.

`--hosts netns` runs the cross-process measurement twice: on one host (UCX through
shared memory / CMA) and across two network-namespace hosts started from the compose
files (UCX over TCP on a veth link shaped to 10 Gb/s; root only); the JSON is then
{"same_host": ..., "netns": ...}, each the one-host summary's fields.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench._checkpoint import llama_config, write_checkpoint
from bench._migration_figures import median_sample, move_figures, resident_since
from kvtransport import Backend, TransportConfig, make_transport
from services.common.config import load_config
from services.common.logging import setup_logging
from services.worker.async_engine import AsyncEngine
from services.worker.engine import EngineConfig, LLMEngine, SamplingParams
from services.worker.migration import (
    MigrationConfig,
    MigrationDestination,
    MigrationMode,
    MigrationSource,
    MigrationStatus,
    MigrationTarget,
    RequestHandoff,
)
from services.worker.migration.local import LocalDestinationClient

DEFAULT_LENGTHS = (256, 1024, 2048, 4096, 8192)
NUM_BACKGROUND = 3


class Node:
    """One engine + transport + both migration roles; records when each token appeared."""

    def __init__(self, name: str, model_dir: Path, max_len: int, log: dict[str, list]) -> None:
        self.name = name
        self.log = log  # request id -> [(time, node name)] per output token
        overrides = {
            "model": str(model_dir),
            "memory_capacity_bytes": 2 * 1024**3,
            "max_model_len": max_len,
            "max_num_batched_tokens": 1024,
        }
        config = load_config(EngineConfig, "ENGINE", overrides)
        self.engine = LLMEngine.from_config(config)
        self.async_engine = AsyncEngine(self.engine, self._on_step, snapshot_interval_s=0.5)
        self.transport = make_transport(TransportConfig(backend=Backend.UCX))
        self.finished: set[str] = set()

    def _on_step(self, outputs, snapshot) -> None:
        now = time.perf_counter()
        for out in outputs:
            self.log.setdefault(out.request_id, []).extend(
                [(now, self.name)] * len(out.new_token_ids)
            )
            if out.finished:
                self.finished.add(out.request_id)

    async def start(self, peers: dict[str, Node]) -> None:
        await self.transport.start()
        self.async_engine.start()
        config = MigrationConfig(transfer_timeout_s=120, lease_s=60.0, rpc_timeout_s=120)
        self.destination = MigrationDestination(self.async_engine, self.transport, config)
        self.destination.start()
        self.source = MigrationSource(
            self.name,
            self.async_engine,
            self.transport,
            config,
            client_for=lambda target: LocalDestinationClient(peers[target.instance_id].destination),
            handoff_for=lambda request_id, state: RequestHandoff(state, owner_address="bench"),
        )

    def target(self) -> MigrationTarget:
        return MigrationTarget(self.name, "", self.transport.address)

    async def stop(self) -> None:
        await self.destination.close()
        await self.async_engine.stop()
        await self.transport.close()


async def wait_tokens(log, request_id: str, count: int, timeout: float = 600) -> None:
    deadline = time.perf_counter() + timeout
    while len(log.get(request_id, ())) < count:
        if time.perf_counter() > deadline:
            raise TimeoutError(f"{request_id} did not reach {count} tokens")
        await asyncio.sleep(0.005)


async def move(a: Node, b: Node, log, request_id: str, mode: MigrationMode) -> dict:
    """Move request_id a -> b by mode; the stream-visible downtime and the slowdown of a's
    other requests while it ran."""
    start_index = len(log[request_id])
    since = resident_since(log[request_id], a.name)
    t0 = time.perf_counter()
    result = await a.source.migrate(request_id, b.target(), mode)
    if result.status != MigrationStatus.COMMITTED:
        raise RuntimeError(f"{mode} migration failed: {result}")
    await wait_tokens(log, request_id, len(log[request_id]) + 8)
    background = [log[f"bg{i}"] for i in range(NUM_BACKGROUND)]
    figures = move_figures(
        log[request_id], background, start_index, since, t0, a.name, b.name, mode, result
    )
    return {**figures, "duration_ms": result.duration_ms}


def bench_model(lengths: list[int]) -> tuple[Path, int]:
    max_len = max(lengths) + 4096
    model_dir = write_checkpoint(
        Path(tempfile.gettempdir()) / f"llmesh-bench-migration-model-{max_len}",
        llama_config(
            num_layers=8,
            hidden_size=256,
            num_heads=8,
            num_kv_heads=8,
            head_dim=64,
            intermediate_size=512,
            max_position_embeddings=max_len,
        ),
    )
    return model_dir, max_len


async def run(lengths: list[int], progress, live_repeats: int = 5) -> dict:
    torch.set_num_threads(1)  # one core per engine thread on a 2-core machine
    model_dir, max_len = bench_model(lengths)
    log: dict[str, list] = {}
    a, b = Node("a", model_dir, max_len, log), Node("b", model_dir, max_len, log)
    peers = {"a": a, "b": b}
    await a.start(peers)
    await b.start(peers)
    rng = random.Random(0)
    rows = []
    try:
        progress(
            f"model: 8 layers, KV {a.engine.kv_block_nbytes // 16 // 1024} KiB/token; lengths {lengths}"
        )
        for length in lengths:
            log.clear()
            for i in range(NUM_BACKGROUND):
                prompt = [rng.randrange(256) for _ in range(32)]
                await a.async_engine.run(
                    lambda e, i=i, p=prompt: e.add_request(
                        f"bg{i}", p, SamplingParams(max_tokens=1500, ignore_eos=True)
                    )
                )
            rid = f"r{length}"
            prompt = [rng.randrange(256) for _ in range(length)]
            await a.async_engine.run(
                lambda e, r=rid, p=prompt: e.add_request(
                    r, p, SamplingParams(max_tokens=1500, ignore_eos=True)
                )
            )
            await wait_tokens(log, rid, 8)
            entries = log[rid]
            decode_step = statistics.median(
                entries[j + 1][0] - entries[j][0] for j in range(len(entries) - 6, len(entries) - 1)
            )
            row = {"context_length": length, "decode_step_ms": decode_step * 1000}
            # Unmeasured round trip first: b's engine grows its attention buffers to this
            # length once (a per-process cost, not a per-migration one).
            await a.source.migrate(rid, b.target())
            await wait_tokens(log, rid, len(log[rid]) + 2)
            await b.source.migrate(rid, a.target())
            await wait_tokens(log, rid, len(log[rid]) + 4)
            for mode in (MigrationMode.LIVE, MigrationMode.BLOCKING_COPY, MigrationMode.RECOMPUTE):
                samples = []
                for _ in range(live_repeats if mode is MigrationMode.LIVE else 1):
                    samples.append(await move(a, b, log, rid, mode))
                    if mode is not MigrationMode.RECOMPUTE:
                        await b.source.migrate(rid, a.target())  # back to a, unmeasured
                        await wait_tokens(log, rid, len(log[rid]) + 4)
                row[mode.value] = median_sample(samples)
                progress(
                    f"  ctx {length:5d}  {mode.value:13s} downtime {row[mode.value]['downtime_ms']:9.1f} ms"
                )
            for node in (a, b):
                for request_id in [rid] + [f"bg{i}" for i in range(NUM_BACKGROUND)]:
                    await node.async_engine.run(lambda e, r=request_id: e.abort_request(r))
            rows.append(row)
        for node in (a, b):
            await node.async_engine.run(lambda e: e.check_integrity())
            free = await node.async_engine.run(lambda e: e.block_manager.num_free_blocks)
            assert free == node.engine.block_manager.num_total_blocks, f"{node.name} leaked blocks"
    finally:
        await a.stop()
        await b.stop()
    return rows


def summarize(rows: list[dict]) -> dict:
    live = rows[-1]["live"]
    during = statistics.mean(live["bg_during_s"]) if live["bg_during_s"] else None
    before = statistics.mean(live["bg_before_s"]) if live["bg_before_s"] else None
    slowdown = (during / before - 1) * 100 if during and before else None
    return {
        "context_lengths": [r["context_length"] for r in rows],
        "live_downtime_ms": [round(r["live"]["downtime_ms"], 3) for r in rows],
        "live_downtime_ms_samples": [[round(x, 3) for x in r["live"]["samples_ms"]] for r in rows],
        "blocking_copy_ms": [round(r["blocking_copy"]["downtime_ms"], 3) for r in rows],
        "recompute_ms": [round(r["recompute"]["downtime_ms"], 3) for r in rows],
        "decode_step_ms": round(rows[-1]["decode_step_ms"], 3),
        "decode_step_ms_per_length": [round(r["decode_step_ms"], 3) for r in rows],
        "source_slowdown_pct": None if slowdown is None else round(slowdown, 1),
        # What the client's stream shows (gap - one destination step): the same stall
        # plus the destination step's jitter, which at long contexts is larger.
        "live_stream_gap_ms": [round(r["live"]["stream_gap_median_ms"], 3) for r in rows],
        "live_num_stages": [r["live"]["num_stages"] for r in rows],
        "live_mib_copied": [round(r["live"]["num_bytes"] / 2**20, 1) for r in rows],
    }


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="llmesh bench migration", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "--json", action="store_true", help="print the JSON summary as the last line"
    )
    parser.add_argument(
        "--lengths",
        default=",".join(map(str, DEFAULT_LENGTHS)),
        help="context lengths, comma-separated",
    )
    parser.add_argument(
        "--in-process",
        action="store_true",
        help="both engines in this process (one GIL) instead of two worker processes",
    )
    parser.add_argument(
        "--hosts",
        choices=["local", "netns"],
        default="local",
        help="netns: also run the workers on two network-namespace hosts (root; UCX over "
        "TCP across a 10 Gb/s veth link, started from deploy/compose) next to one host",
    )
    parser.add_argument(
        "--live-repeats",
        type=int,
        default=5,
        help="live migrations per length; the median counts (default 5)",
    )
    args = parser.parse_args(argv)
    lengths = sorted(int(x) for x in args.lengths.split(","))
    if args.live_repeats < 1:
        parser.error("--live-repeats must be >= 1")

    def progress(line: str) -> None:
        print(line, file=sys.stderr if args.json else sys.stdout, flush=True)

    setup_logging("bench-migration", level="WARNING")
    if args.in_process and args.hosts != "local":
        parser.error("--in-process runs one process; --hosts netns needs worker processes")
    if args.in_process:
        rows = {"local": asyncio.run(run(lengths, progress, args.live_repeats))}
    else:
        from bench._migration_processes import run_processes

        model_dir, max_len = bench_model(lengths)
        placements = ["local", "netns"] if args.hosts == "netns" else ["local"]
        rows = {
            hosts: run_processes(lengths, progress, args.live_repeats, model_dir, max_len, hosts)
            for hosts in placements
        }
    summaries = {hosts: summarize(host_rows) for hosts, host_rows in rows.items()}
    for hosts, summary in summaries.items():
        if len(summaries) > 1:
            print(f"\n{HOST_TITLES[hosts]}")
        print_table(summary, lengths)
    if len(summaries) == 1:
        print(json.dumps(summaries["local"]))
    else:
        print(json.dumps({"same_host": summaries["local"], "netns": summaries["netns"]}))
    return 0


HOST_TITLES = {
    "local": "same host (UCX: shared memory / CMA)",
    "netns": "two namespace hosts (UCX over TCP, veth + bridge, tc tbf 10gbit)",
}


def print_table(summary: dict, lengths: list[int]) -> None:
    print(
        f"{'context':>8} {'live ms':>9} {'blocking ms':>12} {'recompute ms':>13} {'step ms':>8} {'stages':>6}"
    )
    for i, length in enumerate(summary["context_lengths"]):
        print(
            f"{length:8d} {summary['live_downtime_ms'][i]:9.2f} {summary['blocking_copy_ms'][i]:12.2f} "
            f"{summary['recompute_ms'][i]:13.2f} {summary['decode_step_ms_per_length'][i]:8.2f} {summary['live_num_stages'][i]:6d}"
        )
    print(
        f"source slowdown during live migration at {lengths[-1]}: {summary['source_slowdown_pct']}%"
    )
