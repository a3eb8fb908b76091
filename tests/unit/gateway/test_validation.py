"""gateway.validation: every field checked, messages name the field."""

from __future__ import annotations

import random

import pytest

from gateway.client import build_request
from gateway.validation import DEFAULT_MAX_TOKENS, ModelLimits, validate_generate
from protos import gateway_pb2
from services.common.messages import SamplingSpec

LIMITS = ModelLimits(
    model_id="tiny", vocab_size=258, max_model_len=64, eos_token_id=257, max_tokens_per_instance=48
)


def encode(text: str) -> list[int]:
    return [256, *text.encode()]


def validate(**kwargs):
    return validate_generate(build_request(**kwargs), LIMITS, encode, random.Random(0))


def test_a_valid_request_becomes_a_spec_with_every_field():
    spec = validate(
        prompt_token_ids=[1, 2, 3],
        max_tokens=5,
        temperature=0.5,
        top_p=0.75,
        top_k=3,
        seed=9,
        stop_token_ids=[7],
        ignore_eos=True,
        request_id="req-1",
        priority=1,
        detokenize=True,
    )
    assert spec.request_id == "req-1"
    assert spec.prompt_token_ids == (1, 2, 3)
    assert spec.sampling == SamplingSpec(5, 0.5, 0.75, 3, 9, (7,), True)
    assert (spec.priority, spec.detokenize) == (1, True)


def test_text_prompt_is_tokenized_and_defaults_apply():
    spec = validate_generate(
        gateway_pb2.GenerateRequest(prompt="hi"), LIMITS, encode, random.Random(0)
    )
    assert spec.prompt_token_ids == (256, 104, 105)
    assert spec.sampling.max_tokens == DEFAULT_MAX_TOKENS
    assert spec.sampling.seed == random.Random(0).getrandbits(63)
    assert len(spec.request_id) == 32


def test_top_p_zero_means_unset():
    assert validate(prompt="a", top_p=0.0).sampling.top_p == 1.0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"prompt": ""}, "prompt is empty"),
        ({"prompt": "a", "prompt_token_ids": [1]}, "prompt and prompt_token_ids are both set"),
        ({"prompt_token_ids": [1, 258]}, "prompt_token_ids[1]=258 is outside the vocabulary [0, 258)"),
        ({"prompt_token_ids": [-1]}, "prompt_token_ids[0]=-1"),
        ({"prompt": "a", "max_tokens": 0}, "sampling.max_tokens=0 must be >= 1"),
        ({"prompt": "a", "max_tokens": -3}, "sampling.max_tokens=-3 must be >= 1"),
        ({"prompt": "a", "temperature": -0.5}, "sampling.temperature=-0.5 must be"),
        ({"prompt": "a", "temperature": float("nan")}, "sampling.temperature=nan"),
        ({"prompt": "a", "top_p": 1.5}, "sampling.top_p=1.5 must be in (0, 1]"),
        ({"prompt": "a", "top_p": -0.25}, "sampling.top_p=-0.25 must be in (0, 1]"),
        ({"prompt": "a", "top_k": -1}, "sampling.top_k=-1 must be >= 0"),
        ({"prompt": "a", "stop_token_ids": [300]}, "sampling.stop_token_ids[0]=300"),
        ({"prompt": "a", "priority": 2}, "priority=2 must be 0 (normal) or 1 (high)"),
        ({"prompt": "a", "priority": -1}, "priority=-1"),
        ({"prompt": "a", "request_id": "x" * 129}, "request_id="),
        ({"prompt": "a", "request_id": "a/b"}, "request_id='a/b'"),
        ({"prompt_token_ids": [1] * 60, "max_tokens": 5}, "prompt_token_ids is too long: 60 prompt tokens + sampling.max_tokens=5 exceed max_model_len=64"),
        ({"prompt": "x" * 40, "max_tokens": 8}, "prompt is too long: 41 prompt tokens + sampling.max_tokens=8 exceed the KV capacity of every instance (48 tokens)"),
    ],
)  # fmt: skip
def test_invalid_fields_raise_value_error_naming_the_field(kwargs, message):
    with pytest.raises(ValueError) as info:
        validate(**kwargs)
    assert message in str(info.value)
