"""Check every field of a client's GenerateRequest and turn it into a GenerationSpec.

Every failure is a ValueError whose message starts with the field name (the error
interceptor sends it as INVALID_ARGUMENT), e.g. `sampling.top_p=1.5 must be in (0, 1]`.
"""

from __future__ import annotations

import math
import random
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from protos import gateway_pb2
from services.common.messages import SamplingSpec

DEFAULT_MAX_TOKENS = 16
MAX_REQUEST_ID_LEN = 128
_REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:\-]+$")
MAX_PRIORITY = 1


@dataclass(frozen=True)
class ModelLimits:
    """What the mesh can serve, learned from the instances' registrations."""

    model_id: str
    vocab_size: int
    max_model_len: int
    eos_token_id: int
    max_tokens_per_instance: int  # KV capacity of the largest instance, in tokens


@dataclass(frozen=True)
class GenerationSpec:
    """A validated generation request, ready to dispatch."""

    request_id: str
    prompt_token_ids: tuple[int, ...]
    sampling: SamplingSpec  # seed always chosen
    priority: int
    detokenize: bool


def new_request_id() -> str:
    return uuid.uuid4().hex


def validate_generate(
    request: gateway_pb2.GenerateRequest,
    limits: ModelLimits,
    encode: Callable[[str], list[int]],
    rng: random.Random | None = None,
) -> GenerationSpec:
    request_id = request.request_id or new_request_id()
    if len(request_id) > MAX_REQUEST_ID_LEN or not _REQUEST_ID_RE.match(request_id):
        raise ValueError(
            f"request_id={request.request_id[:40]!r} must be 1-{MAX_REQUEST_ID_LEN} characters of "
            "letters, digits and ._:-"
        )
    prompt_field, prompt_token_ids = _prompt(request, limits, encode)
    sampling = _sampling(request, limits, rng)
    if not 0 <= request.priority <= MAX_PRIORITY:
        raise ValueError(f"priority={request.priority} must be 0 (normal) or 1 (high)")
    num_tokens = len(prompt_token_ids) + sampling.max_tokens
    if num_tokens > limits.max_model_len:
        raise ValueError(
            f"{prompt_field} is too long: {len(prompt_token_ids)} prompt tokens + sampling.max_tokens="
            f"{sampling.max_tokens} exceed max_model_len={limits.max_model_len}"
        )
    if num_tokens > limits.max_tokens_per_instance:
        raise ValueError(
            f"{prompt_field} is too long: {len(prompt_token_ids)} prompt tokens + sampling.max_tokens="
            f"{sampling.max_tokens} exceed the KV capacity of every instance "
            f"({limits.max_tokens_per_instance} tokens)"
        )
    return GenerationSpec(
        request_id=request_id,
        prompt_token_ids=tuple(prompt_token_ids),
        sampling=sampling,
        priority=request.priority,
        detokenize=request.detokenize,
    )


def _prompt(
    request: gateway_pb2.GenerateRequest, limits: ModelLimits, encode: Callable[[str], list[int]]
) -> tuple[str, list[int]]:
    has_text, has_ids = bool(request.prompt), len(request.prompt_token_ids) > 0
    if has_text and has_ids:
        raise ValueError("prompt and prompt_token_ids are both set; set exactly one")
    if not has_text and not has_ids:
        raise ValueError("prompt is empty; set prompt (text) or prompt_token_ids")
    if has_ids:
        ids = list(request.prompt_token_ids)
        for i, token_id in enumerate(ids):
            if not 0 <= token_id < limits.vocab_size:
                raise ValueError(
                    f"prompt_token_ids[{i}]={token_id} is outside the vocabulary [0, {limits.vocab_size})"
                )
        return "prompt_token_ids", ids
    ids = encode(request.prompt)
    if not ids:
        raise ValueError("prompt tokenizes to no tokens")
    return "prompt", ids


def _sampling(
    request: gateway_pb2.GenerateRequest, limits: ModelLimits, rng: random.Random | None
) -> SamplingSpec:
    if not request.HasField("sampling"):
        seed = (rng or random).getrandbits(63)
        return SamplingSpec(max_tokens=DEFAULT_MAX_TOKENS, seed=seed)
    s = request.sampling
    if s.max_tokens < 1:
        raise ValueError(f"sampling.max_tokens={s.max_tokens} must be >= 1")
    if not math.isfinite(s.temperature) or s.temperature < 0:
        raise ValueError(
            f"sampling.temperature={s.temperature} must be a finite number >= 0 (0 = greedy)"
        )
    # proto3 cannot tell an unset float from 0: top_p == 0 means "unset" (= 1).
    top_p = 1.0 if s.top_p == 0 else s.top_p
    if not (math.isfinite(top_p) and 0 < top_p <= 1):
        raise ValueError(f"sampling.top_p={s.top_p} must be in (0, 1]")
    if s.top_k < 0:
        raise ValueError(f"sampling.top_k={s.top_k} must be >= 0 (0 = off)")
    for i, token_id in enumerate(s.stop_token_ids):
        if not 0 <= token_id < limits.vocab_size:
            raise ValueError(
                f"sampling.stop_token_ids[{i}]={token_id} is outside the vocabulary [0, {limits.vocab_size})"
            )
    seed = s.seed if s.HasField("seed") else (rng or random).getrandbits(63)
    return SamplingSpec(
        max_tokens=s.max_tokens,
        temperature=s.temperature,
        top_p=top_p,
        top_k=s.top_k,
        seed=seed,
        stop_token_ids=tuple(s.stop_token_ids),
        ignore_eos=s.ignore_eos,
    )
