"""Staging buffers: reused when given back, never when too big or over the cap."""

from __future__ import annotations

import pytest
import torch

from services.worker.migration.buffers import StagingBuffers


def test_a_given_back_buffer_is_handed_out_again():
    buffers = StagingBuffers(chunk_bytes=1024)
    first = buffers.acquire((2, 3, 4), torch.float32)  # 96 bytes of a 1 KiB buffer
    assert first.shape == (2, 3, 4) and first.dtype == torch.float32 and first.is_contiguous()
    buffers.release(first)
    assert buffers.num_free == 1
    second = buffers.acquire((16, 16), torch.float32)  # all 1024 bytes
    assert second.data_ptr() == first.data_ptr()
    assert buffers.num_free == 0
    buffers.release(second)
    buffers.release(second)  # twice: still one free buffer, not two handles on one
    assert buffers.num_free == 1


def test_oversized_requests_are_one_offs_and_the_free_list_is_capped():
    buffers = StagingBuffers(chunk_bytes=64, max_free=2)
    big = buffers.acquire((17,), torch.float32)  # 68 bytes > 64
    assert big.shape == (17,)
    buffers.release(big)
    assert buffers.num_free == 0
    held = [buffers.acquire((4,), torch.float16) for _ in range(3)]
    assert len({t.data_ptr() for t in held}) == 3
    for t in held:
        buffers.release(t)
    assert buffers.num_free == 2


def test_chunk_bytes_must_be_positive():
    with pytest.raises(ValueError, match="chunk_bytes=0"):
        StagingBuffers(chunk_bytes=0)
