"""PeerScheduler against a fake link: exact issue order, window, pause, cancel, timeout."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from kvtransport import (
    PeerUnreachable,
    SchedulingPolicy,
    TrafficClass,
    TransferCancelled,
    TransferStatus,
    TransferTimeout,
    TransportConfig,
)
from kvtransport.chunks import ChunkPlan
from kvtransport.fabric import ChunkOut, ControlOut, PeerLink
from kvtransport.handles import SendHandle
from kvtransport.outbound import Outbound, TransferMessages
from kvtransport.priority import PeerScheduler, kv_chunk_bytes
from kvtransport.traffic import ActivationFlow
from kvtransport.wire import MAGIC, CancelTransfer, RechunkTransfer, decode
from tests.clock import FakeClock

KV, ACT = TrafficClass.KV, TrafficClass.ACTIVATION


class FakeLink(PeerLink):
    def __init__(self) -> None:
        self.sent: list[tuple[object, asyncio.Future]] = []
        self.is_aborted = False

    def start_send(self, message):
        future = asyncio.get_running_loop().create_future()
        self.sent.append((message, future))
        return future

    async def abort(self) -> None:
        self.is_aborted = True

    def labels(self) -> list[str]:
        return [_label(message) for message, _ in self.sent]

    def complete(self, label: str) -> None:
        for message, future in self.sent:
            if _label(message) == label and not future.done():
                future.set_result(None)
                return
        raise AssertionError(f"{label} not in flight; sent: {self.labels()}")


def _label(message) -> str:
    if isinstance(message, ChunkOut):
        return f"{message.key}:{message.seq}"
    if message.frame.startswith(MAGIC):
        control = decode(memoryview(message.frame))[0]
        if isinstance(control, RechunkTransfer):
            return f"rechunk:{control.key}:{control.num_chunks_kept}:{control.chunk_bytes}"
        assert isinstance(control, CancelTransfer)
        return f"cancel:{control.key}:{control.num_chunks_issued}"
    return message.frame.decode()


class Harness:
    def __init__(self, **config_kwargs) -> None:
        self.link = FakeLink()
        self.clock = FakeClock(1000.0)
        self.finished: list[str] = []
        self.failed: list[PeerScheduler] = []
        config = TransportConfig(**config_kwargs)
        self.activations = ActivationFlow(config.activation_quiet_s, clock=self.clock)
        self.scheduler = PeerScheduler(
            b"peer",
            self.link,
            config,
            lambda outbound: self.finished.append(outbound.handle.transfer_id),
            self.failed.append,
            self.activations,
        )

    def submit(
        self, key: int, traffic_class: TrafficClass, num_chunks: int, chunk_bytes: int = 10
    ) -> SendHandle:
        """A transfer of num_chunks chunks of chunk_bytes (one tensor); chunk labels are
        'key:seq', the header's 'hdr<key>'."""
        name = f"{traffic_class.value}{key}"
        num_bytes = chunk_bytes * num_chunks
        messages = TransferMessages(
            ControlOut(f"hdr{key}".encode(), traffic_class, 0),
            key,
            ChunkPlan([num_bytes], chunk_bytes),
            [np.zeros(num_bytes, dtype=np.uint8)],
            traffic_class,
        )
        handle = SendHandle(name, traffic_class, num_bytes, self.scheduler)
        self.scheduler.submit(Outbound(handle, key, messages, []))
        return handle


async def settle() -> None:
    for _ in range(3):
        await asyncio.sleep(0)


async def test_activation_is_issued_at_once_while_kv_fills_its_window():
    h = Harness(kv_window=2, kv_window_with_activations=2)
    kv = h.submit(1, KV, num_chunks=4)
    assert h.link.labels() == ["hdr1", "1:1", "1:2"]  # headers never count
    assert kv.status is TransferStatus.SENDING
    h.submit(2, ACT, num_chunks=2)
    assert h.link.labels() == ["hdr1", "1:1", "1:2", "hdr2", "2:1", "2:2"]
    h.link.complete("1:1")
    await settle()
    assert h.link.labels()[-1] == "1:3"


async def test_activations_narrow_the_kv_window_until_they_go_quiet():
    h = Harness(kv_window=2, kv_window_with_activations=1, activation_quiet_s=0.2)
    h.submit(1, ACT, num_chunks=0)
    h.submit(2, KV, num_chunks=4)
    assert h.link.labels() == ["hdr1", "hdr2", "2:1"]  # one KV chunk on the wire, not two
    h.link.complete("2:1")
    h.clock.now += 0.1  # within activation_quiet_s of the activation: one KV chunk at a time
    await settle()
    assert h.link.labels() == ["hdr1", "hdr2", "2:1", "2:2"]
    h.clock.now += 0.15  # no activation for longer than activation_quiet_s (0.25 s > 0.2 s)
    h.link.complete("2:2")
    await settle()
    assert h.link.labels() == ["hdr1", "hdr2", "2:1", "2:2", "2:3", "2:4"]  # window 2 again


