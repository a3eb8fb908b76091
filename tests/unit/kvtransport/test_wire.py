from __future__ import annotations

import pytest

from kvtransport import TrafficClass, TransportError
from kvtransport.tensors import TensorSpec
from kvtransport.wire import (
    PREFIX,
    CancelTransfer,
    RechunkTransfer,
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


def test_cancel_reject_and_rechunk_round_trip():
    cancel = CancelTransfer("t", 7, 3, "cancel() called")
    reject = RejectTransfer("t", 7, "timeout")
    rechunk = RechunkTransfer("t", 7, 2, 512 * 1024)
    assert decode(memoryview(encode(cancel)))[0] == cancel
    assert decode(memoryview(encode(reject)))[0] == reject
    assert decode(memoryview(encode(rechunk)))[0] == rechunk


def test_truncated_and_garbage_frames_raise_transport_error():
    frame = encode(_header())
    with pytest.raises(TransportError, match="truncated"):
        decode(memoryview(frame[:-5]))
    with pytest.raises(TransportError, match="magic"):
        decode(memoryview(b"XXXX" + frame[4:]))
    with pytest.raises(TransportError, match="too short"):
        decode(memoryview(frame[: PREFIX.size - 1]))
