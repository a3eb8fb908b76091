"""OpenAI bodies -> GenerationPlan: the GenerateRequests per choice, and a 400 (or 404)
naming the field for every bad one."""

from __future__ import annotations

import pytest

from gateway.http_api.chat_template import ChatTemplate
from gateway.http_api.errors import APIError
from gateway.http_api.protocol import http_error_for, parse_request
from gateway.validation import ModelLimits
from services.common.tokenizer import ByteTokenizer

LIMITS = ModelLimits("tiny", 258, 2048, 257, 4096)


def plan(body: dict, is_chat: bool = False):
    return parse_request(
        body,
        is_chat=is_chat,
        served_models=("tiny",),
        limits=LIMITS,
        chat_template=ChatTemplate(ByteTokenizer()),
    )


def error_of(body, is_chat: bool = False) -> tuple[int, str | None, str]:
    with pytest.raises(APIError) as info:
        plan(body, is_chat)
    return info.value.status, info.value.param, info.value.message


def test_completion_fields_become_one_generate_request_per_choice():
    p = plan(
        {
            "model": "tiny",
            "prompt": ["ab", [5, 6, 7]],
            "n": 2,
            "max_tokens": 9,
            "temperature": 0.5,
            "top_p": 0.75,
            "top_k": 20,
            "seed": 100,
            "stop": "x",
            "stop_token_ids": [3],
            "ignore_eos": True,
            "priority": 1,
            "user": "u1",
            "stream": True,
            "stream_options": {"include_usage": True},
        }
    )
    assert [(c.index, c.prompt_index) for c in p.choices] == [(0, 0), (1, 0), (2, 1), (3, 1)]
    requests = [c.request for c in p.choices]
    assert [r.prompt for r in requests] == ["ab", "ab", "", ""]
    assert [list(r.prompt_token_ids) for r in requests] == [[], [], [5, 6, 7], [5, 6, 7]]
    assert [r.sampling.seed for r in requests] == [100, 101, 100, 101]  # seed + i per prompt
    s = requests[0].sampling
    assert (s.max_tokens, s.temperature, s.top_p, s.top_k, list(s.stop_token_ids), s.ignore_eos) == (
        9, 0.5, 0.75, 20, [3], True,
    )  # fmt: skip
    assert {r.priority for r in requests} == {1}
    assert len({r.request_id for r in requests}) == 4
    assert all(r.request_id.startswith(p.response_id) for r in requests)
    assert (p.stream, p.include_usage, p.stop, p.user, p.is_chat) == (
        True,
        True,
        ("x",),
        "u1",
        False,
    )


