"""The OpenAI-compatible HTTP API of a real mesh, through the official `openai` client
(and raw httpx for what a client library would never send).

Every answer is checked token for token against the gRPC API for the same request and
seed; after each test every worker is idle with all blocks free (conftest).
"""

from __future__ import annotations

import json
import re
import time

import httpx
import openai
import pytest

from gateway.client import Client
from services.common.tokenizer import ByteTokenizer
from tests.integration.conftest import log_events, wait_until, wait_worker_idle

TIMEOUT_S = 60.0
TOKENIZER = ByteTokenizer()
PROMPT = "Hello, llmesh"
# return_token_ids (an llmesh/vLLM extension) lets the test compare exact token ids.
EXTRA = {"return_token_ids": True, "ignore_eos": True}


@pytest.fixture(scope="module")
def api(mesh) -> openai.OpenAI:
    client = openai.OpenAI(
        base_url=f"http://{mesh.gateway_http_address}/v1",
        api_key="unused",
        max_retries=0,
        timeout=TIMEOUT_S,
    )
    yield client
    client.close()


def grpc_tokens(mesh, prompt=None, prompt_token_ids=None, **sampling) -> list[int]:
    with Client(mesh.gateway_address, timeout_s=TIMEOUT_S) as client:
        generation = client.generate(prompt, prompt_token_ids=prompt_token_ids, **sampling)
    return list(generation.token_ids)


def chat_prompt_ids(messages: list[dict]) -> list[int]:
    """The documented simple template of the tiny model, after its BOS."""
    text = "".join(f"<|{m['role']}|>\n{m['content']}\n" for m in messages) + "<|assistant|>\n"
    return TOKENIZER.encode(text)


def test_completion_equals_the_grpc_api_with_exact_usage(mesh, api):
    before = int(time.time())
    response = api.completions.create(
        model="tiny", prompt=PROMPT, max_tokens=12, temperature=0.8, top_p=0.9, seed=7,
        extra_body={**EXTRA, "top_k": 50},
    )  # fmt: skip
    expected = grpc_tokens(mesh, PROMPT, max_tokens=12, temperature=0.8, top_p=0.9, top_k=50, seed=7, ignore_eos=True)  # fmt: skip
    [choice] = response.choices
    assert choice.token_ids == expected
    assert choice.prompt_token_ids == TOKENIZER.encode(PROMPT)
    assert (choice.index, choice.finish_reason, choice.text) == (0, "length", TOKENIZER.decode(expected))  # fmt: skip
    assert (response.usage.prompt_tokens, response.usage.completion_tokens, response.usage.total_tokens) == (14, 12, 26)  # fmt: skip
    assert response.id.startswith("cmpl-") and response.object == "text_completion"
    assert response.model == "tiny" and before <= response.created <= time.time()


def test_streamed_completion_one_event_per_batch_then_usage(mesh, api):
    prompt_ids = [3, 1, 4, 1, 5, 9, 2, 6]
    stream = api.completions.create(
        model="tiny", prompt=prompt_ids, max_tokens=40, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body=EXTRA,
    )  # fmt: skip
    events = list(stream)
    expected = grpc_tokens(mesh, prompt_token_ids=prompt_ids, max_tokens=40, ignore_eos=True)
    *chunks, last = events
    assert [t for c in chunks for t in c.choices[0].token_ids] == expected
    assert "".join(c.choices[0].text for c in chunks) == TOKENIZER.decode(expected)
    assert all(c.choices[0].token_ids for c in chunks)  # one event per engine output batch
    assert [c.choices[0].finish_reason for c in chunks] == [None] * (len(chunks) - 1) + ["length"]
    assert all(c.usage is None for c in chunks)
    assert last.choices == []
    assert (last.usage.prompt_tokens, last.usage.completion_tokens, last.usage.total_tokens) == (8, 40, 48)  # fmt: skip
    assert len({e.id for e in events}) == 1


