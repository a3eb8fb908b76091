"""Request selection: which running requests a migration source sends away.

The source's llumlet (or the simulator's instance) calls
`select(running, num_requests, max_blocks)` with the requests it could migrate now
(running, not already migrating) and gets request ids in migration order.

Registered names:
    shortest_first          Llumnix's default: fewest tokens first (least KV to copy).
    lowest_priority_first   lowest priority first, then fewest tokens: high-priority
                            requests stay put. The default (same as shortest_first
                            when every request has the same priority).
    longest_first           most tokens first (frees the most blocks per migration).

Ties go to the lowest request id. Requests holding more than `max_blocks` blocks (the
destination's free blocks, when known) are skipped.
"""

from __future__ import annotations

from collections.abc import Sequence

from services.policies.load import RunningRequest
from services.policies.registry import register_selection


class SelectionPolicy:
    """Base class: `sort_key` orders candidates; `select` takes the first that fit."""

    name = "base"

    def sort_key(self, request: RunningRequest) -> tuple:
        raise NotImplementedError

    def select(
        self,
        running: Sequence[tuple[str, int, int, int]],
        num_requests: int,
        max_blocks: int | None = None,
    ) -> list[str]:
        if num_requests < 0:
            raise ValueError(f"num_requests={num_requests} must be >= 0")
        candidates = sorted((RunningRequest(*r) for r in running), key=self.sort_key)
        chosen: list[str] = []
        budget = max_blocks
        for request in candidates:
            if len(chosen) == num_requests:
                break
            if budget is not None:
                if request.num_blocks > budget:
                    continue
                budget -= request.num_blocks
            chosen.append(request.request_id)
        return chosen


@register_selection("shortest_first")
class ShortestFirstSelection(SelectionPolicy):
    name = "shortest_first"

    def sort_key(self, request):
        return (request.num_tokens, request.request_id)


@register_selection("lowest_priority_first")
class LowestPriorityFirstSelection(SelectionPolicy):
    name = "lowest_priority_first"

    def sort_key(self, request):
        return (request.priority, request.num_tokens, request.request_id)


@register_selection("longest_first")
class LongestFirstSelection(SelectionPolicy):
    name = "longest_first"

    def sort_key(self, request):
        return (-request.num_tokens, request.request_id)
