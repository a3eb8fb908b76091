"""Cooperative pipeline execution of a KunServe group.

    stage 0 (engine thread)            stage 1 .. g-2 (event loop)      stage g-1
    schedule micro-batch k (not the
    requests in flight or exchanging)
    run layers [0, a) ---- meta + hidden ---> run [a, b) ---- ... ---> run [c, L), sample
          ^                                                                  |
          +---------------------- meta + sampled token ids -------------------+
    apply the tokens of k (outputs to the gateways as usual)

Up to `max_in_flight` micro-batches are out at once, so every stage has work while the
others compute; the formation (KunServeConfig.micro_batching: lookahead or simple,
services/worker/engine/micro_batching.py) decides what goes in each. A request is in at most one micro-batch: it samples its next token only
after its previous one came back. Each link (into stage k, and the return to stage 0)
numbers its transfers 0, 1, 2, ... so a receiver always knows the next transfer id and
posts it ahead; transfers travel in the activation class, ahead of KV traffic.

Threads: PipelineDriver.step runs on stage 0's engine thread (it is the AsyncEngine's
stepper); sends and receives run on the event loop; the two meet in `_returned` (a
deque plus the engine thread's wakeup event) and `loop.call_soon_threadsafe`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from opentelemetry import trace

from kvtransport import TrafficClass, Transport
from services.common.logging import get_logger
from services.policies.microbatch import PipelineClock
from services.worker.engine import (
    LLMEngine,
    MicroBatchCost,
    MicroBatchFormation,
    RequestOutput,
    SchedulerOutput,
)
from services.worker.engine.staging import device_staging, is_cuda
from services.worker.kunserve.exchange import KVExchange
from services.worker.kunserve.wire import decode_micro_batch, encode_micro_batch

log = get_logger(__name__)

# A stage waits this long for the next micro-batch of a live group (idle groups are
# normal); a dead peer is noticed by the member monitor, which cancels the receive.
IDLE_RECV_TIMEOUT_S = 24 * 3600.0
# How long stage 0's engine thread sleeps when every request is in flight.
RESULT_WAIT_S = 0.05
# One micro-batch in this many gets a span on every stage (all of them would be
# thousands of spans a second).
STAGE_SPAN_EVERY = 64
tracer = trace.get_tracer("llmesh.worker")


def _stage_span(group_key: str, stage: int, seq: int, batch: SchedulerOutput, busy_s: float):
    """A finished span for micro-batch `seq` on `stage` (only one in STAGE_SPAN_EVERY)."""
    if seq % STAGE_SPAN_EVERY:
        return
    end = time.time_ns()
    span = tracer.start_span(
        "kunserve.stage",
        start_time=end - int(busy_s * 1e9),
        attributes={
            "llmesh.group_key": group_key,
            "llmesh.stage": stage,
            "llmesh.micro_batch": seq,
            "llmesh.num_requests": len(batch.requests),
            "llmesh.num_tokens": batch.num_batched_tokens,
        },
    )
    span.end(end_time=end)


def link_id(group_key: str, link: str, seq: int) -> str:
    """Transfer id of micro-batch `seq` on one link ("s<k>": into stage k; "ret")."""
    return f"pp/{group_key}/{link}/{seq}"


def _yielding(exchange: KVExchange | None, peer: bytes):
    """KV sends to `peer` pause while an activation goes there (none: nothing to do)."""
    return exchange.activation_to(peer) if exchange is not None else contextlib.nullcontext()


def to_host(tensor: torch.Tensor) -> torch.Tensor:
    """A CPU tensor the data plane can send and nobody else writes: a copy (through the
    device's pinned staging buffers for a GPU tensor: engine/staging.py), since the
    engine reuses its buffers. Activations, KV of the exchange, exported weights."""
    if tensor.device.type == "cpu":
        return tensor.clone()
    return device_staging(tensor.device).copy_to_host(tensor)


def to_device(tensor: torch.Tensor, device: str) -> torch.Tensor:
    """A received host tensor on the engine's device: itself on the CPU, else a copy
    through the device's pinned staging buffers."""
    if not is_cuda(device):
        return tensor.to(device)
    return device_staging(device).copy_to_device(tensor.contiguous())


@dataclass
class _InFlight:
    batch: SchedulerOutput
    sent_at: float


@dataclass
class PipelineStats:
    num_micro_batches: int = 0
    num_tokens_returned: int = 0
    busy_s: float = 0.0  # stage 0's own layers
    samples_ms: collections.deque = field(default_factory=lambda: collections.deque(maxlen=4096))
    # The micro-batches formed so far, timed by the cost model through the g stages
    # back to back (services.policies.microbatch): the formation's own bubbles, not
    # the host's or the links'.
    modelled_busy_s: float = 0.0  # every stage's modelled time, summed
    modelled_stage_time_s: float = 0.0  # g x the modelled makespan

    def summary(self) -> dict:
        """Micro-batches, stage 0's busy wall time, the cost model's busy time (all
        stages) and the mean round trip: what a group's log line says of its pipeline."""
        trips = list(self.samples_ms)
        return {
            "num_micro_batches": self.num_micro_batches,
            "stage0_busy_s": round(self.busy_s, 3),
            "modelled_busy_s": round(self.modelled_busy_s, 3),
            "mean_round_trip_ms": round(sum(trips) / len(trips), 2) if trips else None,
        }

    @property
    def modelled_bubble_fraction(self) -> float:
        """Idle stage time / total stage time of the modelled run."""
        if self.modelled_stage_time_s <= 0:
            return 0.0
        return 1.0 - self.modelled_busy_s / self.modelled_stage_time_s


class PipelineDriver:
    """Stage 0's stepper: forms micro-batches, runs the first stage, applies results."""

    def __init__(
        self,
        group_key: str,
        transport: Transport,
        next_stage_address: bytes,
        loop: asyncio.AbstractEventLoop,
        wakeup: threading.Event,
        num_stages: int,
        formation: MicroBatchFormation,
        cost: MicroBatchCost,
        on_failure: Callable[[BaseException], None],
        exchange: KVExchange | None = None,
        on_round_trip: Callable[[float], None] = lambda seconds: None,
    ) -> None:
        """on_round_trip(seconds): each micro-batch's activations out and tokens back
        (the activation-latency metric; called on the engine thread)."""
        self.group_key = group_key
        self._transport = transport
        self._next = next_stage_address
        self._on_round_trip = on_round_trip
        self._loop = loop
        self._wakeup = wakeup
        self.num_stages = num_stages
        self.formation = formation  # what goes in each micro-batch; M of them in flight
        self.max_in_flight = formation.num_micro_batches
        self._cost = cost  # the modelled bubble fraction's (either formation)
        self._clock = PipelineClock(num_stages, self.max_in_flight, is_recording=False)
        self._on_failure = on_failure
        self._exchange = exchange  # its KV sends to a peer pause while activations go there
        self._seq = itertools.count()
        self._in_flight: dict[int, _InFlight] = {}
        self._returned: collections.deque[tuple[int, list[int]]] = collections.deque()
        self.held_back: set[str] = set()  # requests waiting for their KV exchange
        self.is_paused = False  # restore: stop forming micro-batches, let these return
        self.stats = PipelineStats()
        self._tasks: set[asyncio.Task] = set()
        self._receiver: asyncio.Task | None = None

    # ---- event loop side ---------------------------------------------------------------

    def start(self) -> None:
        self._receiver = self._loop.create_task(self._receive_returns())

    async def close(self) -> None:
        if self._receiver is not None:
            self._receiver.cancel()
            await asyncio.gather(self._receiver, return_exceptions=True)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _receive_returns(self) -> None:
        # Every link carries the micro-batches in the same order: return `seq` is
        # micro-batch `seq`.
        for seq in itertools.count():
            try:
                received = await self._transport.recv(
                    link_id(self.group_key, "ret", seq), timeout=IDLE_RECV_TIMEOUT_S
                )
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the group cannot go on
                self._on_failure(exc)
                return
            token_ids = received[0].tolist()
            self._transport.release(received)
            self._returned.append((seq, token_ids))
            self._wakeup.set()

    def _send(self, seq: int, meta: torch.Tensor, hidden: torch.Tensor) -> None:
        task = self._loop.create_task(self._send_async(seq, meta, hidden))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send_async(self, seq: int, meta: torch.Tensor, hidden: torch.Tensor) -> None:
        try:
            with _yielding(self._exchange, self._next):
                handle = await self._transport.send(
                    self._next,
                    link_id(self.group_key, "s1", seq),
                    [meta, hidden],
                    TrafficClass.ACTIVATION,
                )
                await handle.wait()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001
            self._on_failure(exc)

    # ---- engine thread side --------------------------------------------------------------

    @property
    def num_in_flight(self) -> int:
        return len(self._in_flight)

    def has_work(self, engine: LLMEngine) -> bool:
        return bool(self._in_flight) or bool(self._returned) or engine.has_unfinished_requests()

    def step(self, engine: LLMEngine) -> list[RequestOutput]:
        outputs = self._apply_returned(engine)
        num_sent = 0 if self.is_paused else self._fill(engine)
        outputs += engine.pipeline.take_outputs()  # aborts of requests not in flight
        if not outputs and num_sent == 0:
            # Everything is in flight (or held back): sleep until a result or a call.
            self._wakeup.wait(RESULT_WAIT_S)
            self._wakeup.clear()
        return outputs

    def _apply_returned(self, engine: LLMEngine) -> list[RequestOutput]:
        outputs: list[RequestOutput] = []
        while self._returned:
            seq, token_ids = self._returned.popleft()
            item = self._in_flight.pop(seq, None)
            if item is None:
                continue  # a result of a micro-batch this driver no longer waits for
            round_trip_s = time.perf_counter() - item.sent_at
            self.stats.samples_ms.append(round_trip_s * 1000)
            self._on_round_trip(round_trip_s)
            if not any(r.is_sampling for r in item.batch.requests):
                token_ids = []  # the last stage's pad of an empty result
            self.stats.num_tokens_returned += len(token_ids)
            outputs += engine.pipeline.apply_micro_batch(item.batch, token_ids)
        return outputs

    def _fill(self, engine: LLMEngine) -> int:
        num_sent = 0
        while len(self._in_flight) < self.max_in_flight:
            # The engine leaves out the requests in flight; held back: exchange running.
            batch = engine.pipeline.form_micro_batch(self.formation, self.held_back)
            if batch.is_empty:
                break
            self._clock.add(self._cost.batch_s(batch) / self.num_stages)
            self.stats.modelled_busy_s = self._clock.busy_s
            self.stats.modelled_stage_time_s = self.num_stages * self._clock.makespan_s
            started = time.perf_counter()
            result = engine.pipeline.execute_stage(batch, None)
            busy_s = time.perf_counter() - started
            self.stats.busy_s += busy_s
            seq = next(self._seq)
            _stage_span(self.group_key, 0, seq, batch, busy_s)
            self._in_flight[seq] = _InFlight(batch, time.perf_counter())
            self.stats.num_micro_batches += 1
            meta = encode_micro_batch(seq, batch)
            hidden = to_host(result.hidden_states)
            self._loop.call_soon_threadsafe(self._send, seq, meta, hidden)
            num_sent += 1
        return num_sent

    def drop_in_flight(self, engine: LLMEngine) -> list[str]:
        """On the engine thread: forget the micro-batches out (a stage is gone); their
        requests compute those tokens again. Returns their ids."""
        self._in_flight.clear()
        self._returned.clear()
        return engine.pipeline.discard_in_flight()


class StageRunner:
    """A follower stage: receives micro-batches, runs its layers, passes them on."""

    def __init__(
        self,
        group_key: str,
        stage: int,
        num_stages: int,
        transport: Transport,
        run_on_engine: Callable,
        next_address: bytes,
        device: str,
        on_failure: Callable[[BaseException], None],
        exchange: KVExchange | None = None,
        prefetch: int = 2,
    ) -> None:
        self.group_key = group_key
        self.stage = stage
        self.is_last = stage == num_stages - 1
        self._transport = transport
        self._run = run_on_engine  # async: fn(engine) on the engine thread
        self._next = next_address  # stage+1, or stage 0 for the last stage
        self._device = device
        self._on_failure = on_failure
        self._exchange = exchange
        self._prefetch = prefetch
        self._task: asyncio.Task | None = None
        self._sends: set[asyncio.Future] = set()
        self.num_micro_batches = 0
        self.busy_s = 0.0

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run_forever())

    async def close(self) -> None:
        tasks = [t for t in (self._task, *self._sends) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _recv(self, seq: int) -> asyncio.Task:
        return asyncio.ensure_future(
            self._transport.recv(
                link_id(self.group_key, f"s{self.stage}", seq), timeout=IDLE_RECV_TIMEOUT_S
            )
        )

    async def _run_forever(self) -> None:
        pending = collections.deque(self._recv(seq) for seq in range(self._prefetch))
        next_seq = self._prefetch
        try:
            for seq in itertools.count():
                received = await pending.popleft()
                pending.append(self._recv(next_seq))
                next_seq += 1
                await self._handle(seq, received)
        except asyncio.CancelledError:
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            raise
        except Exception as exc:  # noqa: BLE001 - the group cannot go on
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            self._on_failure(exc)

    async def _handle(self, seq: int, received: list[torch.Tensor]) -> None:
        meta_in, hidden_in = received
        _, batch = decode_micro_batch(meta_in)
        hidden = to_device(hidden_in, self._device)
        started = time.perf_counter()
        result = await self._run(lambda engine: engine.pipeline.execute_stage(batch, hidden))
        busy_s = time.perf_counter() - started
        self.busy_s += busy_s
        _stage_span(self.group_key, self.stage, seq, batch, busy_s)
        self.num_micro_batches += 1
        if self.is_last:
            # One token per sampling request, in batch order; [-1] pads an empty list
            # (a micro-batch of prefill chunks only) so the transfer is never empty.
            tokens = result.sampled_token_ids or [-1]
            tensors = [torch.tensor(tokens, dtype=torch.int64)]
            link = "ret"
        else:
            tensors = [meta_in.clone(), to_host(result.hidden_states)]
            link = f"s{self.stage + 1}"
        self._transport.release(received)
        send = asyncio.ensure_future(self._send(link_id(self.group_key, link, seq), tensors))
        self._sends.add(send)
        send.add_done_callback(self._sends.discard)

    async def _send(self, transfer_id: str, tensors: list[torch.Tensor]) -> None:
        try:
            with _yielding(self._exchange, self._next):
                handle = await self._transport.send(
                    self._next, transfer_id, tensors, TrafficClass.ACTIVATION
                )
                await handle.wait()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - the group cannot go on
            self._on_failure(exc)