def test_chat_uses_the_simple_template_and_equals_grpc(mesh, api):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    prompt_ids = chat_prompt_ids(messages)
    expected = grpc_tokens(mesh, prompt_token_ids=prompt_ids, max_tokens=10, temperature=0.7, seed=3, ignore_eos=True)  # fmt: skip
    response = api.chat.completions.create(
        model="tiny", messages=messages, max_completion_tokens=10, temperature=0.7, seed=3, extra_body=EXTRA,
    )  # fmt: skip
    [choice] = response.choices
    assert (choice.message.role, choice.message.content) == (
        "assistant",
        TOKENIZER.decode(expected),
    )
    assert choice.token_ids == expected and choice.prompt_token_ids == prompt_ids
    assert (response.usage.prompt_tokens, response.usage.completion_tokens) == (len(prompt_ids), 10)
    assert response.id.startswith("chatcmpl-") and response.object == "chat.completion"

    stream = api.chat.completions.create(
        model="tiny", messages=messages, max_tokens=10, temperature=0.7, seed=3, stream=True,
        stream_options={"include_usage": True}, extra_body=EXTRA,
    )  # fmt: skip
    *chunks, last = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content for c in chunks) == TOKENIZER.decode(expected)
    assert [t for c in chunks for t in c.choices[0].token_ids] == expected
    assert chunks[-1].choices[0].finish_reason == "length"
    assert last.usage.completion_tokens == 10 and last.object == "chat.completion.chunk"


def test_n_choices_use_seed_plus_i_and_reproduce(mesh, api):
    def ask():
        return api.completions.create(
            model="tiny", prompt=["ab", "xyz"], n=3, max_tokens=6, temperature=1.0, seed=40,
            extra_body=EXTRA,
        )  # fmt: skip

    first, again = ask(), ask()
    assert [c.index for c in first.choices] == list(range(6))
    for prompt_index, prompt in enumerate(["ab", "xyz"]):
        for i in range(3):
            choice = first.choices[prompt_index * 3 + i]
            expected = grpc_tokens(mesh, prompt, max_tokens=6, temperature=1.0, seed=40 + i, ignore_eos=True)  # fmt: skip
            assert choice.token_ids == expected, (prompt, i)
    assert [c.token_ids for c in again.choices] == [c.token_ids for c in first.choices]
    assert len({tuple(c.token_ids) for c in first.choices}) > 1  # the seeds differ
    # Prompt tokens counted once per prompt, completion tokens per choice.
    assert (first.usage.prompt_tokens, first.usage.completion_tokens) == (3 + 4, 36)


def _stop_for(tokens: list[int]) -> tuple[str, int]:
    """A one-byte stop string that occurs in the output (not at its start), and where."""
    for index in range(2, len(tokens)):
        if 32 <= tokens[index] < 127:
            return chr(tokens[index]), tokens.index(tokens[index])
    raise AssertionError(f"no printable ASCII token in {tokens}")


@pytest.mark.parametrize("stream", [False, True])
def test_stop_string_cuts_the_output_and_frees_the_request(mesh, api, stream):
    sampling = {"max_tokens": 200, "temperature": 1.0, "seed": 11}
    tokens = grpc_tokens(mesh, PROMPT, ignore_eos=True, **sampling)
    stop, index = _stop_for(tokens)
    finished_before = _finished_counts(mesh)
    response = api.completions.create(
        model="tiny", prompt=PROMPT, stop=[stop, "\x00\x00never"], stream=stream,
        extra_body=EXTRA, **({"stream_options": {"include_usage": True}} if stream else {}), **sampling,
    )  # fmt: skip
    if stream:
        *chunks, last = list(response)
        text = "".join(c.choices[0].text for c in chunks)
        finish, usage = chunks[-1].choices[0].finish_reason, last.usage
        token_ids = [t for c in chunks for t in c.choices[0].token_ids]
    else:
        [choice] = response.choices
        text, finish, usage, token_ids = choice.text, choice.finish_reason, response.usage, choice.token_ids  # fmt: skip
    assert (text, finish) == (TOKENIZER.decode(tokens[:index]), "stop")
    assert token_ids == tokens[: index + 1]  # up to the token that completed the stop
    assert usage.completion_tokens == index + 1
    # The gateway's metrics count it as finished by "stop", not as an abort.
    finished = _finished_counts(mesh)
    assert finished.get("stop", 0) - finished_before.get("stop", 0) == 1
    assert finished.get("abort", 0) == finished_before.get("abort", 0)


