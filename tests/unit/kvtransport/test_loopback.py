"""Two transports in one process, over each backend: correctness of the whole protocol."""

from __future__ import annotations

import asyncio

import pytest
import torch

from kvtransport import (
    PeerUnreachable,
    TrafficClass,
    TransferCancelled,
    TransferMismatch,
    TransferStatus,
    TransferTimeout,
)
from kvtransport.config import MIB
from tests.unit.kvtransport.helpers import assert_clean, cached_pattern, pattern, wait_until

ACT = TrafficClass.ACTIVATION


@pytest.mark.parametrize("nbytes", [0, 1, 4095, 65537, 3 * MIB + 7, 64 * MIB])
async def test_sizes_arrive_byte_exact(make_pair, nbytes):
    sender, receiver = await make_pair(kv_chunk_bytes=MIB)
    payload = pattern(nbytes)
    receiving = asyncio.create_task(receiver.recv(f"t-{nbytes}"))
    handle = await sender.send(receiver.address, f"t-{nbytes}", payload)
    (received,) = await receiving
    await handle.wait()
    assert torch.equal(received, payload)
    assert handle.status is TransferStatus.DONE
    assert handle.num_bytes_sent == nbytes
    assert receiver.stats().num_bytes_received == nbytes
    await assert_clean(sender, receiver)


async def test_dtypes_shapes_and_metadata_round_trip(make_pair):
    sender, receiver = await make_pair()
    tensors = [
        torch.randn(3, 5, 7).to(torch.bfloat16),
        torch.zeros(0, 4),
        torch.tensor(42, dtype=torch.int64),
        torch.tensor([True, False, True]),
        torch.randn(600, 300).half(),  # 360 KB: over the inline limit, chunked
        torch.randn(4, 6).t(),  # non-contiguous: sent as a contiguous copy
    ]
    handle = await sender.send(receiver.address, "mixed", tensors, ACT, {"traceparent": "00-1"})
    received = await receiver.recv_transfer("mixed")
    await handle.wait()
    assert received.metadata == {"traceparent": "00-1"}
    assert received.traffic_class is ACT
    assert received.sender_address == sender.address
    for got, sent in zip(received.tensors, tensors, strict=True):
        assert got.dtype == sent.dtype and got.shape == sent.shape
        assert torch.equal(got, sent)


async def test_recv_into_writes_the_given_buffers_in_place(make_pair):
    sender, receiver = await make_pair(kv_chunk_bytes=64 * 1024)
    blocks = [pattern(300_000, salt=1).view(torch.int32), pattern(40, salt=2)]
    staging = [torch.empty(150_000, dtype=torch.bfloat16), torch.empty(5, dtype=torch.int64)]
    receiving = asyncio.create_task(receiver.recv("mig-1-stage-0", into=staging))
    await sender.send(receiver.address, "mig-1-stage-0", blocks)
    received = await receiving
    assert received[0] is staging[0] and received[1] is staging[1]
    assert torch.equal(staging[0].view(torch.int32), blocks[0])
    assert torch.equal(staging[1].view(torch.uint8), blocks[1])


async def test_many_concurrent_transfers_each_arrive_intact(make_pair):
    sender, receiver = await make_pair(kv_chunk_bytes=256 * 1024)
    sizes = [0, 1, 17, 70_000, 1_000_003, 2 * MIB + 1] * 5
    payloads = {f"c{i}": pattern(n, salt=i) for i, n in enumerate(sizes)}
    early = {tid: asyncio.create_task(receiver.recv(tid)) for tid in list(payloads)[::2]}
    handles = [
        await sender.send(receiver.address, tid, data, ACT if i % 3 == 0 else TrafficClass.KV)
        for i, (tid, data) in enumerate(payloads.items())
    ]
    late = {tid: asyncio.create_task(receiver.recv(tid)) for tid in list(payloads)[1::2]}
    received = {tid: (await task)[0] for tid, task in {**early, **late}.items()}
    await asyncio.gather(*(handle.wait() for handle in handles))
    assert all(torch.equal(received[tid], data) for tid, data in payloads.items())
    await assert_clean(sender, receiver)


