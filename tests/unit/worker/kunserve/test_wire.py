"""services.worker.kunserve.wire: micro-batches survive the data plane exactly."""

from __future__ import annotations

import pytest
import torch

from services.worker.engine import SamplingParams, ScheduledRequest, SchedulerOutput
from services.worker.kunserve.wire import decode_micro_batch, encode_micro_batch


def batch() -> SchedulerOutput:
    out = SchedulerOutput()
    out.requests = [
        ScheduledRequest("greedy", [17], 40, [3, 9, 4], SamplingParams(max_tokens=9), True),
        ScheduledRequest(
            "chunk",
            [1, 2, 3, 4, 5],
            16,
            [7, 8],
            SamplingParams(max_tokens=5, temperature=0.7, top_p=0.9, top_k=20, seed=123),
            False,
        ),
    ]
    out.num_batched_tokens = 6
    return out


def test_a_micro_batch_round_trips():
    meta = encode_micro_batch(41, batch())
    assert meta.dtype == torch.uint8
    seq, decoded = decode_micro_batch(meta)
    assert seq == 41
    assert decoded.num_batched_tokens == 6
    assert [
        (r.request_id, r.token_ids, r.num_computed_tokens, r.block_ids, r.is_sampling)
        for r in decoded.requests
    ] == [
        ("greedy", [17], 40, [3, 9, 4], True),
        ("chunk", [1, 2, 3, 4, 5], 16, [7, 8], False),
    ]
    p = decoded.requests[1].params
    assert (p.temperature, p.top_p, p.top_k, p.seed) == (pytest.approx(0.7), 0.9, 20, 123)
    assert decoded.requests[0].params.seed is None  # greedy: no stream needed


def test_an_empty_micro_batch_round_trips():
    seq, decoded = decode_micro_batch(encode_micro_batch(0, SchedulerOutput()))
    assert (seq, decoded.requests, decoded.num_batched_tokens) == (0, [], 0)


@pytest.mark.parametrize(
    "meta",
    [
        torch.zeros(2, dtype=torch.uint8),  # shorter than the length prefix
        torch.tensor([200, 0, 0, 0, 123], dtype=torch.uint8),  # header beyond the data
    ],
)
def test_malformed_meta_is_a_value_error(meta):
    with pytest.raises(ValueError, match="malformed micro-batch meta"):
        decode_micro_batch(meta)


def test_arrays_that_do_not_match_the_header_are_refused():
    meta = encode_micro_batch(3, batch())
    with pytest.raises(ValueError, match="array length"):
        decode_micro_batch(meta[:-4])  # one block id short