def _finished_counts(mesh) -> dict[str, float]:
    """llmesh:request_success_total by finished_reason, from the gateway's /metrics."""
    page = httpx.get(f"http://{mesh.gateway.metrics_address}/metrics", timeout=10).text
    return {
        reason: float(value)
        for reason, value in re.findall(
            r'^llmesh:request_success_total\{finished_reason="(\w+)",model_name="tiny"\} (\S+)$',
            page,
            re.M,
        )
    }


def test_stop_token_ids_end_like_eos(mesh, api):
    tokens = grpc_tokens(mesh, PROMPT, max_tokens=30, seed=2, temperature=1.0, ignore_eos=True)
    stop_id = tokens[5]
    response = api.completions.create(
        model="tiny", prompt=PROMPT, max_tokens=30, seed=2, temperature=1.0,
        extra_body={**EXTRA, "stop_token_ids": [stop_id]},
    )  # fmt: skip
    expected = grpc_tokens(mesh, PROMPT, max_tokens=30, seed=2, temperature=1.0, ignore_eos=True, stop_token_ids=[stop_id])  # fmt: skip
    assert response.choices[0].token_ids == expected == tokens[: tokens.index(stop_id) + 1]
    assert response.choices[0].finish_reason == "stop"


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": 5000}, "prompt"),
        ({"temperature": -1}, "temperature"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_p": 0}, "top_p"),
        ({"n": 0}, "n"),
        ({"seed": "x"}, "seed"),
        ({"stop": [""]}, "stop"),
        ({"logprobs": 1}, "logprobs"),
        ({"presence_penalty": 1.0}, "presence_penalty"),
        ({"frequency_penalty": 1.0}, "frequency_penalty"),
        ({"logit_bias": {"1": 5}}, "logit_bias"),
        ({"echo": True}, "echo"),
        ({"suffix": "x"}, "suffix"),
        ({"best_of": 2}, "best_of"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
        ({"prompt": [1, 9999]}, "prompt"),
        ({"prompt": ""}, "prompt"),
        ({"extra_body": {"top_k": -5}}, "top_k"),
        ({"extra_body": {"priority": 3}}, "priority"),
        ({"extra_body": {"stop_token_ids": [999]}}, "stop_token_ids"),
        ({"extra_body": {"no_such_field": 1}}, "no_such_field"),
    ],
)
def test_each_invalid_completion_field_is_a_400_naming_it(api, kwargs, param):
    request = {"model": "tiny", "prompt": PROMPT, **kwargs}
    with pytest.raises(openai.BadRequestError) as info:
        api.completions.create(**request)
    assert (info.value.status_code, info.value.param, info.value.type) == (400, param, "invalid_request_error")  # fmt: skip
    assert param.split("[")[0] in info.value.message or param == "prompt"


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages"),
        ({"logprobs": True}, "logprobs"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"max_completion_tokens": 0}, "max_completion_tokens"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
    ],
)
def test_each_invalid_chat_field_is_a_400_naming_it(api, kwargs, param):
    request = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], **kwargs}
    with pytest.raises(openai.BadRequestError) as info:
        api.chat.completions.create(**request)
    assert (info.value.status_code, info.value.param) == (400, param)


def test_unknown_model_is_404_and_models_lists_the_served_one(api):
    with pytest.raises(openai.NotFoundError) as info:
        api.completions.create(model="gpt-4o", prompt="x")
    assert (info.value.param, info.value.code) == ("model", "model_not_found")
    assert [m.id for m in api.models.list()] == ["tiny"]
    assert api.models.retrieve("tiny").owned_by == "llmesh"