async def test_recv_timeout_fires_and_a_late_sender_is_rejected(make_pair):
    sender, receiver = await make_pair(kv_chunk_bytes=MIB)
    with pytest.raises(TransferTimeout, match="'late'"):
        await receiver.recv("late", timeout=0.2)
    handle = await sender.send(receiver.address, "late", pattern(5 * MIB))
    handle.pause()  # header and chunk 1 are out; the rest can only be cancelled
    with pytest.raises(TransferCancelled, match="rejected by receiver"):
        await handle.wait()
    with pytest.raises(TransferCancelled, match="abandoned"):
        await receiver.recv("late", timeout=0.2)
    await assert_clean(sender, receiver)
    assert receiver.stats().num_remembered == 1


async def test_mismatched_into_raises_and_cancels_the_sender(make_pair):
    sender, receiver = await make_pair(kv_chunk_bytes=64 * 1024)
    handle = await sender.send(receiver.address, "m", pattern(200_000))
    handle.pause()
    with pytest.raises(TransferMismatch, match=r"into\[0\] has 100 bytes"):
        await receiver.recv("m", into=[torch.empty(100, dtype=torch.uint8)])
    with pytest.raises(TransferCancelled, match="rejected by receiver"):
        await handle.wait()
    await assert_clean(sender, receiver)


async def test_sender_cancel_mid_transfer_leaves_both_sides_clean(make_pair):
    sender, receiver = await make_pair(kv_chunk_bytes=MIB)
    receiving = asyncio.create_task(receiver.recv("x", timeout=30))
    handle = await sender.send(receiver.address, "x", pattern(64 * MIB))
    await wait_until(lambda: handle.num_bytes_sent >= 4 * MIB)
    assert await handle.cancel() is True
    assert handle.status is TransferStatus.CANCELLED
    assert 4 * MIB <= handle.num_bytes_sent < 64 * MIB
    with pytest.raises(TransferCancelled, match="cancelled by its sender"):
        await receiving
    await assert_clean(sender, receiver)
    payload = pattern(3 * MIB, salt=9)
    receiving = asyncio.create_task(receiver.recv("after"))
    await sender.send(receiver.address, "after", payload)
    assert torch.equal((await receiving)[0], payload)


async def test_receiver_cancel_mid_transfer_leaves_both_sides_clean(make_pair):
    sender, receiver = await make_pair(kv_chunk_bytes=MIB)
    into = torch.zeros(64 * MIB, dtype=torch.uint8)
    receiving = asyncio.create_task(receiver.recv("y", into=[into], timeout=30))
    handle = await sender.send(receiver.address, "y", pattern(64 * MIB))
    await wait_until(lambda: receiver.stats().num_bytes_received >= 4 * MIB)
    assert await receiver.cancel_recv("y") is True
    with pytest.raises(TransferCancelled, match="cancelled by the receiver"):
        await receiving
    snapshot = into.clone()  # nothing may write into `into` after cancel_recv returned
    with pytest.raises(TransferCancelled, match="rejected by receiver"):
        await handle.wait()
    await assert_clean(sender, receiver)
    assert torch.equal(into, snapshot)
    assert await receiver.cancel_recv("y") is False


async def test_cancel_before_any_recv_drains_what_was_issued(make_pair):
    sender, receiver = await make_pair(kv_chunk_bytes=MIB, kv_window=4)
    handle = await sender.send(receiver.address, "z", pattern(16 * MIB))
    handle.pause()  # header and 4 chunks issued, 12 not
    await wait_until(lambda: receiver.stats().num_incoming == 1)  # announced, unclaimed
    assert await handle.cancel() is True
    with pytest.raises(TransferCancelled, match="cancelled by its sender"):
        await receiver.recv("z", timeout=5)
    await assert_clean(sender, receiver)


async def test_activation_overtakes_a_256mib_kv_transfer(make_pair):
    sender, receiver = await make_pair()
    kv, activation = cached_pattern(256 * MIB), torch.randn(16, 4096).to(torch.bfloat16)
    kv_received = asyncio.create_task(receiver.recv("kv", timeout=60))
    activation_received = asyncio.create_task(receiver.recv("act"))
    kv_handle = await sender.send(receiver.address, "kv", kv)
    await wait_until(lambda: kv_handle.num_bytes_sent > 0)
    await sender.send(receiver.address, "act", activation, ACT)
    (got_activation,) = await activation_received
    assert not kv_received.done() and not kv_handle.is_finished
    assert torch.equal(got_activation, activation)
    (got_kv,) = await kv_received
    assert torch.equal(got_kv, kv)


