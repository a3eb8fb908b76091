"""OpenAI response objects: whole responses, streamed chunks and usage.

Completions are `text_completion` objects with choices[i].text; chat completions are
`chat.completion` objects with choices[i].message (streamed: `chat.completion.chunk`
with choices[i].delta, the first delta of each choice carrying the role). With the
`return_token_ids` extension each choice also carries its `token_ids` (and, on a
choice's first appearance, its `prompt_token_ids`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from gateway.http_api.protocol import GenerationPlan
from gateway.http_api.runner import ChoiceEvent, PlanRun


def usage(run: PlanRun) -> dict:
    num_completion = sum(run.num_completion_tokens.values())
    return {
        "prompt_tokens": run.num_prompt_tokens,
        "completion_tokens": num_completion,
        "total_tokens": run.num_prompt_tokens + num_completion,
    }


def _header(plan: GenerationPlan, created: int, is_chunk: bool) -> dict:
    if plan.is_chat:
        kind = "chat.completion.chunk" if is_chunk else "chat.completion"
    else:
        kind = "text_completion"
    return {"id": plan.response_id, "object": kind, "created": created, "model": plan.model}


@dataclass
class _ChoiceResult:
    text: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None


class CompleteResponse:
    """Collects a non-streamed request's events into its one response object."""

    def __init__(self, run: PlanRun, created: int) -> None:
        self._run = run
        self._created = created
        self._results = {c.index: _ChoiceResult() for c in run.plan.choices}

    def add(self, event: ChoiceEvent) -> None:
        result = self._results[event.choice.index]
        result.text.append(event.text)
        result.token_ids.extend(event.token_ids)
        result.finish_reason = event.finish_reason or result.finish_reason

    def body(self) -> dict:
        plan = self._run.plan
        choices = []
        for choice in plan.choices:
            result = self._results[choice.index]
            entry: dict = {"index": choice.index}
            text = "".join(result.text)
            if plan.is_chat:
                entry["message"] = {"role": "assistant", "content": text}
            else:
                entry["text"] = text
            entry["logprobs"] = None
            entry["finish_reason"] = result.finish_reason
            if plan.return_token_ids:
                entry["token_ids"] = result.token_ids
                entry["prompt_token_ids"] = self._run.prompt_token_ids[choice.prompt_index]
            choices.append(entry)
        return {
            **_header(plan, self._created, is_chunk=False),
            "choices": choices,
            "usage": usage(self._run),
        }


class StreamChunks:
    """The SSE chunk of each event, and the final usage chunk."""

    def __init__(self, run: PlanRun, created: int) -> None:
        self._run = run
        self._created = created
        self._seen: set[int] = set()

    def chunk(self, event: ChoiceEvent) -> dict:
        plan = self._run.plan
        choice = event.choice
        is_first = choice.index not in self._seen
        self._seen.add(choice.index)
        entry: dict = {"index": choice.index}
        if plan.is_chat:
            entry["delta"] = {"role": "assistant", "content": event.text} if is_first else {"content": event.text}  # fmt: skip
        else:
            entry["text"] = event.text
        entry["logprobs"] = None
        entry["finish_reason"] = event.finish_reason
        if plan.return_token_ids:
            entry["token_ids"] = event.token_ids
            if is_first:
                entry["prompt_token_ids"] = self._run.prompt_token_ids[choice.prompt_index]
        body = {**_header(plan, self._created, is_chunk=True), "choices": [entry]}
        if plan.include_usage:
            body["usage"] = None  # OpenAI: null on every chunk but the last
        return body

    def usage_chunk(self) -> dict:
        return {
            **_header(self._run.plan, self._created, is_chunk=True),
            "choices": [],
            "usage": usage(self._run),
        }
