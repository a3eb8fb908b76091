"""Tensor helpers: huge-page buffers for the data plane."""

from __future__ import annotations

import torch

from kvtransport.config import MIB
from kvtransport.tensors import HUGE_PAGE_BYTES, huge_page_empty


def test_huge_page_empty_is_an_aligned_owned_buffer():
    tensor = huge_page_empty(5 * MIB + 3)
    assert tensor.dtype == torch.uint8 and tensor.shape == (5 * MIB + 3,)
    assert tensor.data_ptr() % HUGE_PAGE_BYTES == 0  # whole huge pages from the start
    assert tensor.untyped_storage().nbytes() == 5 * MIB + 3  # pools can recycle it exactly
    tensor.fill_(7)
    view = tensor[-4:]
    del tensor
    assert view.tolist() == [7, 7, 7, 7]  # the mapping lives as long as a view does
    small = huge_page_empty(100)  # below a huge page: an ordinary tensor
    assert small.shape == (100,) and small.dtype == torch.uint8
