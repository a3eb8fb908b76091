"""Bad requests get the right status code and a message naming the field."""

from __future__ import annotations

import grpc
import pytest

from gateway.client import Client, GatewayError

CASES = {
    "empty prompt": ({"prompt": ""}, grpc.StatusCode.INVALID_ARGUMENT, "prompt is empty"),
    "prompt and ids": ({"prompt": "a", "prompt_token_ids": [1]}, grpc.StatusCode.INVALID_ARGUMENT, "prompt and prompt_token_ids"),
    "negative max_tokens": ({"max_tokens": -1}, grpc.StatusCode.INVALID_ARGUMENT, "sampling.max_tokens=-1"),
    "zero max_tokens": ({"max_tokens": 0}, grpc.StatusCode.INVALID_ARGUMENT, "sampling.max_tokens=0"),
    "negative temperature": ({"temperature": -0.5}, grpc.StatusCode.INVALID_ARGUMENT, "sampling.temperature=-0.5"),
    "top_p above 1": ({"top_p": 1.5}, grpc.StatusCode.INVALID_ARGUMENT, "sampling.top_p=1.5"),
    "negative top_p": ({"top_p": -0.25}, grpc.StatusCode.INVALID_ARGUMENT, "sampling.top_p=-0.25"),
    "negative top_k": ({"top_k": -2}, grpc.StatusCode.INVALID_ARGUMENT, "sampling.top_k=-2"),
    "token outside vocab": ({"prompt_token_ids": [1, 999]}, grpc.StatusCode.INVALID_ARGUMENT, "prompt_token_ids[1]=999"),
    "oversized prompt ids": ({"prompt_token_ids": [1] * 2048}, grpc.StatusCode.INVALID_ARGUMENT, "prompt_token_ids is too long"),
    "oversized text prompt": ({"prompt": "x" * 3000}, grpc.StatusCode.INVALID_ARGUMENT, "prompt is too long"),
    "bad request id": ({"request_id": "has space"}, grpc.StatusCode.INVALID_ARGUMENT, "request_id="),
    "bad priority": ({"priority": 7}, grpc.StatusCode.INVALID_ARGUMENT, "priority=7"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(CASES))
def test_invalid_generate_is_rejected_with_the_field_name(mesh, case):
    overrides, code, message = CASES[case]
    kwargs = {"prompt": "hi", "max_tokens": 4, **overrides}
    if "prompt_token_ids" in overrides and "prompt" not in overrides:
        kwargs.pop("prompt")
    with Client(mesh.gateway_address, timeout_s=10) as client:
        for call in (client.generate, lambda **kw: list(client.generate_stream(**kw))):
            with pytest.raises(GatewayError) as info:
                call(**kwargs)
            assert info.value.code == code
            assert message in info.value.details


def test_abort_of_an_unknown_request_is_not_found(mesh):
    with Client(mesh.gateway_address, timeout_s=10) as client, pytest.raises(GatewayError) as info:
        client.abort("no-such-request")
    assert info.value.code == grpc.StatusCode.NOT_FOUND
    assert "request_id 'no-such-request'" in info.value.details


def test_duplicate_request_id_in_flight_is_already_exists(mesh):
    with Client(mesh.gateway_address, timeout_s=30) as client:
        stream = client.generate_stream(
            prompt_token_ids=[1, 2], max_tokens=1500, ignore_eos=True, request_id="dup"
        )
        next(stream)
        with pytest.raises(GatewayError) as info:
            client.generate(prompt_token_ids=[1, 2], max_tokens=2, request_id="dup")
        stream.close()
    assert info.value.code == grpc.StatusCode.ALREADY_EXISTS
    assert "request_id 'dup'" in info.value.details