async def test_a_kv_window_wider_than_one_stays_after_activations_when_configured():
    h = Harness(kv_window=3, kv_window_with_activations=3)
    h.submit(1, ACT, num_chunks=0)
    h.submit(2, KV, num_chunks=4)
    assert h.link.labels() == ["hdr1", "hdr2", "2:1", "2:2", "2:3"]


def test_window_settings_are_validated():
    with pytest.raises(ValueError, match="kv_window_with_activations must be an integer"):
        TransportConfig(kv_window_with_activations=0)
    with pytest.raises(ValueError, match="activation_quiet_s must be a number"):
        TransportConfig(activation_quiet_s=-1)


async def test_a_received_activation_narrows_the_kv_window_too():
    h = Harness(kv_window=2, kv_window_with_activations=1)
    h.activations.note_activation()  # what the receiver does on an activation's header
    h.submit(1, KV, num_chunks=3)
    assert h.link.labels() == ["hdr1", "1:1"]


KIB = 1024
SMALL_CHUNKS = dict(kv_chunk_bytes=16 * KIB, kv_chunk_bytes_with_activations=4 * KIB)


def test_kv_chunks_are_planned_smaller_while_activations_flow_except_in_fifo():
    clock = FakeClock(10.0)
    activations = ActivationFlow(0.5, clock=clock)
    priority = TransportConfig(**SMALL_CHUNKS)
    fifo = TransportConfig(scheduling=SchedulingPolicy.FIFO, **SMALL_CHUNKS)
    assert kv_chunk_bytes(priority, activations) == 16 * KIB
    activations.note_activation()
    assert kv_chunk_bytes(priority, activations) == 4 * KIB
    assert kv_chunk_bytes(fifo, activations) == 16 * KIB
    larger = TransportConfig(kv_chunk_bytes=16 * KIB, kv_chunk_bytes_with_activations=64 * KIB)
    assert kv_chunk_bytes(larger, activations) == 16 * KIB  # never above kv_chunk_bytes
    clock.now += 0.5
    assert kv_chunk_bytes(priority, activations) == 16 * KIB


async def test_a_transfer_planned_in_quiet_times_is_rechunked_once_activations_flow():
    h = Harness(kv_window=1, **SMALL_CHUNKS)
    kv = h.submit(1, KV, num_chunks=4, chunk_bytes=16 * KIB)  # seqs 1..4
    assert h.link.labels() == ["hdr1", "1:1"]
    h.submit(2, ACT, num_chunks=0)
    h.link.complete("1:1")
    await settle()
    # Chunk 1 stays; the other 48 KiB go as 12 chunks of 4 KiB, seqs 5..16, and the
    # receiver is told before the first of them.
    assert h.link.labels() == ["hdr1", "1:1", "hdr2", f"rechunk:1:1:{4 * KIB}", "1:5"]
    for seq in range(5, 17):
        h.link.complete(f"1:{seq}")
        await settle()
    assert h.link.labels()[4:] == [f"1:{seq}" for seq in range(5, 17)]
    h.link.complete("hdr1")
    await kv.wait()
    assert kv.num_bytes_sent == 64 * KIB


async def test_rechunked_chunks_stay_small_after_activations_go_quiet():
    h = Harness(kv_window=2, activation_quiet_s=0.2, **SMALL_CHUNKS)
    h.submit(1, ACT, num_chunks=0)
    h.submit(2, KV, num_chunks=8, chunk_bytes=4 * KIB)  # as Sender plans while they flow
    assert h.link.labels() == ["hdr1", "hdr2", "2:1"]
    h.clock.now += 1.0  # quiet again: the window widens, the chunk size stays
    h.link.complete("2:1")
    await settle()
    assert h.link.labels() == ["hdr1", "hdr2", "2:1", "2:2", "2:3"]
    assert not any(label.startswith("rechunk") for label in h.link.labels())


async def test_a_paused_transfer_is_rechunked_on_resume_and_its_cancel_counts_positions():
    h = Harness(kv_window=1, **SMALL_CHUNKS)
    kv = h.submit(1, KV, num_chunks=2, chunk_bytes=16 * KIB)
    pausing = kv.pause()
    h.link.complete("hdr1")
    h.link.complete("1:1")
    await pausing
    h.submit(2, ACT, num_chunks=0)
    kv.resume()
    await settle()
    assert h.link.labels() == ["hdr1", "1:1", "hdr2", f"rechunk:1:1:{4 * KIB}", "1:3"]
    h.link.complete("1:3")
    await settle()
    cancelling = asyncio.create_task(kv.cancel())
    await settle()
    h.link.complete("1:4")
    assert await cancelling is True
    # Issued: position 1 (seq 1), 2 (seq 3), 3 (seq 4): what the receiver must drain.
    assert h.link.labels()[-1] == "cancel:1:3"
    assert kv.num_bytes_sent == 24 * KIB