async def test_pause_stops_kv_bytes_until_resume(make_pair):
    sender, receiver = await make_pair(kv_chunk_bytes=MIB)
    payload = pattern(64 * MIB)
    receiving = asyncio.create_task(receiver.recv("p", timeout=60))
    handle = await sender.send(receiver.address, "p", payload)
    await wait_until(lambda: handle.num_bytes_sent >= 4 * MIB)
    await handle.pause()
    assert handle.status is TransferStatus.PAUSED
    num_sent = handle.num_bytes_sent
    # What was on the wire when pause() returned may still land (TCP socket buffers).
    await wait_until(lambda: receiver.stats().num_bytes_received == num_sent)
    await asyncio.sleep(0.3)
    assert handle.num_bytes_sent == num_sent
    assert receiver.stats().num_bytes_received == num_sent
    assert not receiving.done()
    handle.resume()
    (received,) = await receiving
    await handle.wait()
    assert torch.equal(received, payload)
    assert handle.status is TransferStatus.DONE


async def test_duplicate_transfer_id_is_rejected(make_pair):
    sender, receiver = await make_pair(kv_chunk_bytes=64 * 1024)
    first = await sender.send(receiver.address, "dup", pattern(200_000, salt=1), ACT)
    second = await sender.send(receiver.address, "dup", pattern(MIB, salt=2))
    second.pause()  # its header is out, most of its chunks are not
    with pytest.raises(TransferCancelled, match="duplicate transfer id"):
        await second.wait()
    (received,) = await receiver.recv("dup")
    assert torch.equal(received, pattern(200_000, salt=1))
    await first.wait()
    await assert_clean(sender, receiver)


async def test_released_buffers_are_reused(make_pair):
    sender, receiver = await make_pair()
    num_allocations = []
    for index in range(4):
        await sender.send(receiver.address, f"r{index}", pattern(MIB, salt=index))
        received = await receiver.recv(f"r{index}")
        assert torch.equal(received[0], pattern(MIB, salt=index))
        assert receiver.release(received) is True
        num_allocations.append(receiver.stats().num_pool_allocations)
    # The first transfer allocates (TCP also stages chunks that beat recv()); later
    # transfers of the same size allocate nothing.
    assert num_allocations[1:] == [num_allocations[0]] * 3
    assert receiver.stats().num_pool_reuses >= 3


async def test_drop_peer_fails_its_transfers_at_once(make_pair):
    sender, receiver = await make_pair(kv_chunk_bytes=MIB)
    handle = await sender.send(receiver.address, "d", pattern(8 * MIB))  # nobody receives
    await sender.drop_peer(receiver.address)
    with pytest.raises(PeerUnreachable, match="control plane"):
        await handle.wait()
    await assert_clean(sender)


async def test_bad_arguments_raise_value_error(make_pair, backend):
    sender, receiver = await make_pair()
    with pytest.raises(ValueError, match="transfer_id"):
        await sender.send(receiver.address, "", torch.zeros(1))
    with pytest.raises(ValueError, match="torch.Tensor"):
        await sender.send(receiver.address, "a", [b"bytes"])
    with pytest.raises(ValueError, match="timeout"):
        await receiver.recv("a", timeout=0)
    with pytest.raises(ValueError, match="contiguous"):
        await receiver.recv("a", into=[torch.zeros(4, 4).t()])
    other_kind = b"tcp:127.0.0.1:1" if backend.value == "ucx" else b"ucx:\x00"
    with pytest.raises(ValueError, match="address"):
        await sender.send(other_kind, "a", torch.zeros(1))


# Chunks of 1 MiB, 256 KiB once activations flow (which they do for a minute after one).
RECHUNKING = dict(
    kv_chunk_bytes=MIB,
    kv_chunk_bytes_with_activations=256 * 1024,
    kv_window=1,
    activation_quiet_s=60.0,
)


async def _let_activations_flow(sender, receiver, transfer_id: str) -> None:
    receiving = asyncio.create_task(receiver.recv(transfer_id))
    await sender.send(receiver.address, transfer_id, torch.ones(8, dtype=torch.bfloat16), ACT)
    await receiving


async def test_a_transfer_rechunked_mid_way_arrives_byte_exact(make_pair):
    sender, receiver = await make_pair(**RECHUNKING)
    payload = pattern(8 * MIB + 5)
    receiving = asyncio.create_task(receiver.recv("kv", timeout=30))
    handle = await sender.send(receiver.address, "kv", payload)
    await handle.pause()  # the header and the first 1 MiB chunk are through
    assert (handle.num_chunks_sent, handle.num_bytes_sent) == (1, MIB)
    await _let_activations_flow(sender, receiver, "act")
    handle.resume()
    (received,) = await receiving
    await handle.wait()
    assert torch.equal(received, payload)
    # 1 chunk of 1 MiB, then 7 MiB + 5 bytes in 256 KiB chunks (28 full, 1 of 5 bytes).
    assert (handle.num_chunks_sent, handle.num_bytes_sent) == (30, 8 * MIB + 5)
    await assert_clean(sender, receiver)  # the receives posted for 1 MiB chunks were withdrawn


