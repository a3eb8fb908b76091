"""OpenAI request bodies -> GenerationPlan: one GenerateRequest per choice, plus what
only the HTTP face does (stop strings, streaming options, response shape).

    /v1/completions        prompt: str | [str] | [int] | [[int]]   x n   -> choices
    /v1/chat/completions   messages -> chat template -> prompt ids  x n   -> choices

Choice i of a prompt gets `seed + i` when a seed is given, so choice 0 of any request
is token for token what the gRPC API returns for the same prompt and seed. Checks
here are the HTTP ones (JSON types, OpenAI-only fields); the ranges the gRPC API also
has are checked by the shared validation (gateway.validation), whose messages are
renamed to the HTTP field names (`sampling.top_p` -> `top_p`).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

from gateway.http_api.chat_template import ChatTemplate, parse_messages
from gateway.http_api.errors import APIError, invalid
from gateway.http_api.fields import INT64_MAX, Fields, int_list, is_int, shown, string_list
from gateway.validation import MAX_PRIORITY, ModelLimits
from protos import common_pb2, gateway_pb2

MAX_N = 128  # choices per request, over all its prompts (each is a request on the mesh)
MAX_PROMPTS = 256  # prompts in one /v1/completions request
MAX_STOP_STRINGS = 16
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions

# Fields OpenAI defines that llmesh accepts only at their no-op value.
_NO_OP_FIELDS = {
    "frequency_penalty": ((0, 0.0), "llmesh does not apply penalties"),
    "presence_penalty": ((0, 0.0), "llmesh does not apply penalties"),
    "logit_bias": (({},), "llmesh does not bias logits"),
    "echo": ((False,), "the prompt is not echoed back"),
    "suffix": (("",), "llmesh does not insert text"),
    "tools": (([],), "llmesh does not call tools"),
    "tool_choice": (("none",), "llmesh does not call tools"),
    "parallel_tool_calls": ((True, False), ""),
    "functions": (([],), "llmesh does not call functions"),
    "function_call": (("none",), "llmesh does not call functions"),
    "response_format": (({"type": "text"},), "llmesh does not constrain output formats"),
    "store": ((False,), "llmesh stores no completions"),
    "service_tier": (("auto", "default"), "use llmesh's `priority` extension"),
}
_COMPLETION_ONLY = {"echo", "suffix", "best_of"}
_CHAT_ONLY = {
    "tools", "tool_choice", "parallel_tool_calls", "functions", "function_call",
    "response_format", "store", "max_completion_tokens", "top_logprobs", "messages",
}  # fmt: skip


@dataclass(frozen=True)
class Choice:
    index: int  # OpenAI's choice index: prompt_index * n + i
    prompt_index: int
    request: gateway_pb2.GenerateRequest


@dataclass(frozen=True)
class GenerationPlan:
    """A validated OpenAI request, ready to run choice by choice."""

    is_chat: bool
    response_id: str
    model: str
    choices: list[Choice]
    stream: bool = False
    include_usage: bool = False
    stop: tuple[str, ...] = ()
    return_token_ids: bool = False
    user: str | None = None
    # HTTP names of the shared validation's fields, for its error messages.
    field_names: dict[str, str] = field(default_factory=dict)


def _model(fields: Fields, served: tuple[str, ...]) -> str:
    model = fields.take_str("model")
    if model is None:
        raise invalid("model", "model is required (GET /v1/models lists the served model)")
    if model not in served:
        raise APIError(
            404,
            f"The model `{model}` does not exist; this mesh serves {served[0]!r}",
            param="model",
            error_type="not_found_error",
            code="model_not_found",
        )
    return model


def _completion_prompts(fields: Fields) -> list[str | list[int]]:
    """`prompt` as a list of prompts, each text or token ids."""
    value = fields.take("prompt")
    if value is None:
        raise invalid("prompt", "prompt is required")
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value and is_int(value[0]):  # one prompt of token ids
        return [int_list("prompt", value)]
    if not isinstance(value, list) or not value:
        raise invalid(
            "prompt", "prompt must be a string, a list of strings or a non-empty list of token ids"
        )
    if len(value) > MAX_PROMPTS:
        raise invalid("prompt", f"prompt has {len(value)} prompts; at most {MAX_PROMPTS}")
    prompts: list[str | list[int]] = []
    for i, item in enumerate(value):
        if isinstance(item, str):
            prompts.append(item)
        elif isinstance(item, list):
            prompts.append(int_list(f"prompt[{i}]", item))
        else:
            raise invalid(
                "prompt", f"prompt[{i}] must be a string or a list of token ids, got {item!r}"
            )
    return prompts


def _reject_logprobs(fields: Fields) -> None:
    """The engine returns no log-probabilities: say so instead of answering without them."""
    logprobs = fields.take("logprobs")
    top_logprobs = fields.take("top_logprobs")
    if logprobs not in (None, False):
        raise invalid(
            "logprobs", "logprobs is not supported: the llmesh engine returns no log-probabilities"
        )
    if top_logprobs not in (None, 0):
        raise invalid("top_logprobs", "top_logprobs is not supported: the llmesh engine returns no log-probabilities")  # fmt: skip


def _max_tokens(fields: Fields, is_chat: bool) -> tuple[int | None, str]:
    """(max_tokens or None for the default, the field it came from)."""
    max_tokens = fields.take("max_tokens")
    name = "max_tokens"
    if is_chat and fields.has("max_completion_tokens"):
        name = "max_completion_tokens"
        other = max_tokens
        max_tokens = fields.take("max_completion_tokens")
        if other is not None and other != max_tokens:
            raise invalid(name, f"max_tokens={shown(other)} and max_completion_tokens={shown(max_tokens)} disagree; send one")  # fmt: skip
    if max_tokens is None:
        return None, name
    if not is_int(max_tokens) or not 1 <= max_tokens <= 2**31 - 1:
        raise invalid(name, f"{name}={shown(max_tokens)} must be an integer >= 1")
    return max_tokens, name


def _stop(fields: Fields) -> tuple[str, ...]:
    value = fields.take("stop")
    if value is None:
        return ()
    stops = string_list("stop", value, MAX_STOP_STRINGS)
    if any(s == "" for s in stops):
        raise invalid("stop", "stop strings must not be empty")
    return tuple(stops)


def _stream_options(fields: Fields, stream: bool) -> bool:
    options = fields.take_object("stream_options")
    if options is None:
        return False
    if not stream:
        raise invalid("stream_options", "stream_options is only allowed when stream is true")
    unknown = sorted(set(options) - {"include_usage"})
    if unknown:
        raise invalid("stream_options", f"stream_options.{unknown[0]} is not a known option")
    include_usage = options.get("include_usage", False)
    if not isinstance(include_usage, bool):
        raise invalid("stream_options", "stream_options.include_usage must be true or false")
    return include_usage


def _sampling(fields: Fields, max_tokens: int) -> common_pb2.SamplingParams:
    temperature = fields.take_number("temperature", 1.0)
    top_p = fields.take_number("top_p", 1.0)
    if top_p is not None and top_p <= 0:  # proto3 would read 0 as "unset"
        raise invalid("top_p", f"top_p={top_p} must be in (0, 1]")
    top_k = fields.take_int("top_k", 0, minimum=-1)
    stop_token_ids = fields.take("stop_token_ids")
    sampling = common_pb2.SamplingParams(
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=max(top_k, 0),  # -1 (vLLM's "off") = 0
        ignore_eos=fields.take_bool("ignore_eos", False),
    )
    if stop_token_ids is not None:
        sampling.stop_token_ids.extend(int_list("stop_token_ids", stop_token_ids))
    return sampling


def parse_request(
    body: object,
    *,
    is_chat: bool,
    served_models: tuple[str, ...],
    limits: ModelLimits,
    chat_template: ChatTemplate,
) -> GenerationPlan:
    """Check an OpenAI body and plan its choices; raises APIError naming the field."""
    fields = Fields(body)  # fields of the other endpoint stay unread: check_unknown names them
    model = _model(fields, served_models)
    _reject_logprobs(fields)
    for name, (allowed, why) in _NO_OP_FIELDS.items():
        if (name in _CHAT_ONLY and not is_chat) or (name in _COMPLETION_ONLY and is_chat):
            continue
        fields.take_default_only(name, allowed, why)
    if is_chat:
        messages = parse_messages(fields.take("messages"))
        prompts: list[str | list[int]] = [chat_template.prompt_ids(messages)]
        prompt_field = "messages"
    else:
        prompts = _completion_prompts(fields)
        prompt_field = "prompt"
    n = fields.take_int("n", 1, minimum=1, maximum=MAX_N)
    if not is_chat:
        best_of = fields.take_int("best_of", n, minimum=1, maximum=MAX_N)
        if best_of != n:
            raise invalid("best_of", f"best_of={best_of} is not supported unless it equals n={n}")
    max_tokens, max_tokens_field = _max_tokens(fields, is_chat)
    seed = fields.take_int("seed", None, minimum=-(2**63), maximum=INT64_MAX)
    if seed is not None and seed + n - 1 > INT64_MAX:
        raise invalid("seed", f"seed={seed} + n - 1 must fit in 64 bits (choice i uses seed + i)")
    priority = fields.take_int("priority", 0, minimum=0, maximum=MAX_PRIORITY)
    stream = fields.take_bool("stream", False)
    include_usage = _stream_options(fields, stream)
    stop = _stop(fields)
    return_token_ids = fields.take_bool("return_token_ids", False)
    user = fields.take_str("user")
    fields.take_object("metadata")
    sampling = _sampling(fields, max_tokens or _default_max_tokens(is_chat, prompts[0], limits))
    fields.check_unknown()

    if len(prompts) * n > MAX_N:
        # Each choice is a request on the mesh: one HTTP request may not take the
        # admission budget every other client shares.
        raise invalid(
            "n",
            f"n={n} choices for each of {len(prompts)} prompts make {len(prompts) * n} "
            f"requests; at most {MAX_N} in one request",
        )
    prefix = "chatcmpl" if is_chat else "cmpl"
    response_id = f"{prefix}-{uuid.uuid4().hex}"
    choices = []
    for prompt_index, prompt in enumerate(prompts):
        for i in range(n):
            index = prompt_index * n + i
            request = gateway_pb2.GenerateRequest(
                request_id=f"{response_id}-{index}", priority=priority, detokenize=False
            )
            if isinstance(prompt, str):
                request.prompt = prompt
            else:
                request.prompt_token_ids.extend(prompt)
            request.sampling.CopyFrom(sampling)
            if seed is not None:
                request.sampling.seed = seed + i
            choices.append(Choice(index, prompt_index, request))
    return GenerationPlan(
        is_chat=is_chat,
        response_id=response_id,
        model=model,
        choices=choices,
        stream=stream,
        include_usage=include_usage,
        stop=stop,
        return_token_ids=return_token_ids,
        user=user,
        field_names={
            "sampling.max_tokens": max_tokens_field,
            "prompt_token_ids": prompt_field,
            "prompt": prompt_field,
            "sampling.stop_token_ids": "stop_token_ids",
            "sampling.temperature": "temperature",
            "sampling.top_p": "top_p",
            "sampling.top_k": "top_k",
        },
    )


def _default_max_tokens(is_chat: bool, prompt: str | list[int], limits: ModelLimits) -> int:
    """OpenAI's defaults: 16 for completions; for chat, whatever room the context leaves."""
    if not is_chat:
        return COMPLETIONS_DEFAULT_MAX_TOKENS
    room = min(limits.max_model_len, limits.max_tokens_per_instance) - len(prompt)
    return max(room, 1)


def http_error_for(exc: ValueError, plan: GenerationPlan) -> APIError:
    """A shared-validation ValueError, renamed to the HTTP field names: the field it
    starts with is the param; `sampling.*` names are renamed wherever they appear."""
    message = str(exc)
    param = None
    for grpc_name, http_name in sorted(plan.field_names.items(), key=lambda kv: -len(kv[0])):
        if param is None and message.startswith(grpc_name):
            message = http_name + message[len(grpc_name) :]
            param = http_name
        if grpc_name.startswith("sampling."):
            message = message.replace(grpc_name, http_name)
    return invalid(param, message)
