"""The HTTP API served by uvicorn in this loop, up to the point where it would dispatch:
every refusal in OpenAI's error shape with its status, never a 500 or a hang."""

from __future__ import annotations

import json
import types

import httpx
import pytest

from gateway.cluster_view import ClusterView, InstanceView
from gateway.http_api.app import build_app
from gateway.http_api.chat_template import load_chat_template
from gateway.http_api.server import HttpServer
from services.common.messages import InstanceSpec
from services.policies import InstanceLoad
from tests.unit.gateway.fakes import idle_generations

MAX_BODY_BYTES = 4096


@pytest.fixture
async def api():
    generations = idle_generations()
    view, sessions = generations.view, generations.sessions
    app = build_app(
        generations,
        load_chat_template("tiny", generations.tokenizer),
        model_id="tiny",
        max_body_bytes=MAX_BODY_BYTES,
    )
    server = HttpServer(app, "127.0.0.1:0", grace_s=0)
    await server.start()
    async with httpx.AsyncClient(base_url=f"http://{server.address}", timeout=10) as client:
        yield client, view, sessions
    await server.stop()


def register(view: ClusterView, num_waiting: int = 0) -> None:
    spec = InstanceSpec("w", "addr-w", "tiny", 16, 4, 0, 4, 2048, 258, 257)
    view.update([InstanceView(spec, InstanceLoad("w", 100, 0, 0, num_waiting))])


def error(response: httpx.Response) -> tuple[int, dict]:
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return response.status_code, body["error"]


async def test_no_worker_is_503_and_health_says_so(api):
    client, _, _ = api
    status, err = error(
        await client.post("/v1/completions", json={"model": "tiny", "prompt": "hi"})
    )
    assert (status, err["message"], err["code"]) == (503, "no instance has registered yet; retry shortly", "no_worker")  # fmt: skip
    status, err = error(await client.get("/health"))
    assert (status, err["message"]) == (503, "no worker instance is up")


async def test_models_and_health_once_an_instance_registered(api):
    client, view, _ = api
    register(view)
    assert (await client.get("/health")).json() == {"status": "ok", "num_instances": 1}
    card = {"id": "tiny", "object": "model", "created": 0, "owned_by": "llmesh", "max_model_len": 2048}  # fmt: skip
    assert (await client.get("/v1/models")).json() == {"object": "list", "data": [card]}
    assert (await client.get("/v1/models/tiny")).json() == card
    status, err = error(await client.get("/v1/models/gpt-4o"))
    assert (status, err["code"], err["message"]) == (404, "model_not_found", "The model `gpt-4o` does not exist")  # fmt: skip


async def test_admission_control_is_429_with_retry_after(api):
    client, view, sessions = api
    register(view)
    sessions.add(types.SimpleNamespace(request_id="busy"))  # one in flight = the limit
    response = await client.post("/v1/completions", json={"model": "tiny", "prompt": "hi"})
    status, err = error(response)
    assert (status, response.headers["retry-after"], err["type"]) == (429, "1", "rate_limit_error")
    assert "max_inflight_requests=1" in err["message"]
    sessions.remove(sessions.get("busy"))
    register(view, num_waiting=8)
    response = await client.post(
        "/v1/chat/completions",
        json={"model": "tiny", "messages": [{"role": "user", "content": "x"}], "n": 1},
    )
    assert error(response)[0] == 429
    assert "max_waiting_per_instance" in response.json()["error"]["message"]


async def test_validation_of_the_shared_path_names_the_http_field(api):
    client, view, _ = api
    register(view)
    response = await client.post("/v1/completions", json={"model": "tiny", "prompt": [5, 300]})
    assert error(response) == (
        400,
        {
            "message": "prompt[1]=300 is outside the vocabulary [0, 258)",
            "type": "invalid_request_error",
            "param": "prompt",
            "code": None,
        },
    )
    response = await client.post(
        "/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 5000}
    )
    status, err = error(response)
    assert (status, err["param"]) == (400, "prompt")
    assert err["message"] == (
        "prompt is too long: 2 prompt tokens + max_tokens=5000 exceed max_model_len=2048"
    )


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        (b"{", 400, "the request body is not valid JSON: Expecting property name"),
        (b"", 400, "the request body is empty; send a JSON object"),
        (b"[1]", 400, "the request body must be a JSON object, got [1]"),
        (b'"hi"', 400, 'the request body must be a JSON object, got "hi"'),
        (b'{"model": "tiny", "prompt": "x", "temperature": NaN}', 400, "the request body is not valid JSON: NaN"),
        (b"\xff\xfe\xfa", 400, "the request body is not valid JSON"),
        (b"[" * 100_000 + b"]" * 100_000, 413, "the request body exceeds the limit of 4096 bytes"),
        (b"[" * 2000 + b"]" * 2000, 400, "the request body is not valid JSON"),
        (b'{"model": "tiny", "prompt": "x", "max_tokens": {"a": 1}}', 400, "max_tokens={'a': 1} must be an integer >= 1"),
        (b'{"model": "tiny", "prompt": "x", "whatever": 1}', 400, "Unrecognized request argument supplied: whatever"),
        (b'{"model": 7, "prompt": "x"}', 400, "model must be a string, got 7"),
    ],
)  # fmt: skip
async def test_bad_bodies_are_4xx_in_openai_shape(api, body, status, message):
    client, view, _ = api
    register(view)
    response = await client.post(
        "/v1/completions", content=body, headers={"content-type": "application/json"}
    )
    got_status, err = error(response)
    assert got_status == status
    assert err["message"].startswith(message), err["message"]


@pytest.mark.parametrize(
    ("body", "param", "message"),
    [
        (b'{"model": "tiny", "prompt": "\\ud800"}', "prompt", "prompt holds an unpaired"),
        (
            b'{"model": "tiny", "messages": [{"role": "user", "content": "a\\udfffb"}]}',
            "messages[0].content",
            "messages[0].content holds an unpaired",
        ),
        (b'"\\ud83d"', None, "the request body holds an unpaired"),
    ],
)
async def test_unpaired_surrogate_is_400_naming_the_field(api, body, param, message):
    # Found by tests/fuzz: JSON's "\ud800" escape decoded to a lone surrogate, whose
    # tokenization raised UnicodeEncodeError: a 500.
    client, view, _ = api
    register(view)
    path = "/v1/chat/completions" if b"messages" in body else "/v1/completions"
    response = await client.post(path, content=body, headers={"content-type": "application/json"})
    status, err = error(response)
    assert (status, err["param"]) == (400, param)
    assert err["message"].startswith(message), err["message"]


async def test_huge_body_without_content_length_is_413(api):
    client, view, _ = api
    register(view)

    async def chunks():
        for _ in range(64):
            yield b" " * 1024

    response = await client.post("/v1/completions", content=chunks())
    assert error(response)[0] == 413


async def test_unknown_route_and_wrong_method(api):
    client, _, _ = api
    assert error(await client.get("/v1/nothing")) == (
        404,
        {"message": "GET /v1/nothing: Not Found", "type": "not_found_error", "param": None, "code": None},
    )  # fmt: skip
    status, err = error(await client.get("/v1/completions"))
    assert (status, err["message"]) == (405, "GET /v1/completions: Method Not Allowed")


async def test_unknown_model_is_404(api):
    client, view, _ = api
    register(view)
    status, err = error(await client.post("/v1/completions", content=json.dumps({"model": "gpt-4o", "prompt": "x"})))  # fmt: skip
    assert (status, err["param"], err["code"]) == (404, "model", "model_not_found")
