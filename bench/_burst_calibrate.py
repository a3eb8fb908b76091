"""The step-cost calibration of `llmesh bench burst`, run the way the mesh runs: as many
processes as the mesh has workers, one torch thread each, measuring at the same time.

Why not one process: the calibration is in CPU seconds (the simulator's shared host
divides the cores among its jobs), but a CPU second does not buy the same work alone as
beside three other engines. On this 2-vCPU VM one engine measured alone on a quiet
machine gave 535 us per token, the same probes on a loaded one 684 us (docs/kunserve.md,
"Burst on the real mesh"): caches, memory bandwidth and the hypervisor are shared too.
During the burst all four workers step at once, so the probes run four at once, each
round started together (a barrier), and every process's CPU time per probe counts.

Each process loads the engine, then per round waits at the barrier and times every
probe once (calibration.measure, process CPU time); a probe's figure is its fastest
round in that process. The fit pools every process's probes.
"""

from __future__ import annotations

import multiprocessing
import queue
import time

# How long a calibration process may take (loading torch and the model included).
PROCESS_TIMEOUT_S = 600.0


def measure_concurrently(
    config, num_processes: int, rounds: int, decode_probes, prefill_probes, torch_threads: int
) -> list[list]:
    """Per process, the probes' calibration.Sample list (fastest of `rounds`, CPU s)."""
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(num_processes)
    results = ctx.Queue()
    args = (config, rounds, decode_probes, prefill_probes, torch_threads, barrier, results)
    procs = [
        ctx.Process(target=_measure_process, args=args, daemon=True) for _ in range(num_processes)
    ]
    for proc in procs:
        proc.start()
    try:
        deadline = time.monotonic() + PROCESS_TIMEOUT_S
        out = []
        for _ in procs:
            try:
                kind, value = results.get(timeout=max(1.0, deadline - time.monotonic()))
            except queue.Empty:
                raise RuntimeError(
                    f"calibration: {num_processes - len(out)} process(es) gave nothing "
                    f"in {PROCESS_TIMEOUT_S:.0f} s"
                ) from None
            if kind == "error":
                raise RuntimeError(f"calibration process failed: {value}")
            out.append(value)
        return out
    finally:
        for proc in procs:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()
                proc.join()


def _measure_process(
    config, rounds, decode_probes, prefill_probes, torch_threads, barrier, results
) -> None:
    try:
        import torch

        from services.worker.engine.calibration import measure

        torch.set_num_threads(torch_threads)
        best = measure(
            config,
            rounds,
            lambda _line: None,
            decode_probes,
            prefill_probes,
            clock=time.process_time,
            before_round=lambda: barrier.wait(timeout=PROCESS_TIMEOUT_S),
        )
        results.put(("samples", best))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which raises
        barrier.abort()
        results.put(("error", f"{type(exc).__name__}: {exc}"))
