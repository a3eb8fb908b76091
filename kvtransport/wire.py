"""Messages between transports, their byte encoding, and how a transfer is chunked.

A transfer is one control message (its header, which may carry a small payload inline)
plus numbered chunks. Headers and control messages go to the receiver's mailbox;
chunks go straight into the receiver's buffers once it has posted them.

Control frame (little-endian):

    0       4     5     8          12         16               24        24+M
    | magic | kind| pad | meta_len |   pad    |  payload_len   |  meta   | payload |
                                                                 (JSON)   (raw bytes)

How chunks are numbered and cut: chunks.py.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from enum import IntEnum

from kvtransport.errors import TransportError
from kvtransport.tensors import TensorSpec
from kvtransport.traffic import TrafficClass

MAGIC = b"KVT1"
PREFIX = struct.Struct("<4sB3xI4xQ")
KEY_BITS = 39  # the UCX tag keeps 39 bits for the transfer key (top bit: mailbox)


class MessageKind(IntEnum):
    HEADER = 1
    CANCEL = 2
    REJECT = 3
    RECHUNK = 4


@dataclass(frozen=True)
class TransferHeader:
    """Announces a transfer: who sends it, what tensors, how it is chunked."""

    transfer_id: str
    key: int  # sender-chosen number naming this transfer's chunks on the wire
    sender: bytes  # the sender's transport address (where to send a Reject)
    traffic_class: TrafficClass
    tensors: tuple[TensorSpec, ...]
    chunk_bytes: int  # 0: one chunk per tensor
    is_inline: bool  # the payload follows the header in the same message
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def num_bytes_total(self) -> int:
        return sum(spec.nbytes for spec in self.tensors)


@dataclass(frozen=True)
class CancelTransfer:
    """Sender -> receiver: no chunk after `num_chunks_issued` will come."""

    transfer_id: str
    key: int
    num_chunks_issued: int
    reason: str


@dataclass(frozen=True)
class RejectTransfer:
    """Receiver -> sender: stop sending this transfer (timeout, cancel, mismatch)."""

    transfer_id: str
    key: int
    reason: str


@dataclass(frozen=True)
class RechunkTransfer:
    """Sender -> receiver: the chunks after the first `num_chunks_kept` (in issue order)
    are cut every `chunk_bytes` from now on (chunks.ChunkPlan.rechunk). Sent in the
    transfer's class, so it reaches the receiver after the header and before a Cancel."""

    transfer_id: str
    key: int
    num_chunks_kept: int
    chunk_bytes: int


ControlMessage = TransferHeader | CancelTransfer | RejectTransfer | RechunkTransfer


def encode(message: ControlMessage, payload: bytes | memoryview = b"") -> bytes:
    """Frame a control message (and, for an inline header, its payload)."""
    if isinstance(message, TransferHeader):
        kind, meta = MessageKind.HEADER, _header_to_json(message)
    elif isinstance(message, CancelTransfer):
        kind = MessageKind.CANCEL
        meta = {
            "transfer_id": message.transfer_id,
            "key": message.key,
            "num_chunks_issued": message.num_chunks_issued,
            "reason": message.reason,
        }
    elif isinstance(message, RechunkTransfer):
        kind = MessageKind.RECHUNK
        meta = {
            "transfer_id": message.transfer_id,
            "key": message.key,
            "num_chunks_kept": message.num_chunks_kept,
            "chunk_bytes": message.chunk_bytes,
        }
    else:
        kind = MessageKind.REJECT
        meta = {"transfer_id": message.transfer_id, "key": message.key, "reason": message.reason}
    meta_bytes = json.dumps(meta, separators=(",", ":")).encode()
    return b"".join((PREFIX.pack(MAGIC, kind, len(meta_bytes), len(payload)), meta_bytes, payload))


def meta_size(frame: bytes) -> int:
    """Bytes of a frame that are not payload (what `max_header_bytes` limits)."""
    return PREFIX.size + PREFIX.unpack_from(frame)[2]


def decode(buffer: memoryview) -> tuple[ControlMessage, memoryview]:
    """Parse a frame at the start of `buffer` (which may be longer); payload is a view."""
    if len(buffer) < PREFIX.size:
        raise TransportError(f"control frame too short: {len(buffer)} bytes")
    magic, kind, meta_len, payload_len = PREFIX.unpack_from(buffer)
    if magic != MAGIC:
        raise TransportError(f"bad control frame magic {bytes(magic)!r}")
    meta_end = PREFIX.size + meta_len
    if len(buffer) < meta_end + payload_len:
        raise TransportError(
            f"control frame truncated: needs {meta_end + payload_len} bytes, has {len(buffer)}"
        )
    try:
        meta = json.loads(bytes(buffer[PREFIX.size : meta_end]))
        if kind == MessageKind.HEADER:
            message: ControlMessage = _header_from_json(meta)
        elif kind == MessageKind.CANCEL:
            message = CancelTransfer(
                meta["transfer_id"], meta["key"], meta["num_chunks_issued"], meta["reason"]
            )
        elif kind == MessageKind.REJECT:
            message = RejectTransfer(meta["transfer_id"], meta["key"], meta["reason"])
        elif kind == MessageKind.RECHUNK:
            message = RechunkTransfer(
                meta["transfer_id"], meta["key"], meta["num_chunks_kept"], meta["chunk_bytes"]
            )
        else:
            raise TransportError(f"unknown control message kind {kind}")
    except (KeyError, TypeError, ValueError) as exc:
        raise TransportError(f"malformed control message: {exc}") from exc
    return message, buffer[meta_end : meta_end + payload_len]


def _header_to_json(header: TransferHeader) -> dict:
    return {
        "transfer_id": header.transfer_id,
        "key": header.key,
        "sender": header.sender.hex(),
        "traffic_class": header.traffic_class.value,
        "tensors": [[spec.dtype, list(spec.shape)] for spec in header.tensors],
        "chunk_bytes": header.chunk_bytes,
        "is_inline": header.is_inline,
        "metadata": header.metadata,
    }


def _header_from_json(meta: dict) -> TransferHeader:
    return TransferHeader(
        transfer_id=meta["transfer_id"],
        key=meta["key"],
        sender=bytes.fromhex(meta["sender"]),
        traffic_class=TrafficClass(meta["traffic_class"]),
        tensors=tuple(TensorSpec(dtype, tuple(shape)) for dtype, shape in meta["tensors"]),
        chunk_bytes=meta["chunk_bytes"],
        is_inline=meta["is_inline"],
        metadata=dict(meta["metadata"]),
    )
