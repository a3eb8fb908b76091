"""The engine on its own thread, with an asyncio face.

The LLMEngine is not thread-safe. One dedicated thread owns it and runs

    loop:  run queued calls  ->  step() if there is work  ->  hand outputs to asyncio
           (sleep until a call arrives when idle)

so every access that reads or changes engine state (admission, abort, load snapshots,
the migration's reserve / suspend / export / import / remove) goes through
`await async_engine.run(fn)`, which executes fn(engine) on that thread *between two
steps* and returns its result. torch releases the GIL inside its kernels, so the
asyncio thread keeps serving RPCs while a step runs.

Two calls of the migration (services/worker/migration/) run off the engine thread,
beside the steps, because they touch only KV blocks no step writes:
`engine.migration.read_kv_blocks` of a migrating request's blocks (full ones are final, the KV
being append-only; the last stage reads the tail once the request is suspended) and
`engine.migration.write_kv_blocks` into blocks reserved for an incoming migration (no step
touches a reservation before its commit).

After every step the thread calls `on_step(outputs, snapshot)` on the event loop;
`snapshot` is a fresh EngineSnapshot when the load changed (at most every
`snapshot_interval_s`), else None.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import contextvars
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from services.common.logging import get_logger
from services.worker.engine import EngineStats, LLMEngine, RequestOutput, RequestView

log = get_logger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class EngineSnapshot:
    """The engine's load at one instant, taken on the engine thread."""

    stats: EngineStats
    running: tuple[RequestView, ...]
    num_waiting_blocks: int  # blocks every waiting request needs for its tokens
    taken_at: float  # time.monotonic()


def take_snapshot(engine: LLMEngine) -> EngineSnapshot:
    """Only call on the engine thread (or before it starts)."""
    block_manager = engine.block_manager
    return EngineSnapshot(
        stats=engine.stats(),
        running=tuple(engine.running_requests()),
        # Queued demand (total, not just head-of-line); the engine exposes its queue.
        num_waiting_blocks=sum(
            block_manager.num_blocks_for(r.num_tokens) for r in engine.scheduler.waiting
        ),
        taken_at=time.monotonic(),
    )


class EngineStoppedError(RuntimeError):
    """The engine thread is not running (stopped, or not started yet)."""


