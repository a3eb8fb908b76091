"""Micro-batches on the data plane: what stage k hands stage k+1 besides hidden states.

A micro-batch travels as one activation-class transfer of two tensors:

    [0] meta    uint8  the encoded SchedulerOutput (below)
    [1] hidden  (T, H) hidden states in batch_row_order (stages 0..g-2 -> next stage)
        tokens  (R,)   int64 sampled token ids, one per sampling request (last -> stage 0)

meta = 4-byte little-endian length of a JSON header, the header, then int32 arrays:

    header  {"seq", "requests": [[request_id, num_computed_tokens, num_tokens,
             num_blocks, is_sampling, temperature, top_p, top_k, seed], ...]}
    arrays  token ids of every request, then block ids of every request, concatenated
            in request order (lengths from the header)

Every stage rebuilds the same ScheduledRequests, so every stage orders rows the same
way and the last one samples each request with its own (seed, position) stream.
"""

from __future__ import annotations

import json
import struct

import numpy as np
import torch

from services.worker.engine import SamplingParams, ScheduledRequest, SchedulerOutput

_LENGTH = struct.Struct("<I")


def encode_micro_batch(seq: int, batch: SchedulerOutput) -> torch.Tensor:
    """The meta tensor (uint8) of micro-batch `seq`."""
    rows = []
    token_ids: list[int] = []
    block_ids: list[int] = []
    for r in batch.requests:
        p = r.params
        rows.append(
            [
                r.request_id,
                r.num_computed_tokens,
                len(r.token_ids),
                len(r.block_ids),
                r.is_sampling,
                p.temperature,
                p.top_p,
                p.top_k,
                p.seed,
            ]
        )
        token_ids += r.token_ids
        block_ids += r.block_ids
    header = json.dumps({"seq": seq, "requests": rows}, separators=(",", ":")).encode()
    arrays = np.asarray(token_ids + block_ids, dtype="<i4").tobytes()
    buffer = bytearray(_LENGTH.pack(len(header)) + header + arrays)
    return torch.frombuffer(buffer, dtype=torch.uint8) if buffer else torch.empty(0, torch.uint8)


def decode_micro_batch(meta: torch.Tensor) -> tuple[int, SchedulerOutput]:
    """(seq, batch) from encode_micro_batch's tensor. Raises ValueError if malformed."""
    data = meta.numpy().tobytes()
    try:
        (length,) = _LENGTH.unpack_from(data)
        header = json.loads(data[_LENGTH.size : _LENGTH.size + length])
        ints = np.frombuffer(data, dtype="<i4", offset=_LENGTH.size + length).tolist()
        rows = header["requests"]
        seq = int(header["seq"])
    except (struct.error, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"malformed micro-batch meta: {exc}") from None
    num_tokens = sum(row[2] for row in rows)
    if len(ints) != num_tokens + sum(row[3] for row in rows):
        raise ValueError("malformed micro-batch meta: array length does not match the header")
    batch = SchedulerOutput()
    t, b = 0, num_tokens
    for request_id, computed, n_tokens, n_blocks, is_sampling, temp, top_p, top_k, seed in rows:
        params = SamplingParams(max_tokens=1, temperature=temp, top_p=top_p, top_k=top_k, seed=seed)
        batch.requests.append(
            ScheduledRequest(
                request_id,
                ints[t : t + n_tokens],
                computed,
                ints[b : b + n_blocks],
                params,
                bool(is_sampling),
            )
        )
        batch.num_batched_tokens += n_tokens
        t += n_tokens
        b += n_blocks
    return seq, batch
