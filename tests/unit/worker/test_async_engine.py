"""services.worker.async_engine: the engine on its own thread, driven from asyncio."""

from __future__ import annotations

import asyncio
import threading

import pytest

from services.common.messages import FinishReason, RequestSpec, SamplingSpec
from services.worker.async_engine import AsyncEngine, EngineStoppedError
from services.worker.engine import EngineConfig, LLMEngine, SamplingParams
from services.worker.instance import delta_from_output, engine_state

MiB = 1024 * 1024


@pytest.fixture(scope="module")
def engine() -> LLMEngine:
    return LLMEngine.from_config(
        EngineConfig(model="tiny", num_kv_blocks=64, memory_capacity_bytes=32 * MiB)
    )


class Collector:
    """on_step callback: tokens per request, finish reasons, snapshots seen."""

    def __init__(self) -> None:
        self.tokens: dict[str, list[int]] = {}
        self.finished: dict[str, str] = {}
        self.snapshots = []
        self.done = asyncio.Event()
        self.expected: set[str] = set()
        self.offset: dict[str, int] = {}  # tokens a resumed request brought along

    def __call__(self, outputs, snapshot) -> None:
        for output in outputs:
            tokens = self.tokens.setdefault(output.request_id, [])
            assert output.first_token_index == len(tokens) + self.offset.get(output.request_id, 0)
            tokens.extend(output.new_token_ids)
            if output.finished:
                self.finished[output.request_id] = output.finish_reason
        if snapshot is not None:
            self.snapshots.append(snapshot)
        if self.expected and self.expected <= set(self.finished):
            self.done.set()


async def test_calls_run_on_the_engine_thread_between_steps(engine):
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    expected = engine.generate([[1, 2, 3], [4, 5]], params)  # before the thread owns it
    collector = Collector()
    async_engine = AsyncEngine(engine, collector)
    async_engine.start()
    try:
        thread_name = await async_engine.run(lambda e: threading.current_thread().name)
        assert thread_name == "engine"
        collector.expected = {"a", "b"}
        await async_engine.run(lambda e: e.add_request("a", [1, 2, 3], params))
        await async_engine.run(lambda e: e.add_request("b", [4, 5], params))
        await asyncio.wait_for(collector.done.wait(), 30)
        assert [collector.tokens["a"], collector.tokens["b"]] == [o.new_token_ids for o in expected]
        assert collector.finished == {"a": "length", "b": "length"}
        # Once idle, the engine thread publishes its final load: nothing running, all free.
        async with asyncio.timeout(5):
            while (
                async_engine.snapshot.stats.num_running
                or async_engine.snapshot.stats.num_used_blocks
            ):
                await asyncio.sleep(0.01)
        with pytest.raises(KeyError):
            await async_engine.run(lambda e: {}["missing"])  # exceptions reach the caller
    finally:
        await async_engine.stop()
    with pytest.raises(EngineStoppedError):
        await async_engine.run(lambda e: None)


async def test_failover_resume_continues_with_the_same_tokens(engine):
    """A request resubmitted with its first k tokens produces exactly the rest."""
    spec = RequestSpec(
        request_id="resumed",
        prompt_token_ids=(7, 8, 9, 10),
        sampling=SamplingSpec(max_tokens=12, temperature=0.75, top_p=0.875, seed=42),
        owner_address="gw:1",
    )
    [full] = engine.generate([list(spec.prompt_token_ids)], engine_state(spec).params)
    k = 5
    resumed = RequestSpec(**{**spec.__dict__, "output_token_ids": tuple(full.new_token_ids[:k])})

    collector = Collector()
    collector.offset = {"resumed": k}
    collector.expected = {"resumed"}
    async_engine = AsyncEngine(engine, collector)
    async_engine.start()
    try:
        await async_engine.run(lambda e: e.migration.import_request(engine_state(resumed), []))
        await asyncio.wait_for(collector.done.wait(), 30)
    finally:
        await async_engine.stop()
    assert collector.tokens["resumed"] == full.new_token_ids[k:]


def test_engine_outputs_become_deltas_and_failures_become_errors():
    from services.worker.engine import RequestOutput

    assert (
        delta_from_output(RequestOutput("r", [5], 3, False, None)).finish_reason
        is FinishReason.NONE
    )
    assert (
        delta_from_output(RequestOutput("r", [5], 3, True, "stop")).finish_reason
        is FinishReason.STOP
    )
    given_up = delta_from_output(
        RequestOutput("r", [], 4, True, "abort"), failure="worker shutting down"
    )
    assert (given_up.finish_reason, given_up.error, given_up.first_token_index) == (
        FinishReason.ERROR,
        "worker shutting down",
        4,
    )
    assert (
        delta_from_output(RequestOutput("r", [], 4, True, "abort")).finish_reason
        is FinishReason.ABORT
    )


async def test_step_log_gives_each_steps_times_and_batch_features(engine):
    import structlog

    params = SamplingParams(max_tokens=3, ignore_eos=True)
    collector = Collector()
    async_engine = AsyncEngine(engine, collector, step_log=True)
    async_engine.start()
    try:
        with structlog.testing.capture_logs() as logs:
            collector.expected = {"s"}
            await async_engine.run(lambda e: e.add_request("s", [1, 2, 3, 4, 5], params))
            await asyncio.wait_for(collector.done.wait(), 30)
    finally:
        await async_engine.stop()
    steps = [e for e in logs if e["event"] == "engine_step"]
    # The 5-token prefill, then two decodes (features: 1, tokens, requests, context
    # tokens, query-key pairs).
    assert [e["features"] for e in steps] == [[1, 5, 1, 5, 15], [1, 1, 1, 6, 6], [1, 1, 1, 7, 7]]
    assert all(e["wall_ms"] >= 0 and e["cpu_ms"] >= 0 for e in steps)
    assert engine.last_step.features == (1.0, 1.0, 1.0, 7.0, 7.0)
