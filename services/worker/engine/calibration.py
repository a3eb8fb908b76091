"""Measures the torch executor on synthetic batches to fit a cost-model profile.

Probe batches are built directly (blocks from the block manager, dummy token ids): a
step's time does not depend on the KV values, only on the shapes. Every probe runs
once per round, rounds repeat, and each probe keeps its fastest run: on a shared CPU
other processes only ever add time, and interleaving gives every probe its share of
the quiet moments.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from services.worker.engine.config import EngineConfig
from services.worker.engine.cost_model import CostModelProfile, batch_features, fit_profile
from services.worker.engine.engine import LLMEngine
from services.worker.engine.loader import load_model_config
from services.worker.engine.sampling_params import SamplingParams
from services.worker.engine.scheduler import ScheduledRequest, SchedulerOutput

# Decode probes: (number of requests, context length). Prefill probes: (context, chunk).
DECODE_PROBES = [(b, c) for b in (1, 8, 32) for c in (32, 256, 1024)]
PREFILL_PROBES = [(0, 32), (0, 128), (0, 512), (256, 128), (1024, 256)]
QUICK_DECODE_PROBES = [(1, 16), (4, 64), (8, 16)]
QUICK_PREFILL_PROBES = [(0, 16), (0, 64), (32, 32)]


@dataclass
class Sample:
    label: str
    features: tuple[float, ...]
    seconds: float


def _probe(engine: LLMEngine, name: str, chunks: list[tuple[int, int]]) -> SchedulerOutput:
    """A batch of fresh requests; chunks: (num_computed_tokens, num_new_tokens) each."""
    batch = SchedulerOutput()
    for i, (computed, new) in enumerate(chunks):
        request_id = f"{name}/{i}"
        block_ids = engine.block_manager.allocate(request_id, computed + new)
        batch.requests.append(
            ScheduledRequest(
                request_id, [i % 200 + 1] * new, computed, block_ids, SamplingParams(), True
            )
        )
        batch.num_batched_tokens += new
    return batch


def measure(
    config: EngineConfig,
    repeats: int = 7,
    progress: Callable[[str], None] = print,
    decode_probes: list[tuple[int, int]] = DECODE_PROBES,
    prefill_probes: list[tuple[int, int]] = PREFILL_PROBES,
    clock: Callable[[], float] | None = None,
    before_round: Callable[[], None] | None = None,
) -> list[Sample]:
    """Each probe's fastest time over `repeats` rounds: the executor's wall-clock step
    time, or the difference of `clock()` around it (time.process_time: CPU seconds, which
    other processes on a shared machine do not inflate; one torch thread).
    `before_round()` runs before each round (processes that measure together wait for
    each other there)."""
    engine = LLMEngine.from_config(config)
    probes: list[tuple[str, SchedulerOutput]] = []
    try:
        for num_requests, context in decode_probes:
            label = f"decode  batch={num_requests:<3} context={context}"
            probes.append((label, _probe(engine, label, [(context - 1, 1)] * num_requests)))
        for context, chunk in prefill_probes:
            label = f"prefill chunk={chunk:<4} context={context}"
            probes.append((label, _probe(engine, label, [(context, chunk)])))
    except Exception as exc:
        raise ValueError(
            f"memory_capacity_bytes={config.memory_capacity_bytes} is too small to calibrate: {exc}"
        ) from exc
    best = [float("inf")] * len(probes)
    for batch in (b for _, b in probes):
        engine.executor.execute(batch)  # warm-up
    for round_no in range(1, repeats + 1):
        if before_round is not None:
            before_round()
        for i, (_, batch) in enumerate(probes):
            if clock is None:
                seconds = engine.executor.execute(batch).elapsed_s
            else:
                start = clock()
                engine.executor.execute(batch)
                seconds = clock() - start
            best[i] = min(best[i], seconds)
        progress(
            f"  round {round_no}/{repeats}: {sum(best) * 1e3:8.1f} ms over {len(probes)} probes"
        )
    for request_id in list(engine.block_manager.block_tables):
        engine.block_manager.free(request_id)
    engine.check_integrity()
    return [
        Sample(label, batch_features(batch), t)
        for (label, batch), t in zip(probes, best, strict=True)
    ]


def calibrate(
    config: EngineConfig,
    name: str,
    repeats: int = 7,
    progress: Callable[[str], None] = print,
    quick: bool = False,
) -> tuple[CostModelProfile, list[Sample]]:
    """Measures the probes (a few small ones if quick) and fits a profile to them."""
    import torch

    if quick:
        samples = measure(config, repeats, progress, QUICK_DECODE_PROBES, QUICK_PREFILL_PROBES)
    else:
        samples = measure(config, repeats, progress)
    profile = fit_profile(
        name=name,
        model=load_model_config(config.model),
        dtype=config.dtype,
        samples=[(s.features, s.seconds) for s in samples],
        source=f"llmesh calibrate: {len(samples)} probes x {repeats} rounds (fastest kept), "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads",
    )
    return profile, samples
