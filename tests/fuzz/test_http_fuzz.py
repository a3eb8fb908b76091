"""The gateway's OpenAI-compatible HTTP API, fuzzed with JSON and with garbage.

Bodies are mostly valid OpenAI requests with a few fields rewritten (any JSON value,
unknown fields, wrong types, edge numbers), plus arbitrary JSON, malformed bytes and
odd methods and paths. Every answer must be one of the documented statuses
(docs/http_api.md, "Errors") in the documented error shape, never a 500, and the gateway
must stay up. A body over `http_max_body_bytes` is a 413.
"""

from __future__ import annotations

import json

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.fuzz import harness
from tests.fuzz.conftest import SCALE

CASES_PER_ENDPOINT = 400 * SCALE
DOCUMENTED = {200, 400, 404, 405, 413, 429, 503}
MAX_BODY_BYTES = 32 * 1024 * 1024
TIMEOUT = httpx.Timeout(10.0, connect=5.0)

json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.sampled_from([0, -1, 1, 2**31, 2**63, -(2**63)]),
    st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from([0.0, 1.5, -1.0, 1e308]),
    st.text(max_size=20),
    st.sampled_from(["", "tiny", "\x00", "é☃😀", "x" * 5000]),
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
COMPLETION_FIELDS = [
    "model",
    "prompt",
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "seed",
    "stop",
    "stop_token_ids",
    "ignore_eos",
    "n",
    "stream",
    "stream_options",
    "priority",
    "return_token_ids",
    "user",
    "metadata",
    "logprobs",
    "frequency_penalty",
    "presence_penalty",
    "logit_bias",
    "echo",
    "suffix",
    "best_of",
    "max_completion_tokens",
    "unknown_field",
]
CHAT_FIELDS = [f for f in COMPLETION_FIELDS if f not in {"prompt", "echo", "suffix"}] + [
    "messages",
    "tools",
    "tool_choice",
    "response_format",
    "top_logprobs",
]
PROMPTS = st.one_of(
    st.just("Hello"),
    st.just([1, 2, 3]),
    st.just([[1, 2], [3]]),
    st.just(["a", "b"]),
    st.text(max_size=30),
)
MESSAGES = st.one_of(
    st.just([{"role": "user", "content": "Hi"}]),
    st.just([{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi"}]),
    st.just([{"role": "user", "content": [{"type": "text", "text": "Hi"}]}]),
    st.lists(
        st.fixed_dictionaries(
            {"role": st.sampled_from(["user", "tool", "nobody", ""]), "content": json_values}
        ),
        max_size=3,
    ),
)


@st.composite
def openai_bodies(draw, is_chat: bool) -> object:
    """A valid request with 0-3 fields rewritten, or arbitrary JSON (4:1)."""
    if draw(st.integers(0, 4)) == 0:
        return draw(json_values)
    body: dict = {
        "model": "tiny",
        "max_tokens": draw(st.integers(1, 4)),
        "seed": draw(st.integers(0, 99)),
        "stream": draw(st.booleans()),
    }
    if is_chat:
        body["messages"] = draw(MESSAGES)
    else:
        body["prompt"] = draw(PROMPTS)
    fields = CHAT_FIELDS if is_chat else COMPLETION_FIELDS
    for _ in range(draw(st.integers(0, 3))):
        name = draw(st.sampled_from(fields))
        if draw(st.integers(0, 4)) == 0:
            body.pop(name, None)
        else:
            body[name] = draw(json_values)
    return _cap_cost(body)


def _cap_cost(body: dict) -> dict:
    """Few choices and tokens for a request that would run (extremes stay, to be refused)."""
    n = body.get("n")
    if isinstance(n, int) and 2 < n <= 128:
        body["n"] = 2
    for name in ("max_tokens", "max_completion_tokens"):
        value = body.get(name)
        if isinstance(value, int) and 4 < value <= 1_000_000:
            body[name] = 4
    if "max_tokens" not in body and "max_completion_tokens" not in body:
        body["max_tokens"] = 4
    return body


def _encoded(body: object) -> bytes:
    return json.dumps(body).encode()


raw_bodies = st.one_of(
    st.binary(max_size=200),
    st.sampled_from(
        [
            b"",
            b"{",
            b"[]",
            b"null",
            b'{"model": NaN}',
            b'{"a": Infinity}',
            b"\xff\xfe",
            b'{"model": "tiny", "prompt": "x"' + b"}" * 0,
            b"[" * 100_000,
            b'{"model": "tiny", "prompt": "\\ud800"}',
        ]
    ),
    openai_bodies(False)
    .map(_encoded)
    .flatmap(lambda data: st.integers(0, max(0, len(data) - 1)).map(lambda cut: data[:cut])),
)


@pytest.fixture
def http(fuzz_mesh):
    with httpx.Client(
        base_url=f"http://{fuzz_mesh.gateway_http_address}", timeout=TIMEOUT
    ) as client:
        yield client


def _check(status: int, body: bytes, what: str, mesh) -> None:
    harness.count_answer(" ".join(what.split(" ")[:2]), str(status))
    assert status in DOCUMENTED, f"{what} answered {status}: {body[:500]!r}"
    if status != 200:
        error = json.loads(body)["error"]
        assert set(error) == {"message", "type", "param", "code"}, error
    assert harness.dead_processes(mesh) == [], f"a process died after {what}"


def _send(
    http: httpx.Client,
    method: str,
    path: str,
    content: bytes | None = None,
    headers: dict | None = None,
) -> tuple[int, bytes]:
    """The status and (up to 64 KiB of) the body; a longer stream is hung up on."""
    with http.stream(method, path, content=content, headers=headers) as response:
        body = b""
        for piece in response.iter_bytes():
            body += piece
            if len(body) > 65536:
                break
        return response.status_code, body


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_generation_endpoints_answer_documented_statuses(path, http, fuzz_mesh):
    is_chat = "chat" in path

    @settings(max_examples=CASES_PER_ENDPOINT)
    @given(body=st.one_of(openai_bodies(is_chat).map(_encoded), raw_bodies))
    def case(body):
        harness.count_case("http")
        status, answer = _send(http, "POST", path, body, {"content-type": "application/json"})
        _check(status, answer, f"POST {path} {body[:300]!r}", fuzz_mesh)

    case()


def test_other_routes_and_methods_answer_documented_statuses(http, fuzz_mesh):
    paths = st.one_of(
        st.sampled_from(
            [
                "/v1/models",
                "/v1/models/tiny",
                "/v1/models/nope",
                "/health",
                "/metrics",
                "/",
                "/v1",
                "/v1/completions",
                "/v1/chat/completions",
                "/v1/models/" + "a" * 3000,
                "/v1/models/%00",
                "/v1/embeddings",
            ]
        ),
        st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=30).map(
            lambda p: "/" + p.replace("?", "").replace("#", "")
        ),
    )
    methods = st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"])

    @settings(max_examples=CASES_PER_ENDPOINT)
    @given(method=methods, path=paths, body=st.one_of(st.none(), raw_bodies))
    def case(method, path, body):
        harness.count_case("http")
        status, answer = _send(http, method, path, body)
        if method == "HEAD":  # no body to check
            assert status in DOCUMENTED, f"HEAD {path} answered {status}"
            return
        _check(status, answer, f"{method} {path}", fuzz_mesh)

    case()


def test_oversized_body_is_413(http, fuzz_mesh):
    for path in ("/v1/completions", "/v1/chat/completions"):
        harness.count_case("http")
        body = b'{"model": "tiny", "prompt": "' + b"x" * MAX_BODY_BYTES + b'"}'
        response = http.post(path, content=body, headers={"content-type": "application/json"})
        assert response.status_code == 413, response.text[:300]
        assert response.json()["error"]["code"] == "request_too_large"

        def chunks():  # no Content-Length: the limit is enforced while reading
            for _ in range(MAX_BODY_BYTES // (1 << 20) + 2):
                yield b"x" * (1 << 20)

        harness.count_case("http")
        response = http.post(path, content=chunks())
        assert response.status_code == 413, response.text[:300]
    assert harness.dead_processes(fuzz_mesh) == []
