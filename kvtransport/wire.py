"""Messages between transports, their byte encoding, and how a transfer is chunked.

A transfer is one control message (its header, which may carry a small payload inline)
plus numbered chunks. Headers and control messages go to the receiver's mailbox;
chunks go straight into the receiver's buffers once it has posted them.

Control frame (little-endian):

    0       4     5     8          12         16               24        24+M
    | magic | kind| pad | meta_len |   pad    |  payload_len   |  meta   | payload |
                                                                 (JSON)   (raw bytes)

Chunks of a transfer, numbered from 1 (0 is the header), never straddle tensors:

    tensor 0: [ seq 1 | seq 2 | seq 3 ]   tensor 1: [ seq 4 ]   (empty tensors: no chunk)
              <chunk_bytes>
"""

from __future__ import annotations

import bisect
import json
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from enum import IntEnum

from kvtransport.errors import TransportError
from kvtransport.tensors import TensorSpec
from kvtransport.traffic import TrafficClass

MAGIC = b"KVT1"
PREFIX = struct.Struct("<4sB3xI4xQ")
MAX_SEQ = (1 << 24) - 1  # the UCX tag keeps 24 bits for the chunk number
KEY_BITS = 39  # the UCX tag keeps 39 bits for the transfer key (top bit: mailbox)


class MessageKind(IntEnum):
    HEADER = 1
    CANCEL = 2
    REJECT = 3


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


ControlMessage = TransferHeader | CancelTransfer | RejectTransfer


@dataclass(frozen=True)
class ChunkRef:
    """Chunk `seq` is bytes [offset, offset + nbytes) of tensor `tensor_index`."""

    seq: int
    tensor_index: int
    offset: int
    nbytes: int


class ChunkPlan:
    """How a transfer's tensors split into chunks of at most `chunk_bytes` (0: one chunk
    per tensor), computed per chunk on demand: a transfer of many small chunks costs
    the event loop nothing until its chunks are issued (sender) or posted (receiver).
    """

    def __init__(self, sizes: Sequence[int], chunk_bytes: int) -> None:
        self._sizes = list(sizes)
        self._steps = [chunk_bytes or max(size, 1) for size in self._sizes]
        self._first_seqs: list[int] = []  # seq of each tensor's first chunk
        num_chunks = 0
        for size, step in zip(self._sizes, self._steps, strict=True):
            self._first_seqs.append(num_chunks + 1)
            num_chunks += -(-size // step)
        self.num_chunks = num_chunks

    @classmethod
    def of(cls, specs: Sequence[TensorSpec], chunk_bytes: int) -> ChunkPlan:
        return cls([spec.nbytes for spec in specs], chunk_bytes)

    def chunk(self, seq: int) -> ChunkRef:
        """Chunk `seq` (1 .. num_chunks)."""
        if not 1 <= seq <= self.num_chunks:
            raise IndexError(f"chunk {seq} out of 1..{self.num_chunks}")
        # The last tensor starting at or before seq; empty tensors share the next
        # tensor's first seq, so bisect_right picks the non-empty one.
        index = bisect.bisect_right(self._first_seqs, seq) - 1
        offset = (seq - self._first_seqs[index]) * self._steps[index]
        return ChunkRef(seq, index, offset, min(self._steps[index], self._sizes[index] - offset))

    def __iter__(self) -> Iterator[ChunkRef]:
        return (self.chunk(seq) for seq in range(1, self.num_chunks + 1))


def plan_chunks(specs: Sequence[TensorSpec], chunk_bytes: int) -> list[ChunkRef]:
    """Every chunk of `ChunkPlan.of(specs, chunk_bytes)`, in order."""
    return list(ChunkPlan.of(specs, chunk_bytes))


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
