"""A group's pipeline on a virtual clock: one simulated engine (the leader's scheduler
and block manager, cost-model tokens) forms micro-batches, `PipelineClock` times them
through g stages, and each micro-batch is applied when its result is back at stage 0.

    t = when stage 0 can start the next micro-batch (clock.next_start)
    apply every micro-batch back by t; admit the arrivals up to t; form one
    nothing to form: t = the next return or arrival
"""

from __future__ import annotations

from dataclasses import dataclass, field

from services.policies.microbatch import PipelineClock
from services.worker.engine import (
    EngineConfig,
    LLMEngine,
    MicroBatchCost,
    MicroBatchFormation,
    SamplingParams,
    SchedulerOutput,
)


@dataclass(frozen=True)
class Arrival:
    request_id: str
    arrival_s: float
    prompt_len: int
    max_tokens: int


@dataclass
class PipelineRun:
    clock: PipelineClock
    batches: list[SchedulerOutput] = field(default_factory=list)
    tokens: dict[str, list[int]] = field(default_factory=dict)
    engine: LLMEngine | None = None

    @property
    def bubble_fraction(self) -> float:
        return self.clock.bubble_fraction


def run_pipeline(
    formation: MicroBatchFormation,
    num_stages: int,
    arrivals: list[Arrival],
    profile: str = "tiny-cpu",
    engine_config: EngineConfig | None = None,
    cost: MicroBatchCost | None = None,
) -> PipelineRun:
    """Serves `arrivals` to the end; micro-batches cost `cost` (default: the profile's)
    on the whole model, 1/num_stages of it on each stage."""
    engine = LLMEngine.simulated(engine_config or EngineConfig(num_kv_blocks=4096), profile)
    if cost is None:
        cost = MicroBatchCost.from_profile(engine.executor.cost_model.profile)
    clock = PipelineClock(num_stages, formation.num_micro_batches)
    run = PipelineRun(clock, engine=engine)
    pending = sorted(arrivals, key=lambda a: (a.arrival_s, a.request_id))
    out: list[tuple[float, SchedulerOutput, list[int]]] = []  # (back at, batch, tokens)
    t = 0.0
    while pending or out or engine.has_unfinished_requests():
        t = clock.next_start(t)
        while out and out[0][0] <= t:
            _, batch, token_ids = out.pop(0)
            for o in engine.pipeline.apply_micro_batch(batch, token_ids):
                run.tokens.setdefault(o.request_id, []).extend(o.new_token_ids)
        while pending and pending[0].arrival_s <= t:
            a = pending.pop(0)
            params = SamplingParams(max_tokens=a.max_tokens, ignore_eos=True, seed=1)
            engine.add_request(a.request_id, [1] * a.prompt_len, params, arrival_time=a.arrival_s)
        batch = engine.pipeline.form_micro_batch(formation)
        if batch.is_empty:
            later = [o[0] for o in out[:1]] + [a.arrival_s for a in pending[:1]]
            if not later:
                assert not engine.has_unfinished_requests()
                break
            t = max(t, min(later))
            continue
        token_ids = engine.executor.execute(batch).sampled_token_ids
        back = clock.add(cost.batch_s(batch) / num_stages, not_before=t)
        run.batches.append(batch)
        out.append((back, batch, token_ids))
        out.sort(key=lambda o: o[0])
    return run