async def test_no_rechunk_in_fifo_or_for_chunks_already_small():
    fifo = Harness(kv_window=1, scheduling=SchedulingPolicy.FIFO, **SMALL_CHUNKS)
    fifo.activations.note_activation()
    fifo.submit(1, KV, num_chunks=2, chunk_bytes=16 * KIB)
    for label in ("hdr1", "1:1"):  # FIFO: one message at a time, the header too
        fifo.link.complete(label)
        await settle()
    assert fifo.link.labels() == ["hdr1", "1:1", "1:2"]
    small = Harness(kv_window=1, **SMALL_CHUNKS)
    small.submit(1, KV, num_chunks=3, chunk_bytes=4 * KIB)
    small.activations.note_activation()
    small.link.complete("1:1")
    await settle()
    assert small.link.labels() == ["hdr1", "1:1", "1:2"]


async def test_fifo_makes_the_activation_wait_for_every_kv_chunk():
    h = Harness(kv_window=2, scheduling=SchedulingPolicy.FIFO)
    h.submit(1, KV, num_chunks=2)
    h.submit(2, ACT, num_chunks=0)
    assert h.link.labels() == ["hdr1", "1:1"]
    h.link.complete("hdr1")
    await settle()
    assert h.link.labels() == ["hdr1", "1:1", "1:2"]
    h.link.complete("1:1")
    await settle()
    assert h.link.labels() == ["hdr1", "1:1", "1:2", "hdr2"]


async def test_pause_stops_new_chunks_and_lets_the_next_kv_transfer_go():
    h = Harness(kv_window=1)
    first = h.submit(1, KV, num_chunks=3)
    second = h.submit(2, KV, num_chunks=1)
    assert h.link.labels() == ["hdr1", "1:1", "hdr2"]
    pausing = first.pause()
    assert first.status is TransferStatus.PAUSED
    await settle()
    assert not pausing.done()  # hdr1 and 1:1 are still in flight
    h.link.complete("hdr1")
    h.link.complete("1:1")
    await pausing
    await settle()
    assert h.link.labels() == ["hdr1", "1:1", "hdr2", "2:1"]
    h.link.complete("hdr2")
    h.link.complete("2:1")
    await settle()
    assert second.status is TransferStatus.DONE
    assert h.link.labels() == ["hdr1", "1:1", "hdr2", "2:1"]  # nothing of the paused one
    first.resume()
    assert first.status is TransferStatus.SENDING
    assert h.link.labels()[-1] == "1:2"


async def test_cancel_tells_the_receiver_how_many_chunks_were_issued():
    h = Harness(kv_window=2)
    handle = h.submit(7, KV, num_chunks=5)
    assert h.link.labels() == ["hdr7", "7:1", "7:2"]
    cancelling = asyncio.create_task(handle.cancel())
    await settle()
    assert h.link.labels()[-1] == "cancel:7:2"
    assert not cancelling.done()  # the header and chunks 1 and 2 are still in flight
    h.link.complete("hdr7")
    h.link.complete("7:1")
    h.link.complete("7:2")
    assert await cancelling is True
    assert handle.status is TransferStatus.CANCELLED
    assert handle.num_bytes_sent == 20
    with pytest.raises(TransferCancelled):
        await handle.wait()
    assert h.finished == ["kv7"]
    assert "7:3" not in h.link.labels()


async def test_cancel_after_everything_was_issued_returns_false_and_completes():
    h = Harness(kv_window=4)
    handle = h.submit(3, KV, num_chunks=1)
    cancelling = asyncio.create_task(handle.cancel())
    await settle()
    h.link.complete("hdr3")
    h.link.complete("3:1")
    assert await cancelling is False
    assert handle.status is TransferStatus.DONE


async def test_a_send_that_never_completes_fails_the_peer_after_the_timeout():
    h = Harness(kv_window=1, send_timeout_s=0.05)
    stuck = h.submit(1, KV, num_chunks=2)
    other = h.submit(2, ACT, num_chunks=0)
    h.link.complete("hdr2")
    await settle()
    assert other.status is TransferStatus.DONE
    waiting = h.submit(3, KV, num_chunks=1)
    with pytest.raises(TransferTimeout):
        await stuck.wait()
    with pytest.raises(PeerUnreachable):
        await waiting.wait()
    assert h.failed == [h.scheduler]
    # Best effort, the peer may be alive: each started transfer says what was issued.
    cancels = [label for label in h.link.labels() if label.startswith("cancel")]
    assert cancels == ["cancel:1:1", "cancel:3:0"]
