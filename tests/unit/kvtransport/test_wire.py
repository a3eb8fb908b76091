from __future__ import annotations

import pytest

from kvtransport import TrafficClass, TransportError
from kvtransport.chunks import ChunkRef, plan_chunks
from kvtransport.tensors import TensorSpec
from kvtransport.wire import (
    PREFIX,
    CancelTransfer,
    RejectTransfer,
    TransferHeader,
    decode,
    encode,
    meta_size,
)


def _header(**overrides) -> TransferHeader:
    fields = dict(
        transfer_id="mig-7-stage-0",
        key=0x1234,
        sender=b"ucx:\x00\x01\xff",
        traffic_class=TrafficClass.KV,
        tensors=(TensorSpec("bfloat16", (2, 16, 8)), TensorSpec("float32", (0,))),
        chunk_bytes=4096,
        is_inline=False,
        metadata={"traceparent": "00-abc-def-01"},
    )
    fields.update(overrides)
    return TransferHeader(**fields)


def test_header_round_trips_with_inline_payload():
    header = _header(is_inline=True)
    frame = encode(header, b"\x01\x02\x03")
    decoded, payload = decode(memoryview(frame + b"slot padding"))
    assert decoded == header
    assert bytes(payload) == b"\x01\x02\x03"
    assert meta_size(frame) == len(frame) - 3


def test_cancel_and_reject_round_trip():
    cancel = CancelTransfer("t", 7, 3, "cancel() called")
    reject = RejectTransfer("t", 7, "timeout")
    assert decode(memoryview(encode(cancel)))[0] == cancel
    assert decode(memoryview(encode(reject)))[0] == reject


def test_truncated_and_garbage_frames_raise_transport_error():
    frame = encode(_header())
    with pytest.raises(TransportError, match="truncated"):
        decode(memoryview(frame[:-5]))
    with pytest.raises(TransportError, match="magic"):
        decode(memoryview(b"XXXX" + frame[4:]))
    with pytest.raises(TransportError, match="too short"):
        decode(memoryview(frame[: PREFIX.size - 1]))


def test_chunks_split_tensors_and_skip_empty_ones():
    specs = [TensorSpec("uint8", (10,)), TensorSpec("uint8", (0,)), TensorSpec("int32", (2,))]
    assert plan_chunks(specs, 4) == [
        ChunkRef(1, 0, 0, 4),
        ChunkRef(2, 0, 4, 4),
        ChunkRef(3, 0, 8, 2),
        ChunkRef(4, 2, 0, 4),
        ChunkRef(5, 2, 4, 4),
    ]


def test_chunk_bytes_zero_means_one_chunk_per_tensor():
    specs = [TensorSpec("float16", (3, 5)), TensorSpec("int8", (0, 2)), TensorSpec("uint8", (1,))]
    assert plan_chunks(specs, 0) == [ChunkRef(1, 0, 0, 30), ChunkRef(2, 2, 0, 1)]
