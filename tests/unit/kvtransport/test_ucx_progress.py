"""UCX progress: fine slices only while activations flow (then one progress pending at
a time, headers settled first), long slices settled once otherwise (UCX only)."""

from __future__ import annotations

import asyncio
import contextlib

import pytest
import torch

from kvtransport import Backend, TrafficClass, TransportConfig, make_transport
from kvtransport.config import MIB
from kvtransport.traffic import ActivationFlow
from kvtransport.ucx_worker import UcxWorker
from tests.clock import FakeClock
from tests.unit.kvtransport.helpers import assert_clean, pattern

QUIET_S = 0.3


def _worker(transport):
    return transport._fabric._worker


async def _round_trip(sender, receiver, transfer_id, payload, traffic_class):
    receiving = asyncio.create_task(receiver.recv(transfer_id))
    handle = await sender.send(receiver.address, transfer_id, payload, traffic_class)
    (received,) = await receiving
    await handle.wait()
    assert torch.equal(received, payload)


@contextlib.asynccontextmanager
async def _ucx_pair(**config_kwargs):
    config = TransportConfig(backend=Backend.UCX, **config_kwargs)
    sender, receiver = make_transport(config), make_transport(config)
    await sender.start()
    await receiver.start()
    try:
        yield sender, receiver
        await assert_clean(sender, receiver)
    finally:
        await sender.close()
        await receiver.close()


async def test_activations_switch_both_ends_to_fine_slices_until_quiet():
    async with _ucx_pair(kv_chunk_bytes=MIB, activation_quiet_s=QUIET_S) as (sender, receiver):
        clock = FakeClock(1000.0)  # the quiet time passes when the test says so
        sender._activations._clock = receiver._activations._clock = clock
        # KV alone (3 MiB in 1 MiB chunks, 4 messages) leaves both in bulk mode.
        await _round_trip(sender, receiver, "kv-0", pattern(3 * MIB + 5), TrafficClass.KV)
        assert not _worker(sender).is_latency_mode
        assert not _worker(receiver).is_latency_mode
        # One activation: the sender on issuing it, the receiver on its header.
        act = pattern(200_000, salt=3)  # over the inline limit: header and a chunk
        await _round_trip(sender, receiver, "act-0", act, TrafficClass.ACTIVATION)
        assert _worker(sender).is_latency_mode
        assert _worker(receiver).is_latency_mode
        # KV meanwhile still arrives byte-exact in the fine-sliced mode.
        await _round_trip(sender, receiver, "kv-1", pattern(5 * MIB, salt=4), TrafficClass.KV)
        clock.now += QUIET_S - 0.05
        assert _worker(sender).is_latency_mode
        assert _worker(receiver).is_latency_mode
        clock.now += 0.1  # no activation for longer than activation_quiet_s
        assert not _worker(sender).is_latency_mode
        assert not _worker(receiver).is_latency_mode


async def test_zero_quiet_time_never_enters_fine_slices():
    async with _ucx_pair(activation_quiet_s=0) as (sender, receiver):
        act = pattern(32 * 1024, salt=5)  # inline: the header carries it
        await _round_trip(sender, receiver, "act-0", act, TrafficClass.ACTIVATION)
        assert not _worker(sender).is_latency_mode
        assert not _worker(receiver).is_latency_mode


# -- the progress rules, on a stand-in for the UCP worker (exact step counts) ---------


class FakeRequest:
    def __init__(self) -> None:
        self.completed = False

    def check_error(self) -> None:
        pass


class FakeUcpWorker:
    """progress_once() runs the next step (completing requests, say) and reports
    progress while steps remain, like a worker with that many events queued."""

    def __init__(self, steps) -> None:
        self.steps = list(steps)
        self.num_progress_calls = 0

    def progress_once(self) -> bool:
        if not self.steps:
            return False
        self.num_progress_calls += 1
        self.steps.pop(0)()
        return True

    def arm(self) -> bool:
        return True


def _fake_worker(steps, is_flowing: bool) -> tuple[UcxWorker, FakeUcpWorker]:
    clock = FakeClock(100.0)
    activations = ActivationFlow(1.0, clock=clock)
    if is_flowing:
        activations.note_activation()
    worker = UcxWorker({}, False, activations)
    worker._loop = asyncio.get_running_loop()
    worker._worker = fake = FakeUcpWorker(steps)
    return worker, fake


def _pend(worker: UcxWorker, target, *, is_callback: bool = False) -> FakeRequest:
    """A pending request as tag_recv / tag_recv_callback (is_callback) leave it."""
    request, endpoint = FakeRequest(), "scope"
    worker._pending[request] = (target, None, endpoint)
    worker._requests_by_endpoint.setdefault(endpoint, set()).add(request)
    if is_callback:
        worker._callback_requests.add(request)
    return request


def _complete(request: FakeRequest):
    return lambda: setattr(request, "completed", True)


async def test_latency_mode_progress_stops_at_the_first_completion():
    loop = asyncio.get_running_loop()
    chunks = [FakeRequest() for _ in range(3)]
    worker, fake = _fake_worker([_complete(chunk) for chunk in chunks], is_flowing=True)
    futures = [loop.create_future() for _ in chunks]
    for chunk, future in zip(chunks, futures, strict=True):
        worker._pending[chunk] = (future, None, "scope")
    worker._progress()
    assert fake.num_progress_calls == 1  # one chunk copied, then the loop gets a turn
    assert [future.done() for future in futures] == [True, False, False]
    assert worker._is_progress_scheduled


async def test_bulk_progress_runs_on_and_settles_once():
    loop = asyncio.get_running_loop()
    delivered = []
    worker, fake = _fake_worker([], is_flowing=False)
    chunks = [_pend(worker, loop.create_future()) for _ in range(4)]
    mailbox = _pend(worker, delivered.append, is_callback=True)
    fake.steps = [_complete(chunks[0]), _complete(chunks[1]), _complete(mailbox)]
    fake.steps += [_complete(chunks[2]), _complete(chunks[3])]
    worker._progress()
    assert fake.num_progress_calls == 5  # on until nothing progresses (or 2 ms)
    assert delivered == [None]
    assert not worker._pending
    assert not worker._is_progress_scheduled  # armed: the next event wakes it


async def test_callback_receives_settle_before_the_futures_of_chunks():
    loop = asyncio.get_running_loop()
    order = []
    worker, fake = _fake_worker([], is_flowing=False)
    chunk_future = loop.create_future()
    chunk_future.add_done_callback(lambda _: order.append("chunk callback"))
    chunk = _pend(worker, chunk_future)
    header = _pend(worker, lambda error: order.append("header delivered"), is_callback=True)
    chunk.completed = header.completed = True  # the chunk was registered first
    assert worker._settle(is_latency_mode=True) == 2
    await asyncio.sleep(0)
    assert order == ["header delivered", "chunk callback"]


@pytest.mark.parametrize("is_flowing, num_progress_calls", [(True, 0), (False, 1)])
async def test_a_readable_fd_adds_no_progress_to_a_scheduled_one_while_activations_flow(
    is_flowing, num_progress_calls
):
    worker, fake = _fake_worker([], is_flowing=is_flowing)
    calls = []
    worker._progress = lambda: calls.append("progress")
    worker._is_progress_scheduled = True  # a sliced progress asked for the next loop turn
    worker._on_readable()  # the epoll fd stays readable while nothing re-arms it
    assert len(calls) == num_progress_calls
    worker._is_progress_scheduled = False
    worker._on_readable()  # nothing scheduled: the fd is what wakes progress
    assert len(calls) == num_progress_calls + 1
