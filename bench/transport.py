"""`llmesh bench transport`: kvtransport between two processes on this host.

(1) Throughput of 1, 4, 16, 64 MiB KV transfers through kvtransport (UCX), next to
    UCX's native `ucx_perftest` tag bandwidth at the same sizes:
      streamed: a steady stream of transfers, 4 in flight at a time (kvtransport) vs
                perftest's stream of messages (its default window); both send 1 GiB
                (20 to 1000 messages) timed after a tenth as many untimed in the same
                stream (warm-up, as perftest does); this pair gives `ratio`;
      single:   one transfer at a time, header handshake included (kvtransport) vs
                perftest with one message in flight (-O 1).
    Measurements of both alternate, and each figure is the best of the rounds.
(2) One-way activation latency (a 32 KiB bf16 hidden state every few ms), idle and while
    back-to-back 256 MiB KV transfers flow to the same peer, with the priority scheduler
    and with plain FIFO. Idle is measured twice: as is (the receiver sleeps in epoll
    between activations, so its wake-up is part of the figure), and with the receiver's
    event loop kept turning ("polling"), which is what idle costs where wake-ups are
    cheap (a faster or busier host): the loaded tail must stay within 3x of both.

Prints a table, then (with --json) one JSON object as the last stdout line.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import dataclasses
import json
import os
import statistics
import time
from dataclasses import dataclass

import torch

from bench._transport_peer import TransportPeer
from bench._ucx_perftest import find_perftest, stream_shape, tag_bandwidth_gbps
from kvtransport import SchedulingPolicy, TrafficClass, TransportConfig, make_transport
from kvtransport.config import MIB
from kvtransport.tensors import huge_page_empty

SIZES_MIB = [1, 4, 16, 64]
ACTIVATION_SHAPE = (4, 4096)  # bf16: 32 KiB, four tokens of a 4096-wide model
BULK_TRANSFER_BYTES = 256 * MIB
BULK_IN_FLIGHT = 2  # KV transfers kept queued so the link never idles


@dataclass
class Options:
    rounds: int
    streamed_in_flight: int
    single_reps: int
    num_activations: int
    activation_interval_s: float
    with_native: bool
    with_throughput: bool


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="llmesh bench transport", description=__doc__)
    parser.add_argument("--json", action="store_true", help="print a JSON summary last")
    parser.add_argument("--rounds", type=int, default=2, help="throughput rounds (best kept)")
    parser.add_argument("--activations", type=int, default=300, help="latency samples per run")
    parser.add_argument(
        "--interval-s", type=float, default=0.004, help="between activations, seconds"
    )
    parser.add_argument("--no-native", action="store_true", help="skip ucx_perftest")
    parser.add_argument("--chunk-mib", type=float, default=None, help="override kv_chunk_bytes")
    parser.add_argument("--window", type=int, default=None, help="override kv_window")
    parser.add_argument(
        "--chunk-kib-with-activations",
        type=int,
        default=None,
        help="override kv_chunk_bytes_with_activations (KiB)",
    )
    parser.add_argument(
        "--window-with-activations",
        type=int,
        default=None,
        help="override kv_window_with_activations",
    )
    parser.add_argument("--skip-throughput", action="store_true", help="latency part only")
    args = parser.parse_args(argv)
    options = Options(
        rounds=args.rounds,
        streamed_in_flight=4,
        single_reps=5,
        num_activations=args.activations,
        activation_interval_s=args.interval_s,
        with_native=not args.no_native,
        with_throughput=not args.skip_throughput,
    )
    overrides = {}
    if args.chunk_mib is not None:
        overrides["kv_chunk_bytes"] = int(args.chunk_mib * MIB)
    if args.window is not None:
        overrides["kv_window"] = args.window
    if args.chunk_kib_with_activations is not None:
        overrides["kv_chunk_bytes_with_activations"] = args.chunk_kib_with_activations * 1024
    if args.window_with_activations is not None:
        overrides["kv_window_with_activations"] = args.window_with_activations
    config = TransportConfig(**overrides)
    peer = TransportPeer(kv_chunk_bytes=config.kv_chunk_bytes)
    try:
        result = asyncio.run(_run(peer, config, options))
    finally:
        peer.stop()
    _print_table(result)
    if args.json:
        print(json.dumps(result))
    return 0


async def _run(peer: TransportPeer, config: TransportConfig, options: Options) -> dict:
    perftest = find_perftest() if options.with_native else None
    started = time.monotonic()
    load_at_start = round(os.getloadavg()[0], 2)  # other tenants of the host skew all timings
    transport = make_transport(config)
    await transport.start()
    try:
        if options.with_throughput:
            throughput = await _throughput(transport, peer, perftest, options)
        else:
            throughput = {"kvtransport_gbps": [], "native_gbps": None, "ratio": None}
        latency = await _latency(transport, peer, options, "priority")
    finally:
        await transport.close()
    fifo = make_transport(dataclasses.replace(config, scheduling=SchedulingPolicy.FIFO))
    await fifo.start()
    try:
        fifo_latency = await _latency(fifo, peer, options, "fifo", idle=False)
    finally:
        await fifo.close()
    result = {
        "sizes_mib": SIZES_MIB,
        **throughput,
        "activation_bytes": 2 * ACTIVATION_SHAPE[0] * ACTIVATION_SHAPE[1],
        "activation_p50_idle_ms": latency["idle"][0],
        "activation_p99_idle_ms": latency["idle"][1],
        "activation_p50_idle_polling_ms": latency["idle_polling"][0],
        "activation_p99_idle_polling_ms": latency["idle_polling"][1],
        "activation_p50_loaded_ms": latency["loaded"][0],
        "activation_p99_loaded_ms": latency["loaded"][1],
        "activation_p50_loaded_fifo_ms": fifo_latency["loaded"][0],
        "activation_p99_loaded_fifo_ms": fifo_latency["loaded"][1],
        "kv_gbps_during_activations": latency["kv_gbps"],
        "kv_gbps_during_activations_fifo": fifo_latency["kv_gbps"],
        "num_activation_samples": options.num_activations,
        "kv_chunk_bytes": config.kv_chunk_bytes,
        "kv_window": config.kv_window,
        "kv_chunk_bytes_with_activations": config.kv_chunk_bytes_with_activations,
        "kv_window_with_activations": config.kv_window_with_activations,
        "streamed_in_flight": options.streamed_in_flight,
        "backend": config.backend.value,
        "host_load_avg_1m": [load_at_start, round(os.getloadavg()[0], 2)],
        "elapsed_s": round(time.monotonic() - started, 1),
    }
    ratios = [r for r, size in zip(result["ratio"] or [], SIZES_MIB, strict=False) if size >= 4]
    p99_idle = result["activation_p99_idle_ms"]
    p99_polling = result["activation_p99_idle_polling_ms"]
    p99_loaded = result["activation_p99_loaded_ms"]
    result["targets"] = {
        "ratio_at_least_0.5_from_4mib": bool(ratios) and all(r >= 0.5 for r in ratios if r),
        "loaded_p99_at_most_3x_idle_p99": p99_loaded <= 3 * p99_idle,
        "loaded_p99_at_most_3x_polling_idle_p99": p99_loaded <= 3 * p99_polling,
    }
    return result


async def _throughput(transport, peer: TransportPeer, perftest, options: Options) -> dict:
    best = {key: [0.0] * len(SIZES_MIB) for key in ("streamed", "single", "native", "native_1")}
    # Huge-page buffers on both sides, as the workers' migration staging buffers are.
    sources = {mib: huge_page_empty(mib * MIB).fill_(1) for mib in SIZES_MIB}
    for mib in SIZES_MIB:  # warm-up: connections, pools, page faults
        await _transfer_batch(transport, peer, sources[mib], f"warm-{mib}", 1)
    for round_index in range(options.rounds):
        for index, mib in enumerate(SIZES_MIB):
            tag = f"r{round_index}-{mib}"
            if perftest is not None:
                native = tag_bandwidth_gbps(perftest, mib * MIB)
                best["native"][index] = max(best["native"][index], native)
            streamed = await _transfer_stream(
                transport, peer, sources[mib], f"s-{tag}", options.streamed_in_flight
            )
            best["streamed"][index] = max(best["streamed"][index], streamed)
            if perftest is not None:
                native_1 = tag_bandwidth_gbps(perftest, mib * MIB, window=1)
                best["native_1"][index] = max(best["native_1"][index], native_1)
            singles = [
                await _transfer_batch(transport, peer, sources[mib], f"1-{tag}-{rep}", 1)
                for rep in range(options.single_reps)
            ]
            best["single"][index] = max(best["single"][index], statistics.median(singles))
    return {
        "kvtransport_gbps": _rounded(best["streamed"]),
        "native_gbps": _rounded(best["native"]) if perftest else None,
        "ratio": _ratios(best["streamed"], best["native"]) if perftest else None,
        "kvtransport_single_gbps": _rounded(best["single"]),
        "native_single_gbps": _rounded(best["native_1"]) if perftest else None,
        "ratio_single": _ratios(best["single"], best["native_1"]) if perftest else None,
    }


async def _transfer_batch(transport, peer, source: torch.Tensor, prefix: str, count: int):
    """count transfers of `source` in flight together; GB/s from first send to last arrival."""
    transfers = [(f"{prefix}-{i}", source.numel()) for i in range(count)]
    op_id = peer.request("expect", transfers)
    await peer.ready(op_id)
    started = time.monotonic()
    handles = [await transport.send(peer.address, tid, source) for tid, _ in transfers]
    done_at = await peer.reply(op_id)
    for handle in handles:
        await handle.wait()
    return count * source.numel() / (max(done_at.values()) - started) / 1e9


async def _transfer_stream(transport, peer, source: torch.Tensor, prefix: str, window: int):
    """GB/s of a steady stream of `source` transfers, `window` in flight at a time: the
    timed transfers' bytes over the time from the last warm-up transfer's arrival to the
    last arrival (both on the receiver). The receiver keeps twice `window` receives
    posted, so no transfer arrives before its receive is."""
    count, warmup = stream_shape(source.numel())
    op_id = peer.request("stream", prefix, warmup + count, source.numel(), 2 * window)
    await peer.ready(op_id)
    in_flight: collections.deque = collections.deque()
    for index in range(warmup + count):
        if len(in_flight) >= window:
            await in_flight.popleft().wait()
        in_flight.append(await transport.send(peer.address, f"{prefix}-{index}", source))
    for handle in in_flight:
        await handle.wait()
    done_at = await peer.reply(op_id)
    started = done_at[warmup - 1]
    return count * source.numel() / (max(done_at[warmup:]) - started) / 1e9


async def _latency(transport, peer: TransportPeer, options: Options, name: str, idle=True):
    result = {}
    activation = torch.randn(ACTIVATION_SHAPE).to(torch.bfloat16)
    if idle:
        result["idle"] = await _activation_run(transport, peer, activation, f"{name}-idle", options)
        await peer.reply(peer.request("poll", True))
        try:
            result["idle_polling"] = await _activation_run(
                transport, peer, activation, f"{name}-idle-polling", options
            )
        finally:
            await peer.reply(peer.request("poll", False))
    bulk = huge_page_empty(BULK_TRANSFER_BYTES).fill_(1)
    stop = asyncio.Event()
    sink_prefix = f"{name}-bulk"
    sink_op = peer.request("sink", sink_prefix, BULK_TRANSFER_BYTES)
    flowing = asyncio.Event()
    sender = asyncio.create_task(_bulk_sender(transport, peer, bulk, sink_prefix, stop, flowing))
    await asyncio.wait_for(flowing.wait(), 60)  # a whole KV transfer arrived: buffers are warm
    result["loaded"] = await _activation_run(transport, peer, activation, f"{name}-load", options)
    stop.set()
    num_sent, kv_gbps = await sender
    await peer.reply(peer.request("stop_sink", sink_prefix, num_sent))
    await peer.reply(sink_op)
    result["kv_gbps"] = round(kv_gbps, 3)
    return result


async def _bulk_sender(
    transport, peer, bulk, prefix: str, stop: asyncio.Event, flowing: asyncio.Event
):
    """Back-to-back KV transfers, BULK_IN_FLIGHT queued, until `stop`; (count, GB/s).
    Sets `flowing` once the first transfer is through."""
    started, handles, index = time.monotonic(), [], 0
    while not stop.is_set():
        while len(handles) < BULK_IN_FLIGHT:
            handles.append(await transport.send(peer.address, f"{prefix}-{index}", bulk))
            index += 1
        await handles.pop(0).wait()
        flowing.set()
    for handle in handles:
        await handle.wait()
    elapsed = time.monotonic() - started
    return index, index * bulk.numel() / elapsed / 1e9


async def _activation_run(transport, peer, activation, prefix: str, options: Options):
    """(p50, p99) one-way latency in ms of options.num_activations activations."""
    op_id = peer.request("activations", prefix, options.num_activations)
    await asyncio.sleep(0.05)  # the first recv is posted
    sent_at = []
    for index in range(options.num_activations):
        sent_at.append(time.monotonic())
        await transport.send(peer.address, f"{prefix}-{index}", activation, TrafficClass.ACTIVATION)
        await asyncio.sleep(options.activation_interval_s)
    done_at = await peer.reply(op_id)
    latencies = sorted((done - sent) * 1e3 for done, sent in zip(done_at, sent_at, strict=True))
    return _percentile(latencies, 50), _percentile(latencies, 99)


def _percentile(sorted_values: list[float], percent: float) -> float:
    index = min(len(sorted_values) - 1, round(percent / 100 * (len(sorted_values) - 1)))
    return round(sorted_values[index], 3)


def _rounded(values: list[float]) -> list[float]:
    return [round(v, 3) for v in values]


def _ratios(ours: list[float], native: list[float]) -> list[float | None]:
    return [round(a / b, 3) if b else None for a, b in zip(ours, native, strict=True)]


def _print_table(result: dict) -> None:
    if result["kvtransport_gbps"]:
        _print_throughput(result)
    _print_latency(result)


def _print_throughput(result: dict) -> None:
    print("kvtransport (UCX) vs native ucx_perftest, two processes on this host, GB/s = 1e9 B/s")
    print(
        f"{'size':>7} {'kvt stream':>11} {'native':>8} {'ratio':>6}   {'kvt single':>11} {'native -O1':>11} {'ratio':>6}"
    )
    native = result["native_gbps"] or [None] * len(result["sizes_mib"])
    ratio = result["ratio"] or [None] * len(result["sizes_mib"])
    native_1 = result["native_single_gbps"] or [None] * len(result["sizes_mib"])
    ratio_1 = result["ratio_single"] or [None] * len(result["sizes_mib"])
    for i, mib in enumerate(result["sizes_mib"]):
        print(
            f"{mib:>4} MiB {result['kvtransport_gbps'][i]:>11.2f} {_fmt(native[i]):>8} "
            f"{_fmt(ratio[i]):>6}   {result['kvtransport_single_gbps'][i]:>11.2f} "
            f"{_fmt(native_1[i]):>11} {_fmt(ratio_1[i]):>6}"
        )
    print()


def _print_latency(result: dict) -> None:
    print(f"activation latency, one-way ms ({result['activation_bytes'] // 1024} KiB bf16):")
    print(f"{'':>28} {'p50':>8} {'p99':>8}   KV GB/s meanwhile")
    print(
        f"{'idle':>28} {result['activation_p50_idle_ms']:>8.3f} {result['activation_p99_idle_ms']:>8.3f}"
    )
    print(
        f"{'idle, receiver polling':>28} {result['activation_p50_idle_polling_ms']:>8.3f} "
        f"{result['activation_p99_idle_polling_ms']:>8.3f}"
    )
    print(
        f"{'256 MiB KV flowing, priority':>28} {result['activation_p50_loaded_ms']:>8.3f} "
        f"{result['activation_p99_loaded_ms']:>8.3f}   {result['kv_gbps_during_activations']:.2f}"
    )
    print(
        f"{'256 MiB KV flowing, FIFO':>28} {result['activation_p50_loaded_fifo_ms']:>8.3f} "
        f"{result['activation_p99_loaded_fifo_ms']:>8.3f}   "
        f"{result['kv_gbps_during_activations_fifo']:.2f}"
    )
    print(
        f"targets: {result['targets']}  ({result['elapsed_s']} s, "
        f"host load average {result['host_load_avg_1m']})"
    )


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.2f}"
