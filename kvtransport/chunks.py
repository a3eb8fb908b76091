"""How a transfer's bytes split into chunks, in the order the sender issues them.

A chunk never straddles tensors. The header's plan numbers chunks from 1 (0 is the
header), so at first a chunk's position in the issue order is its seq:

    tensor 0: [ seq 1 | seq 2 | seq 3 ]   tensor 1: [ seq 4 ]   (empty tensors: no chunk)
              <chunk_bytes>

`rechunk(n, chunk_bytes)` keeps positions 1..n and re-plans the bytes after them in
chunks of the new size, numbered after every seq any plan of this transfer used, so a
receive posted for an abandoned seq can never match a chunk of the new plan:

    position:  1        2        3    4    5    6    7    8    9
    seq:       1        2        4    5    6    7    8    9    10     (old seq 3: never sent)
             [ 4 MiB  | 4 MiB  | 1  | 1  | 1  | 1  | 1  | 1  | 1  ]  <- rechunk(2, 1 MiB)

Sender and receiver apply the same rechunks (the sender tells with RechunkTransfer, in
order with its Cancel), so both map a position to the same (seq, tensor, offset, size).
Chunks are computed on demand: many small chunks cost nothing until used.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator, Sequence
from typing import NamedTuple

from kvtransport.tensors import TensorSpec

MAX_SEQ = (1 << 24) - 1  # the UCX tag keeps 24 bits for the chunk number


class ChunkRef(NamedTuple):
    """Chunk `seq` is bytes [offset, offset + nbytes) of tensor `tensor_index`."""

    seq: int
    tensor_index: int
    offset: int
    nbytes: int


class _Range(NamedTuple):
    tensor_index: int
    start: int
    nbytes: int


class _Segment:
    """Consecutive positions whose chunks cut `ranges` every `chunk_bytes` (0: one chunk
    per range), numbered from `first_seq`."""

    def __init__(
        self, first_position: int, first_seq: int, ranges: list[_Range], chunk_bytes: int
    ) -> None:
        self.first_position = first_position
        self.first_seq = first_seq
        self.chunk_bytes = chunk_bytes
        self._ranges = ranges
        self._steps = [chunk_bytes or max(r.nbytes, 1) for r in ranges]
        self._first_indexes: list[int] = []  # index of each range's first chunk
        num_chunks = 0
        for item, step in zip(ranges, self._steps, strict=True):
            self._first_indexes.append(num_chunks)
            num_chunks += -(-item.nbytes // step)
        self.num_chunks = num_chunks  # lowered when a rechunk replaces the tail

    def chunk(self, index: int) -> ChunkRef:
        """The segment's chunk `index` (from 0)."""
        position, offset = self._locate(index)
        item, step = self._ranges[position], self._steps[position]
        return ChunkRef(
            self.first_seq + index,
            item.tensor_index,
            item.start + offset,
            min(step, item.nbytes - offset),
        )

    def ranges_from(self, index: int) -> list[_Range]:
        """The bytes of chunks index, index + 1, ... of this segment."""
        position, offset = self._locate(index)
        item = self._ranges[position]
        head = _Range(item.tensor_index, item.start + offset, item.nbytes - offset)
        return [head, *self._ranges[position + 1 :]]

    def _locate(self, index: int) -> tuple[int, int]:
        """(which range, offset in it) of chunk `index`."""
        # Empty ranges share the next range's first index; bisect_right skips them.
        position = bisect.bisect_right(self._first_indexes, index) - 1
        return position, (index - self._first_indexes[position]) * self._steps[position]


class ChunkPlan:
    """Chunk positions 1..num_chunks of one transfer, and what each one carries."""

    def __init__(self, sizes: Sequence[int], chunk_bytes: int) -> None:
        ranges = [_Range(index, 0, size) for index, size in enumerate(sizes)]
        segment = _Segment(1, 1, ranges, chunk_bytes)
        self._segments = [segment]
        self._first_positions = [1]  # of each segment, for bisect
        self._next_seq = 1 + segment.num_chunks  # no plan used it yet
        self.num_chunks = segment.num_chunks
        self.chunk_bytes = chunk_bytes  # of the chunks after the last rechunk (0: per tensor)

    @classmethod
    def of(cls, specs: Sequence[TensorSpec], chunk_bytes: int) -> ChunkPlan:
        return cls([spec.nbytes for spec in specs], chunk_bytes)

    def chunk(self, position: int) -> ChunkRef:
        """The chunk issued at `position` (1 .. num_chunks)."""
        if not 1 <= position <= self.num_chunks:
            raise IndexError(f"chunk position {position} out of 1..{self.num_chunks}")
        if len(self._segments) == 1:
            return self._segments[0].chunk(position - 1)
        segment = self._segments[bisect.bisect_right(self._first_positions, position) - 1]
        return segment.chunk(position - segment.first_position)

    def can_rechunk(self, num_kept: int, chunk_bytes: int) -> bool:
        """Whether rechunk(num_kept, chunk_bytes) is valid: chunks remain after num_kept,
        no earlier than the last rechunk, and the new seqs fit the wire's seq field."""
        last = self._segments[-1]
        if not last.first_position - 1 <= num_kept < self.num_chunks:
            return False
        remaining = self._remaining(num_kept)
        return self._next_seq - 1 + _Segment(0, 0, remaining, chunk_bytes).num_chunks <= MAX_SEQ

    def rechunk(self, num_kept: int, chunk_bytes: int) -> None:
        """Keep positions 1..num_kept; cut the bytes after them every `chunk_bytes`."""
        if not self.can_rechunk(num_kept, chunk_bytes):
            raise ValueError(
                f"cannot rechunk after {num_kept} of {self.num_chunks} chunks "
                f"(last rechunk at {self._segments[-1].first_position - 1}, seq {self._next_seq})"
            )
        remaining = self._remaining(num_kept)
        last = self._segments[-1]
        last.num_chunks = num_kept + 1 - last.first_position
        if last.num_chunks == 0:
            self._segments.pop()
            self._first_positions.pop()
        segment = _Segment(num_kept + 1, self._next_seq, remaining, chunk_bytes)
        self._segments.append(segment)
        self._first_positions.append(segment.first_position)
        self._next_seq += segment.num_chunks
        self.num_chunks = num_kept + segment.num_chunks
        self.chunk_bytes = chunk_bytes

    def __iter__(self) -> Iterator[ChunkRef]:
        return (self.chunk(position) for position in range(1, self.num_chunks + 1))

    def _remaining(self, num_kept: int) -> list[_Range]:
        last = self._segments[-1]
        return last.ranges_from(num_kept + 1 - last.first_position)


def plan_chunks(specs: Sequence[TensorSpec], chunk_bytes: int) -> list[ChunkRef]:
    """Every chunk of `ChunkPlan.of(specs, chunk_bytes)`, in order."""
    return list(ChunkPlan.of(specs, chunk_bytes))
