from __future__ import annotations

import pytest

from services.worker.engine import (
    BlockIntegrityError,
    EngineStateError,
    InvalidBlocksError,
    NoFreeBlocksError,
)


def test_allocate_hands_out_lowest_ids_first(make_block_manager):
    bm = make_block_manager(8, block_size=4)
    assert bm.can_allocate(9)  # 3 blocks
    assert bm.allocate("a", 9) == [0, 1, 2]
    assert bm.allocate("b", 4) == [3]
    assert (bm.num_free_blocks, bm.num_used_blocks) == (4, 4)
    bm.free("a")
    bm.free("b")


def test_freed_blocks_go_to_the_back_of_the_free_list_in_reverse_table_order(make_block_manager):
    bm = make_block_manager(6, block_size=4)
    bm.allocate("a", 12)  # [0, 1, 2]
    bm.allocate("b", 4)  # [3]
    bm.free("a")
    assert list(bm.free_block_ids) == [4, 5, 2, 1, 0]
    assert bm.allocate("c", 8) == [4, 5]
    bm.free("b")
    bm.free("c")


def test_can_append_and_may_append_grow_the_table_only_at_block_boundaries(make_block_manager):
    bm = make_block_manager(4, block_size=4)
    bm.allocate("a", 3)
    assert bm.num_new_blocks_needed("a", 4) == 0
    assert bm.may_append("a", 4) == []
    assert bm.can_append("a", 5)
    assert bm.may_append("a", 5) == [1]
    assert bm.block_ids("a") == [0, 1]
    assert not bm.can_append("a", 17)  # needs 3 more, 2 free
    with pytest.raises(NoFreeBlocksError):
        bm.may_append("a", 17)
    assert bm.block_ids("a") == [0, 1]  # a failed append changes nothing
    bm.free("a")


def test_cannot_allocate_more_than_free(make_block_manager):
    bm = make_block_manager(2, block_size=4)
    assert not bm.can_allocate(9)
    with pytest.raises(NoFreeBlocksError):
        bm.allocate("a", 9)
    assert bm.num_free_blocks == 2


def test_reserve_release_and_adopt(make_block_manager):
    bm = make_block_manager(6, block_size=4)
    assert bm.reserve(2) == [0, 1]
    assert (bm.num_reserved_blocks, bm.num_used_blocks) == (2, 2)
    assert not bm.can_reserve(5)
    with pytest.raises(NoFreeBlocksError):
        bm.reserve(5)
    reserved = bm.reserve(3)
    assert reserved == [2, 3, 4]
    bm.adopt("migrated", [4, 2])
    assert bm.block_ids("migrated") == [4, 2]
    assert bm.num_reserved_blocks == 3
    with pytest.raises(InvalidBlocksError):
        bm.release([4])  # adopted, no longer reserved
    with pytest.raises(InvalidBlocksError):
        bm.release([5])  # free, never reserved
    bm.release([0, 1, 3])
    bm.check_integrity()
    bm.free("migrated")


def test_integrity_check_catches_broken_books(make_block_manager):
    bm = make_block_manager(4, block_size=4)
    bm.allocate("a", 4)
    bm.ref_counts[0] = 2
    with pytest.raises(BlockIntegrityError, match="block 0: ref_count 2, 1 owners"):
        bm.check_integrity()
    bm.ref_counts[0] = 1
    bm.free_block_ids.append(3)
    with pytest.raises(BlockIntegrityError, match="twice"):
        bm.check_integrity()
    bm.free_block_ids.pop()
    leaked = bm.free_block_ids.popleft()  # a block that nobody owns and is not free
    with pytest.raises(BlockIntegrityError, match=f"block {leaked}: ref_count 0, 0 owners"):
        bm.check_integrity()
    bm.free_block_ids.appendleft(leaked)
    bm.free("a")


def test_grow_then_shrink_moves_high_blocks_down(make_block_manager):
    bm = make_block_manager(4, block_size=4)
    assert bm.grow(4) == [4, 5, 6, 7]
    bm.allocate("a", 16)  # [0, 1, 2, 3]
    bm.allocate("b", 8)  # [4, 5]
    bm.free("a")
    moves = bm.plan_shrink(4)
    assert moves == {4: 3, 5: 2}  # free ids below 4, in free-list order
    bm.shrink(4, moves)
    assert bm.block_ids("b") == [3, 2]
    assert list(bm.free_block_ids) == [1, 0]
    assert bm.num_total_blocks == 4
    bm.free("b")


def test_shrink_refuses_when_used_blocks_do_not_fit(make_block_manager):
    bm = make_block_manager(2, block_size=4)
    bm.grow(2)
    bm.allocate("a", 12)
    with pytest.raises(NoFreeBlocksError):
        bm.plan_shrink(2)
    bm.free("a")
    bm.reserve(4)
    with pytest.raises(NoFreeBlocksError):
        bm.plan_shrink(4 - 1)
    bm.release([0, 1, 2, 3])


def test_reserve_ids_takes_exactly_the_given_free_blocks(make_block_manager):
    bm = make_block_manager(8, block_size=4)
    bm.allocate("a", 8)  # [0, 1]
    assert bm.can_reserve_ids([5, 2])
    bm.reserve_ids([5, 2])
    assert bm.reserved_block_ids == {2, 5}
    assert list(bm.free_block_ids) == [3, 4, 6, 7]  # order kept otherwise
    bm.adopt("b", [5, 2])
    assert bm.block_ids("b") == [5, 2]
    assert bm.allocate("c", 4) == [3]
    for request_id in "abc":
        bm.free(request_id)


@pytest.mark.parametrize(
    ("block_ids", "message"),
    [
        ([1, 3], r"blocks \[1\] are in use"),  # a's
        ([4, 8], r"blocks \[8\] are not in \[0, 8\)"),
        ([-1], r"blocks \[-1\] are not in \[0, 8\)"),
        ([3, 3], r"block ids repeat: \[3, 3\]"),
    ],
)
def test_reserve_ids_refuses_used_repeated_and_foreign_ids(make_block_manager, block_ids, message):
    bm = make_block_manager(8, block_size=4)
    bm.allocate("a", 8)  # [0, 1]
    assert not bm.can_reserve_ids(block_ids)
    with pytest.raises(InvalidBlocksError, match=message):
        bm.reserve_ids(block_ids)
    assert (bm.num_free_blocks, bm.num_reserved_blocks) == (6, 0)  # a refusal takes nothing
    bm.free("a")


def test_reset_starts_over_with_all_blocks_free_only_when_idle(make_block_manager):
    bm = make_block_manager(4, block_size=4)
    reserved = bm.reserve(1)
    with pytest.raises(EngineStateError, match="1 blocks are in use"):
        bm.reset(10)
    bm.release(reserved)
    bm.allocate("a", 4)
    bm.free("a")
    bm.reset(10)
    assert (bm.num_total_blocks, list(bm.free_block_ids)) == (10, list(range(10)))
    bm.check_integrity()
