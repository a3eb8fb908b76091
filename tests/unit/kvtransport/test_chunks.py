"""ChunkPlan: exact chunk positions, seqs and byte ranges, before and after rechunks."""

from __future__ import annotations

import pytest

from kvtransport.chunks import MAX_SEQ, ChunkPlan, ChunkRef, plan_chunks
from kvtransport.tensors import TensorSpec


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


def test_chunk_is_computed_per_position_and_bounded():
    plan = ChunkPlan([10, 0, 8, 0], 4)
    assert plan.num_chunks == 5
    assert plan.chunk(4) == ChunkRef(4, 2, 0, 4)
    assert plan.chunk(5) == ChunkRef(5, 2, 4, 4)
    for position in (0, 6):
        with pytest.raises(IndexError):
            plan.chunk(position)


def test_rechunk_keeps_issued_chunks_and_numbers_the_rest_after_every_used_seq():
    plan = ChunkPlan([16, 6], 8)  # seqs 1, 2 (tensor 0), 3 (tensor 1)
    plan.rechunk(1, 3)
    assert list(plan) == [
        ChunkRef(1, 0, 0, 8),  # kept
        ChunkRef(4, 0, 8, 3),  # the rest of tensor 0 from byte 8, seqs after 3
        ChunkRef(5, 0, 11, 3),
        ChunkRef(6, 0, 14, 2),
        ChunkRef(7, 1, 0, 3),
        ChunkRef(8, 1, 3, 3),
    ]
    assert plan.chunk_bytes == 3
    plan.rechunk(3, 2)  # again, later: positions 1..3 stay, seqs continue after 8
    assert list(plan)[3:] == [
        ChunkRef(9, 0, 14, 2),
        ChunkRef(10, 1, 0, 2),
        ChunkRef(11, 1, 2, 2),
        ChunkRef(12, 1, 4, 2),
    ]


def test_rechunk_before_any_chunk_replans_everything():
    plan = ChunkPlan([8], 8)
    plan.rechunk(0, 4)
    assert list(plan) == [ChunkRef(2, 0, 0, 4), ChunkRef(3, 0, 4, 4)]


def test_rechunk_right_at_the_last_rechunk_replaces_it():
    plan = ChunkPlan([12], 12)
    plan.rechunk(0, 6)  # seqs 2, 3
    plan.rechunk(0, 4)  # nothing of the first rechunk issued: seqs 4, 5, 6
    assert list(plan) == [ChunkRef(4, 0, 0, 4), ChunkRef(5, 0, 4, 4), ChunkRef(6, 0, 8, 4)]


def test_invalid_rechunks_are_refused():
    plan = ChunkPlan([12], 4)
    plan.rechunk(2, 2)
    assert not plan.can_rechunk(1, 1)  # before the last rechunk point
    assert not plan.can_rechunk(plan.num_chunks, 1)  # nothing left to cut
    with pytest.raises(ValueError, match="cannot rechunk after 1 of 4"):
        plan.rechunk(1, 1)
    assert list(plan) == [
        ChunkRef(1, 0, 0, 4),
        ChunkRef(2, 0, 4, 4),
        ChunkRef(4, 0, 8, 2),
        ChunkRef(5, 0, 10, 2),
    ]


def test_rechunk_that_would_overflow_the_seq_field_is_refused():
    full = ChunkPlan([MAX_SEQ], 1)  # every seq already used
    assert not full.can_rechunk(0, MAX_SEQ)  # even one more chunk would not fit
    almost = ChunkPlan([MAX_SEQ - 1], 1)  # one seq left
    assert not almost.can_rechunk(0, (MAX_SEQ - 1) // 2)  # two chunks: no
    almost.rechunk(0, MAX_SEQ - 1)  # one chunk: yes
    assert list(almost) == [ChunkRef(MAX_SEQ, 0, 0, MAX_SEQ - 1)]