def test_defaults_follow_openai():
    p = plan({"model": "tiny", "prompt": "hi"})
    request = p.choices[0].request
    assert (request.sampling.max_tokens, request.sampling.temperature) == (16, 1.0)
    assert not request.sampling.HasField("seed")  # the shared validation picks one
    chat = plan({"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}, is_chat=True)
    prompt_ids = list(chat.choices[0].request.prompt_token_ids)
    assert prompt_ids == ByteTokenizer().encode("<|user|>\nhi\n<|assistant|>\n")
    assert chat.choices[0].request.sampling.max_tokens == 2048 - len(prompt_ids)


def test_chat_max_completion_tokens_and_top_k_off():
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}
    p = plan({**body, "max_completion_tokens": 5, "top_k": -1}, is_chat=True)
    assert (p.choices[0].request.sampling.max_tokens, p.choices[0].request.sampling.top_k) == (5, 0)
    assert p.field_names["sampling.max_tokens"] == "max_completion_tokens"


BASE = {"model": "tiny", "prompt": "hi"}


@pytest.mark.parametrize(
    ("body", "param", "message"),
    [
        ({"prompt": "hi"}, "model", "model is required"),
        ({**BASE, "prompt": None}, "prompt", "prompt is required"),
        ({**BASE, "prompt": []}, "prompt", "prompt must be a string"),
        ({**BASE, "prompt": [1, "a"]}, "prompt", "prompt[1]=\"a\" must be an integer in [0, 2147483647]"),
        ({**BASE, "prompt": ["a", 1]}, "prompt", "prompt[1] must be a string or a list of token ids"),
        ({**BASE, "prompt": [[1, -2]]}, "prompt[0]", "prompt[0][1]=-2 must be an integer"),
        ({**BASE, "prompt": 5}, "prompt", "prompt must be a string"),
        ({**BASE, "max_tokens": 0}, "max_tokens", "max_tokens=0 must be an integer >= 1"),
        ({**BASE, "max_tokens": "5"}, "max_tokens", 'max_tokens="5" must be an integer >= 1'),
        ({**BASE, "max_tokens": True}, "max_tokens", "max_tokens=True must be an integer >= 1"),
        ({**BASE, "temperature": "hot"}, "temperature", 'temperature must be a number, got "hot"'),
        ({**BASE, "top_p": 0}, "top_p", "top_p=0.0 must be in (0, 1]"),
        ({**BASE, "top_k": -2}, "top_k", "top_k=-2 must be in [-1, 2147483647]"),
        ({**BASE, "n": 0}, "n", "n=0 must be in [1, 128]"),
        ({**BASE, "n": 2.5}, "n", "n must be an integer, got 2.5"),
        ({**BASE, "seed": "1"}, "seed", 'seed must be an integer, got "1"'),
        ({**BASE, "seed": 2**63 - 1, "n": 2}, "seed", "seed=9223372036854775807 + n - 1 must fit"),
        ({**BASE, "priority": 2}, "priority", "priority=2 must be in [0, 1]"),
        ({**BASE, "stream": "yes"}, "stream", 'stream must be true or false, got "yes"'),
        ({**BASE, "stream_options": {"include_usage": True}}, "stream_options", "stream_options is only allowed when stream is true"),
        ({**BASE, "stream": True, "stream_options": {"x": 1}}, "stream_options", "stream_options.x is not a known option"),
        ({**BASE, "stream": True, "stream_options": {"continuous_usage_stats": True}}, "stream_options", "stream_options.continuous_usage_stats is not a known option"),
        ({**BASE, "stop": 3}, "stop", "stop must be a string or a list of strings"),
        ({**BASE, "stop": [""]}, "stop", "stop strings must not be empty"),
        ({**BASE, "stop": ["a"] * 17}, "stop", "stop has 17 entries"),
        ({**BASE, "stop_token_ids": [1, 2**40]}, "stop_token_ids", "stop_token_ids[1]=1099511627776 must be an integer"),
        ({**BASE, "logprobs": 2}, "logprobs", "logprobs is not supported"),
        ({**BASE, "best_of": 3}, "best_of", "best_of=3 is not supported unless it equals n=1"),
        ({**BASE, "echo": True}, "echo", "echo=True is not supported"),
        ({**BASE, "presence_penalty": 0.5}, "presence_penalty", "presence_penalty=0.5 is not supported"),
        ({**BASE, "frequency_penalty": 1}, "frequency_penalty", "frequency_penalty=1 is not supported"),
        ({**BASE, "logit_bias": {"5": 1}}, "logit_bias", "logit_bias={'5': 1} is not supported"),
        ({**BASE, "user": 5}, "user", "user must be a string, got 5"),
        ({**BASE, "ignore_eos": 1}, "ignore_eos", "ignore_eos must be true or false, got 1"),
        ({**BASE, "messages": []}, "messages", "Unrecognized request argument supplied: messages"),
        ({**BASE, "bogus": 1}, "bogus", "Unrecognized request argument supplied: bogus"),
    ],
)  # fmt: skip
def test_completion_errors_name_the_field(body, param, message):
    status, got_param, got_message = error_of(body)
    assert (status, got_param) == (400, param)
    assert got_message.startswith(message), got_message


CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.parametrize(
    ("body", "param", "message"),
    [
        ({"model": "tiny"}, "messages", "messages must be a non-empty list"),
        ({**CHAT, "messages": [{"role": "bot", "content": "x"}]}, "messages", "messages[0].role='bot' must be one of"),
        ({**CHAT, "messages": ["hi"]}, "messages", "messages[0] must be an object"),
        ({**CHAT, "messages": [{"role": "user", "content": 5}]}, "messages", "messages[0].content must be a string"),
        ({**CHAT, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages", "messages[0].content[0] of type 'image_url' is not supported"),
        ({**CHAT, "logprobs": True}, "logprobs", "logprobs is not supported"),
        ({**CHAT, "top_logprobs": 3}, "top_logprobs", "top_logprobs is not supported"),
        ({**CHAT, "max_tokens": 4, "max_completion_tokens": 5}, "max_completion_tokens", "max_tokens=4 and max_completion_tokens=5 disagree"),
        ({**CHAT, "tools": [{"type": "function"}]}, "tools", "tools=[{'type': 'function'}] is not supported"),
        ({**CHAT, "response_format": {"type": "json_object"}}, "response_format", "response_format="),
        ({**CHAT, "prompt": "x"}, "prompt", "Unrecognized request argument supplied: prompt"),
        ({**CHAT, "echo": False}, "echo", "Unrecognized request argument supplied: echo"),
    ],
)  # fmt: skip
def test_chat_errors_name_the_field(body, param, message):
    status, got_param, got_message = error_of(body, is_chat=True)
    assert (status, got_param) == (400, param)
    assert got_message.startswith(message), got_message


def test_unknown_model_is_404_and_non_objects_400():
    assert error_of({"model": "gpt-4", "prompt": "x"})[:2] == (404, "model")
    assert error_of([1, 2])[:2] == (400, None)


def test_no_op_values_of_unsupported_fields_are_accepted():
    p = plan(
        {**BASE, "presence_penalty": 0, "frequency_penalty": 0.0, "logit_bias": {}, "echo": False,
         "logprobs": None, "best_of": 1, "metadata": {"k": "v"}}
    )  # fmt: skip
    assert len(p.choices) == 1


def test_shared_validation_messages_get_http_field_names():
    p = plan({"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}, is_chat=True)
    renamed = http_error_for(ValueError("prompt_token_ids is too long: 3000 prompt tokens"), p)
    assert (renamed.param, renamed.message) == (
        "messages",
        "messages is too long: 3000 prompt tokens",
    )
    renamed = http_error_for(ValueError("sampling.temperature=-1.0 must be >= 0"), p)
    assert (renamed.param, renamed.message) == ("temperature", "temperature=-1.0 must be >= 0")


def test_choices_over_all_prompts_are_capped_naming_n():
    # 2 prompts x 64 = 128 requests on the mesh: the most one HTTP request may open.
    assert len(plan({"model": "tiny", "prompt": ["a", "b"], "n": 64}).choices) == 128
    status, param, message = error_of({"model": "tiny", "prompt": ["a", "b", "c"], "n": 64})
    assert (status, param) == (400, "n")
    assert (
        message
        == "n=64 choices for each of 3 prompts make 192 requests; at most 128 in one request"
    )
