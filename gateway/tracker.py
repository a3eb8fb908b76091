"""Per-request output bookkeeping at the gateway: de-duplication by token index.

Tokens of one request can reach the gateway from several instances (a resumed
request after a worker died, a migrated one whose source still flushes its last step)
and out of order across streams. The tracker keeps the contiguous prefix of the
output, drops indices it already has, and parks early ones until the gap fills:

    tokens:   [t0 t1 t2 t3]            <- contiguous, what the client may see
    pending:           {5: t5, 6: t6}  <- arrived early, waiting for index 4
    finish_at:                   7     <- the output is complete when len(tokens) == 7
"""

from __future__ import annotations

import asyncio
import enum

from services.common.logging import get_logger
from services.common.messages import FinishReason, OutputDelta

log = get_logger(__name__)


class PlacementStatus(enum.Enum):
    """Where the request stands with respect to the instance running it.

    UNPLACED -> PLACED (Submit accepted) -> LOST (instance died / reported ERROR)
    LOST -> UNPLACED (the session re-places it); any -> DONE (finished or aborted).
    """

    UNPLACED = "unplaced"
    PLACED = "placed"
    LOST = "lost"
    DONE = "done"


class RequestTracker:
    """What the gateway received for one request, and whether its instance is alive."""

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        self.tokens: list[int] = []
        self._pending: dict[int, int] = {}
        self.finish_reason = FinishReason.NONE
        self._finish_at: int | None = None
        self.instance_id: str | None = None  # instance running it (submitted or migrated to)
        self.placement_epoch = 0  # newest placement seen: +1 per committed migration
        self.status = PlacementStatus.UNPLACED
        self.lost_reason = ""
        self.num_duplicates = 0
        self._changed = asyncio.Event()

    @property
    def is_finished(self) -> bool:
        return self._finish_at is not None and len(self.tokens) >= self._finish_at

    @property
    def needs_placement(self) -> bool:
        return self.status is PlacementStatus.LOST and not self.is_finished

    def on_output(self, delta: OutputDelta, instance_id: str) -> None:
        """Merge tokens from any instance; only the current instance can fail the request."""
        if self.is_finished:
            return
        if delta.placement_epoch > self.placement_epoch:
            # A live migration moved it: follow the newest placement, whichever stream
            # (the source's move notice or the destination's tokens) arrives first.
            self.placement_epoch = delta.placement_epoch
            self.instance_id = delta.moved_to_instance_id or instance_id
            if self.status is PlacementStatus.LOST:
                self.status = PlacementStatus.PLACED
        for offset, token_id in enumerate(delta.token_ids):
            index = delta.first_token_index + offset
            if index < len(self.tokens):
                self.num_duplicates += 1
                if self.tokens[index] != token_id:
                    log.warning(
                        "token_mismatch",
                        request_id=self.request_id,
                        index=index,
                        kept=self.tokens[index],
                        got=token_id,
                        instance_id=instance_id,
                    )
                continue
            self._pending.setdefault(index, token_id)
        while len(self.tokens) in self._pending:
            self.tokens.append(self._pending.pop(len(self.tokens)))
        reason = delta.finish_reason
        if reason in (FinishReason.LENGTH, FinishReason.STOP):
            self._finish(reason, delta.first_token_index + len(delta.token_ids))
        elif reason in (FinishReason.ABORT, FinishReason.ERROR) and instance_id == self.instance_id:
            if reason is FinishReason.ABORT:
                self._finish(reason, len(self.tokens))
            else:
                self.mark_lost(instance_id, f"instance reported an error: {delta.error}")
        if self.is_finished:
            self.status = PlacementStatus.DONE
            self._pending.clear()
        self._changed.set()

    def _finish(self, reason: FinishReason, finish_at: int) -> None:
        if self._finish_at is None or finish_at < self._finish_at:
            self._finish_at = finish_at
            self.finish_reason = reason

    def finish_aborted(
        self, reason: FinishReason = FinishReason.ABORT, num_tokens: int | None = None
    ) -> None:
        """The client or an operator aborted it (or, with reason STOP, a stop string the
        gateway found ended it at num_tokens): complete at what was received so far."""
        self._finish(reason, len(self.tokens) if num_tokens is None else num_tokens)
        self.status = PlacementStatus.DONE
        self._pending.clear()
        self._changed.set()

    def mark_placed(self, instance_id: str) -> None:
        self.instance_id = instance_id
        self.placement_epoch = 0  # a fresh Submit starts a new placement history
        if self.status is not PlacementStatus.DONE:
            self.status = PlacementStatus.PLACED

    def mark_lost(self, instance_id: str, reason: str) -> bool:
        """The instance running it is gone; True if that concerned this request."""
        if instance_id != self.instance_id or self.status in (
            PlacementStatus.DONE,
            PlacementStatus.LOST,
        ):
            return False
        self.status = PlacementStatus.LOST
        self.lost_reason = reason
        self._changed.set()
        return True

    def mark_unplaced(self) -> None:
        if self.status is not PlacementStatus.DONE:
            self.status = PlacementStatus.UNPLACED

    async def wait_changed(self) -> None:
        await self._changed.wait()
        self._changed.clear()
