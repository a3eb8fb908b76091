"""Runs a GenerationPlan's choices on the shared request path (gateway.generations).

    start()    open + place every choice; the first failure (400/404/429/503) cancels
               the others and is raised before the client sees a byte
    events()   ChoiceEvents as the worker pushes them: one per engine output batch per
               choice, the last of each choice with its finish reason
    close()    cancel whatever still runs: each choice's session is aborted on its worker

Each choice runs in its own task, which enters and leaves its session there.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

from gateway.generations import Generations
from gateway.http_api.errors import APIError, from_service_error
from gateway.http_api.protocol import Choice, GenerationPlan, http_error_for
from gateway.http_api.text import ChoiceText
from gateway.key_limits import ANONYMOUS
from services.common.errors import ServiceError
from services.common.logging import get_logger
from services.common.messages import FinishReason

log = get_logger(__name__)

EVENTS_PER_CHOICE = 8  # chunks a choice may have queued for the HTTP response


@dataclass
class ChoiceEvent:
    """New output of one choice (one engine batch); finish_reason set on its last."""

    choice: Choice
    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    error: APIError | None = None  # the choice failed after it was placed


class PlanRun:
    def __init__(
        self, generations: Generations, plan: GenerationPlan, client_key: str = ANONYMOUS
    ) -> None:
        self._generations = generations
        self.plan = plan
        self._client_key = client_key  # per-key limits (gateway/key_limits.py)
        # Bounded: a slow client makes its choices wait here, and their tokens
        # coalesce in the session's tracker (one list per request, <= max_tokens).
        self._events: asyncio.Queue[ChoiceEvent] = asyncio.Queue(
            EVENTS_PER_CHOICE * len(plan.choices)
        )
        self._tasks: list[asyncio.Task] = []
        self.prompt_token_ids: dict[int, list[int]] = {}  # by prompt index
        self.num_completion_tokens: dict[int, int] = {}  # by choice index

    @property
    def num_prompt_tokens(self) -> int:
        return sum(len(ids) for ids in self.prompt_token_ids.values())

    def _api_error(self, exc: Exception) -> APIError:
        if isinstance(exc, APIError):
            return exc
        if isinstance(exc, ServiceError):
            return from_service_error(exc)
        if isinstance(exc, ValueError):
            return http_error_for(exc, self.plan)
        log.exception("http_choice_internal_error", error=str(exc))
        return APIError(500, f"internal error: {exc}", error_type="internal_error")

    async def start(self) -> None:
        placed = [asyncio.get_running_loop().create_future() for _ in self.plan.choices]
        self._tasks = [
            asyncio.create_task(self._run_choice(choice, done))
            for choice, done in zip(self.plan.choices, placed, strict=True)
        ]
        try:
            await asyncio.wait(placed, return_when=asyncio.FIRST_EXCEPTION)
            errors = [f.exception() for f in placed if f.done() and f.exception()]
            if errors:
                raise errors[0]
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def events(self) -> AsyncIterator[ChoiceEvent]:
        num_open = len(self.plan.choices)
        while num_open:
            event = await self._events.get()
            if event.finish_reason is not None or event.error is not None:
                num_open -= 1
            yield event

    async def _run_choice(self, choice: Choice, placed: asyncio.Future) -> None:
        try:
            session = self._generations.open(choice.request, self._client_key)
            self.prompt_token_ids[choice.prompt_index] = list(session.spec.prompt_token_ids)
            async with self._generations.run(session):
                placed.set_result(None)
                await self._stream_choice(choice, session)
        except Exception as exc:
            error = self._api_error(exc)
            if not placed.done():
                placed.set_exception(error)
            else:  # e.g. its worker died and no other instance took it over
                log.warning(
                    "http_choice_failed", request_id=choice.request.request_id, error=str(exc)
                )
                await self._events.put(ChoiceEvent(choice, "", [], error=error))

    async def _stream_choice(self, choice: Choice, session) -> None:
        text = ChoiceText(self._generations.tokenizer, self.plan.stop)
        tokens = session.tracker.tokens
        async for chunk in session.chunks():
            num_tokens = chunk.first_token_index + len(chunk.token_ids)
            is_final = chunk.finish_reason is not FinishReason.NONE
            piece = text.push(tokens[:num_tokens], is_final=is_final)
            self.num_completion_tokens[choice.index] = text.num_tokens
            if text.is_stopped:
                token_ids = tokens[chunk.first_token_index : text.num_tokens]
                await self._events.put(ChoiceEvent(choice, piece, token_ids, "stop"))
                log.info(
                    "request_stop_string",
                    request_id=session.request_id,
                    num_output_tokens=text.num_tokens,
                )
                # The stop string ended it: free its blocks now; it finished as "stop".
                session.abort(FinishReason.STOP, text.num_tokens)
                return
            reason = chunk.finish_reason.value if is_final else None
            await self._events.put(ChoiceEvent(choice, piece, list(chunk.token_ids), reason))