async def test_a_queued_transfer_is_rechunked_before_its_first_chunk(make_pair):
    sender, receiver = await make_pair(**RECHUNKING)
    first, second = pattern(MIB, salt=1), pattern(3 * MIB + 1, salt=2)
    first_handle = await sender.send(receiver.address, "first", first)  # fills the window
    second_handle = await sender.send(receiver.address, "second", second)  # header only
    await _let_activations_flow(sender, receiver, "act")
    (got_first,) = await receiver.recv("first")
    (got_second,) = await receiver.recv("second")
    await second_handle.wait()
    assert torch.equal(got_first, first) and torch.equal(got_second, second)
    assert first_handle.num_chunks_sent == 1
    assert second_handle.num_chunks_sent == 13  # 12 x 256 KiB + 1 byte, none of 1 MiB
    await assert_clean(sender, receiver)


async def test_sender_cancel_after_a_rechunk_leaves_both_sides_clean(make_pair):
    sender, receiver = await make_pair(**RECHUNKING)
    receiving = asyncio.create_task(receiver.recv("c", timeout=30))
    handle = await sender.send(receiver.address, "c", pattern(64 * MIB))
    await handle.pause()
    await _let_activations_flow(sender, receiver, "act")
    handle.resume()
    await wait_until(lambda: handle.num_chunks_sent >= 4)
    assert await handle.cancel() is True
    assert handle.num_bytes_sent == MIB + (handle.num_chunks_sent - 1) * 256 * 1024  # rechunked
    with pytest.raises(TransferCancelled, match="cancelled by its sender"):
        await receiving
    await assert_clean(sender, receiver)
    payload = pattern(2 * MIB, salt=3)
    receiving = asyncio.create_task(receiver.recv("after"))
    await sender.send(receiver.address, "after", payload)
    assert torch.equal((await receiving)[0], payload)


async def test_receiver_cancel_after_a_rechunk_stops_every_write(make_pair):
    sender, receiver = await make_pair(**RECHUNKING)
    into = torch.zeros(64 * MIB, dtype=torch.uint8)
    receiving = asyncio.create_task(receiver.recv("y", into=[into], timeout=30))
    handle = await sender.send(receiver.address, "y", pattern(64 * MIB))
    await handle.pause()
    await _let_activations_flow(sender, receiver, "act")
    handle.resume()
    await wait_until(lambda: handle.num_chunks_sent >= 4)
    assert await receiver.cancel_recv("y") is True
    with pytest.raises(TransferCancelled, match="cancelled by the receiver"):
        await receiving
    snapshot = into.clone()
    with pytest.raises(TransferCancelled, match="rejected by receiver"):
        await handle.wait()
    assert handle.num_bytes_sent == MIB + (handle.num_chunks_sent - 1) * 256 * 1024  # rechunked
    await assert_clean(sender, receiver)
    assert torch.equal(into, snapshot)


@pytest.mark.parametrize("is_flowing, num_posted", [(False, 8), (True, 1)])
async def test_receives_posted_ahead_are_one_while_activations_flow(
    make_pair, is_flowing, num_posted
):
    sender, receiver = await make_pair(kv_chunk_bytes=64 * 1024, kv_window=1, activation_quiet_s=60)
    if is_flowing:
        await _let_activations_flow(sender, receiver, "act")
    num_bytes_before = receiver.stats().num_bytes_received
    receiving = asyncio.create_task(receiver.recv("k", timeout=30))
    handle = await sender.send(receiver.address, "k", pattern(MIB))  # 16 chunks
    await handle.pause()  # chunk 1 through, chunks 2..16 held back
    await wait_until(lambda: receiver.stats().num_pending_requests == num_posted)
    for _ in range(20):  # one receive is posted per loop turn: give it turns to go further
        await asyncio.sleep(0)
    assert receiver.stats().num_pending_requests == num_posted
    assert receiver.stats().num_bytes_received - num_bytes_before == 64 * 1024
    handle.resume()
    assert torch.equal((await receiving)[0], pattern(MIB))
    await assert_clean(sender, receiver)
