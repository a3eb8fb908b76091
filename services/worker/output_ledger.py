"""Every token each request owned here has produced, so another gateway can take it over.

A gateway that dies leaves its requests running on their workers. When the client
resumes on another gateway (Gateway.Resume), that gateway asks the worker to re-home the
request (Worker.Rehome): the worker answers with the request as the ledger knows it
(prompt, sampling, every token published so far, whether it finished) and sends every
later token to the new gateway. Kept on the event loop, beside the output router, so
"what was published" and "where the next token goes" change together.

    open(state)        Submit or a migration in: the request's prompt, sampling, tokens so far
    record(deltas)     each step's published outputs (tokens by index; LENGTH/STOP finish)
    discard(id)        it left (migrated away, given up, aborted): nothing to hand over
    get(id)            the entry, or None (unknown, or finished longer than retention_s ago)

A request that finished (LENGTH or STOP) keeps its token ids, only those, for
`retention_s`: its gateway may have died before the last tokens reached the client.
Its KV blocks were freed when it finished, like any other.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from services.common.messages import FinishReason, OutputDelta
from services.worker.engine import RequestState


@dataclass
class LedgerEntry:
    """One request: what it was admitted with and what it produced since."""

    state: RequestState  # prompt, sampling, priority (its output tokens: see `tokens`)
    tokens: list[int] = field(default_factory=list)
    finish_reason: FinishReason = FinishReason.NONE
    finished_at: float | None = None

    @property
    def is_finished(self) -> bool:
        return self.finished_at is not None


class OutputLedger:
    def __init__(self, retention_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.retention_s = retention_s
        self._clock = clock
        self._entries: dict[str, LedgerEntry] = {}
        # Finished entries in finishing order (the oldest expire first).
        self._finished: collections.OrderedDict[str, float] = collections.OrderedDict()

    def __len__(self) -> int:
        self.expire()
        return len(self._entries)

    def open(self, state: RequestState) -> None:
        """A request starts here (new, resumed, or migrated in with its tokens so far).
        One running here already keeps its entry (the engine refuses the duplicate)."""
        existing = self._entries.get(state.request_id)
        if existing is not None and not existing.is_finished:
            return
        self._finished.pop(state.request_id, None)
        self._entries[state.request_id] = LedgerEntry(state, list(state.output_token_ids))

    def record(self, deltas: list[OutputDelta]) -> None:
        for delta in deltas:
            entry = self._entries.get(delta.request_id)
            if entry is None or entry.is_finished:
                continue
            if delta.token_ids:
                # By index: a step's tokens follow what the entry has (or overlap it).
                del entry.tokens[delta.first_token_index :]
                entry.tokens.extend(delta.token_ids)
            if delta.finish_reason in (FinishReason.LENGTH, FinishReason.STOP):
                entry.finish_reason = delta.finish_reason
                entry.finished_at = self._clock()
                self._finished[delta.request_id] = entry.finished_at
            elif delta.finish_reason is not FinishReason.NONE:
                # ABORT: nobody wants it; ERROR: its gateway re-places it elsewhere.
                self.discard(delta.request_id)
        self.expire()

    def discard(self, request_id: str) -> None:
        """It left this worker unfinished: another one (or nobody) holds it now."""
        entry = self._entries.get(request_id)
        if entry is not None and not entry.is_finished:
            del self._entries[request_id]

    def get(self, request_id: str) -> LedgerEntry | None:
        self.expire()
        return self._entries.get(request_id)

    def expire(self) -> None:
        """Release finished entries older than retention_s."""
        horizon = self._clock() - self.retention_s
        while self._finished:
            request_id, finished_at = next(iter(self._finished.items()))
            if finished_at > horizon:
                return
            del self._finished[request_id]
            self._entries.pop(request_id, None)