def test_client_disconnect_mid_stream_aborts_on_the_worker(mesh):
    url = f"http://{mesh.gateway_http_address}/v1/completions"
    body = {"model": "tiny", "prompt": list(range(40)), "max_tokens": 1500, "stream": True,
            "temperature": 0, "ignore_eos": True}  # fmt: skip
    events = []
    with httpx.Client(timeout=TIMEOUT_S) as client, client.stream("POST", url, json=body) as response:  # fmt: skip
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line[len("data: ") :]))
            if len(events) == 2:
                break  # leaving the block closes the connection: the client went away
    assert [e["choices"][0]["finish_reason"] for e in events] == [None, None]
    request_id = f"{events[0]['id']}-0"  # choice 0's request on the mesh

    def cancelled():
        events = log_events(mesh.gateway.log_path, request_id)
        return [e for e in events if e.get("event") == "request_cancelled"]

    [event] = wait_until(cancelled, what="the gateway to abort the request")
    assert 0 < event["num_output_tokens"] < 1500
    for worker in mesh.live_workers():
        load = wait_worker_idle(worker.address).load
        assert (load.num_running, load.num_used_blocks) == (0, 0)


def test_client_giving_up_on_a_whole_response_aborts_every_choice(mesh):
    """No stream: the client times out waiting (n = 2 choices), both are aborted."""
    url = f"http://{mesh.gateway_http_address}/v1/completions"
    user = f"impatient-{time.monotonic_ns()}"
    body = {"model": "tiny", "prompt": [7, 8, 9], "max_tokens": 1500, "n": 2, "user": user,
            "temperature": 0, "ignore_eos": True}  # fmt: skip
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(url, json=body, timeout=httpx.Timeout(TIMEOUT_S, read=1.0))
    [received] = [e for e in log_events(mesh.gateway.log_path) if e.get("user") == user]
    request_ids = [f"{received['response_id']}-{i}" for i in range(2)]

    def cancelled():
        events = [e for r in request_ids for e in log_events(mesh.gateway.log_path, r)]
        found = [e for e in events if e.get("event") == "request_cancelled"]
        return found if len(found) == 2 else None

    assert all(e["num_output_tokens"] < 1500 for e in wait_until(cancelled, what="two aborts"))
    for worker in mesh.live_workers():
        load = wait_worker_idle(worker.address).load
        assert (load.num_running, load.num_used_blocks) == (0, 0)


@pytest.mark.parametrize(
    ("content", "status", "message"),
    [
        (b'{"model": "tiny", "prompt": ', 400, "the request body is not valid JSON"),
        (b'{"model": "tiny", "prompt": "x", "max_tokens": "12"}', 400, 'max_tokens="12" must be an integer >= 1'),
        (b'{"model": "tiny", "prompt": "x", "n": [2]}', 400, "n must be an integer, got [2]"),
        (b'{"model": "tiny", "prompt": "x", "stream": 1}', 400, "stream must be true or false, got 1"),
        (b'{"model": "tiny", "prompt": {"text": "x"}}', 400, "prompt must be a string"),
        (b'{"model": "tiny", "prompt": "x", "frobnicate": true}', 400, "Unrecognized request argument supplied: frobnicate"),
        (b'{"model": "tiny", "prompt": "' + b"a" * (33 * 2**20) + b'"}', 413, "the request body exceeds the limit of 33554432 bytes"),
    ],
)  # fmt: skip
def test_raw_http_bad_requests_are_4xx_in_openai_shape(mesh, content, status, message):
    url = f"http://{mesh.gateway_http_address}/v1/completions"
    response = httpx.post(url, content=content, timeout=TIMEOUT_S)
    body = response.json()
    assert response.status_code == status
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"].startswith(message), body["error"]["message"]
