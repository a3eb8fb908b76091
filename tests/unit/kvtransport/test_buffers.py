from __future__ import annotations

import pytest
import torch

from kvtransport.buffers import BufferPool, size_class
from kvtransport.tensors import TensorSpec, byte_view, packed_layout, spec_of, unpack


def test_size_classes_are_powers_of_two_from_4kib():
    assert [size_class(n) for n in (0, 1, 4096, 4097, 3 << 20)] == [4096, 4096, 4096, 8192, 4 << 20]


def test_released_buffer_is_reused_for_the_same_size_class():
    pool = BufferPool(max_pooled_bytes=1 << 30)
    first = pool.acquire(5000)
    assert first.numel() == 8192 and pool.num_allocated == 1
    assert pool.release(first) is True
    again = pool.acquire(8000)
    assert again.data_ptr() == first.data_ptr()
    assert (pool.num_allocated, pool.num_reused, pool.num_pooled_bytes) == (1, 1, 0)


def test_double_release_and_full_pool_are_refused():
    pool = BufferPool(max_pooled_bytes=8192)
    buffer = pool.acquire(8192)
    assert pool.release(buffer) is True
    assert pool.release(buffer) is False  # would be handed out twice
    assert pool.release(pool.acquire(4096 * 3)) is False  # over the byte cap
    assert pool.release(torch.empty(5000, dtype=torch.uint8)) is False  # not a size class


def test_release_tensors_recycles_the_buffer_behind_views():
    pool = BufferPool(max_pooled_bytes=1 << 30)
    buffer = pool.acquire(1000)
    specs = [TensorSpec("bfloat16", (3, 4)), TensorSpec("int64", (5,))]
    offsets, total = packed_layout(specs)
    assert offsets == [0, 64] and total == 104
    tensors = unpack(buffer, specs, offsets)
    assert [spec_of(t) for t in tensors] == specs
    assert pool.release_tensors(tensors) is True
    assert pool.acquire(10).data_ptr() == buffer.data_ptr()


def test_byte_view_of_bf16_shares_memory():
    tensor = torch.zeros(2, 3, dtype=torch.bfloat16)
    view = byte_view(tensor)
    assert view.shape == (12,)
    view[:2] = [0x80, 0x3F]  # bf16 1.0, little-endian
    assert tensor[0, 0].item() == 1.0


def test_unsupported_dtype_raises_value_error_naming_it():
    with pytest.raises(ValueError, match="complex64"):
        spec_of(torch.zeros(2, dtype=torch.complex64))