class AsyncEngine:
    def __init__(
        self,
        engine: LLMEngine,
        on_step: Callable[[list[RequestOutput], EngineSnapshot | None], None],
        *,
        snapshot_interval_s: float = 0.05,
        idle_wait_s: float = 0.5,
        on_started: Callable[[int, list[str]], None] | None = None,
        step_log: bool = False,
    ) -> None:
        """on_started(step_start_ns, request_ids): requests whose prefill a step began
        (time.time_ns() at the step's start), on the event loop before that step's
        on_step. step_log: log every step (`engine_step`: its start, wall and engine-thread
        CPU time, batch features) for benchmarks that compare them with a cost model."""
        self.engine = engine
        self._on_step = on_step
        self._on_started = on_started
        self._snapshot_interval_s = snapshot_interval_s
        self._idle_wait_s = idle_wait_s
        self._calls: collections.deque[tuple[Callable[[LLMEngine], Any], asyncio.Future]] = (
            collections.deque()
        )
        self._wakeup = threading.Event()
        # What runs a step: None = engine.step(); a KunServe stage 0 sets its pipeline
        # driver (step(engine) -> outputs, has_work(engine) -> bool). Set it on the
        # engine thread only (inside run()).
        self.stepper = None
        self._is_stopping = False
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._context: contextvars.Context | None = None
        self.snapshot = take_snapshot(engine)
        self._last_snapshot_key: tuple[int, ...] | None = None
        self.num_steps = 0
        self.num_step_tokens = 0  # tokens computed over all steps (prefill + decode)
        self.step_wall_s = 0.0  # wall time inside engine.step()
        self.step_log = step_log
        self._started_at = 0.0

    def start(self) -> None:
        """Start the engine thread; call from the event loop that will receive outputs."""
        self._loop = asyncio.get_running_loop()
        # Callbacks run in the starting task's context (service name bound, no request).
        self._context = contextvars.copy_context()
        self._started_at = time.perf_counter()
        self._thread = threading.Thread(target=self._thread_main, name="engine", daemon=True)
        self._thread.start()

    @property
    def wakeup(self) -> threading.Event:
        """Set when a call arrives; a stepper that waits for something waits on it too."""
        return self._wakeup

    @property
    def is_running(self) -> bool:
        return self._thread is not None and not self._is_stopping

    async def run(self, fn: Callable[[LLMEngine], T]) -> T:
        """Run fn(engine) on the engine thread between two steps; its result or exception."""
        if not self.is_running:
            raise EngineStoppedError("the engine thread is not running")
        assert self._loop is not None
        future: asyncio.Future = self._loop.create_future()
        self._calls.append((fn, future))
        self._wakeup.set()
        return await future

    async def stop(self) -> None:
        """Finish the current step and pending calls, then end the thread."""
        if self._thread is None:
            return
        self._is_stopping = True
        self._wakeup.set()
        await asyncio.to_thread(self._thread.join)
        self._fail_pending_calls()  # calls queued after the thread's last look
        log.info(
            "engine_thread_stopped",
            num_steps=self.num_steps,
            num_step_tokens=self.num_step_tokens,
            step_wall_s=round(self.step_wall_s, 3),
            uptime_s=round(time.perf_counter() - self._started_at, 3),
        )

    # ---- engine thread ----------------------------------------------------------------

    def _thread_main(self) -> None:
        try:
            self._loop_forever()
        except BaseException:  # a bug in this loop: fail loudly, never hang callers
            log.exception("engine_thread_crashed")
        finally:
            self._is_stopping = True
            self._fail_pending_calls()

    def _fail_pending_calls(self) -> None:
        while self._calls:
            _, future = self._calls.popleft()
            self._call_soon(_set_exception, future, EngineStoppedError("the engine thread stopped"))

    def _loop_forever(self) -> None:
        while True:
            did_call = self._run_calls()
            if self._is_stopping:
                self._run_calls()
                return
            engine = self.engine
            outputs: list[RequestOutput] = []
            stepper = self.stepper
            # An engine without every layer steps only through a stepper (KunServe stage
            # 0's pipeline); a stage that runs what stage 0 sends has nothing to step.
            if (
                stepper.has_work(engine)
                if stepper
                else engine.layer_ranges.steps_alone and engine.has_unfinished_requests()
            ):
                try:
                    step_start = time.perf_counter()
                    step_start_ns = time.time_ns()
                    cpu_start = time.thread_time() if self.step_log else 0.0
                    outputs = stepper.step(engine) if stepper else engine.step()
                    wall_s = time.perf_counter() - step_start
                    self.step_wall_s += wall_s
                    if self.step_log and not stepper:
                        _log_step(step_start_ns, wall_s, time.thread_time() - cpu_start, engine)
                    self.num_steps += 1
                    self.num_step_tokens += engine.last_step.num_batched_tokens
                    started = engine.last_step.started_request_ids
                    if started and self._on_started is not None and not stepper:
                        self._call_soon(self._on_started, step_start_ns, started)
                except Exception:  # an engine bug: fail what it runs, keep serving
                    log.exception("engine_step_failed")
                    outputs = self._fail_all(engine)
            elif not did_call:
                # Idle: publish the final load before sleeping, then wait for a call.
                snapshot = self._maybe_snapshot(force=True)
                if snapshot is not None:
                    self._call_soon(self._on_step, [], snapshot)
                self._wakeup.wait(self._idle_wait_s)
                self._wakeup.clear()
                continue
            snapshot = self._maybe_snapshot(force=False)
            if outputs or snapshot is not None:
                self._call_soon(self._on_step, outputs, snapshot)

    def load_changed(self) -> None:
        """On the engine thread: the next snapshot is taken even if the engine's figures
        read as before (a request admitted and aborted between two steps: the llumlet
        counts it until a snapshot taken after its admission)."""
        self._last_snapshot_key = None

    def _maybe_snapshot(self, force: bool) -> EngineSnapshot | None:
        """A new snapshot if the load changed (and, unless forced, the interval passed)."""
        stats = self.engine.stats()
        key = (
            stats.num_running,
            stats.num_waiting,
            stats.num_used_blocks,
            stats.num_hol_blocks,
            stats.num_total_blocks,  # a KunServe drop or restore resizes the pool
        )
        now = time.monotonic()
        if key == self._last_snapshot_key:
            return None
        if not force and now - self.snapshot.taken_at < self._snapshot_interval_s:
            return None
        self._last_snapshot_key = key
        self.snapshot = take_snapshot(self.engine)
        return self.snapshot

    def _run_calls(self) -> bool:
        did_call = False
        while self._calls:
            fn, future = self._calls.popleft()
            did_call = True
            try:
                result = fn(self.engine)
            except BaseException as exc:  # noqa: BLE001 - handed to the awaiting caller
                self._call_soon(_set_exception, future, exc)
            else:
                self._call_soon(_set_result, future, result)
        return did_call

    def _fail_all(self, engine: LLMEngine) -> list[RequestOutput]:
        request_ids = list(engine.scheduler.requests)
        for request_id in request_ids:
            engine.abort_request(request_id)
        # The aborts come out of the pending outputs (step() needs every layer).
        outputs = engine.pipeline.take_outputs()
        for output in outputs:
            if output.finish_reason == "abort":
                output.finish_reason = "error"
        return outputs

    def _call_soon(self, fn, *args) -> None:
        assert self._loop is not None
        with contextlib.suppress(RuntimeError):  # the loop is closed: the process is exiting
            self._loop.call_soon_threadsafe(fn, *args, context=self._context)


def _log_step(start_ns: int, wall_s: float, cpu_s: float, engine: LLMEngine) -> None:
    step = engine.last_step
    if not step.features:
        return  # nothing scheduled
    log.info(
        "engine_step",
        start_ns=start_ns,
        wall_ms=round(wall_s * 1e3, 3),
        cpu_ms=round(cpu_s * 1e3, 3),
        features=[round(f) for f in step.features],
    )


def _set_result(future: asyncio.Future, result: Any) -> None:
    if not future.done():
        future.set_result(result)


def _set_exception(future: asyncio.Future, exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)
