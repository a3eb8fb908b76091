"""A minimal discrete-event loop in virtual time.

Events are (time, seq, callback, arg); equal times run in the order they were
scheduled, so a run is a pure function of its inputs.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable
from typing import Any


class EventLoop:
    def __init__(self) -> None:
        self.now = 0.0
        self._heap: list[tuple[float, int, Callable[[Any], None], Any]] = []
        self._seq = 0
        self.num_events = 0

    def at(self, time: float, callback: Callable[[Any], None], arg: Any = None) -> None:
        """Runs callback(arg) at virtual time `time` (never before now)."""
        assert time >= self.now, (time, self.now)
        heapq.heappush(self._heap, (time, self._seq, callback, arg))
        self._seq += 1

    def run(self, is_done: Callable[[], bool]) -> None:
        """Runs events in time order until `is_done()` or no event is left."""
        heap = self._heap
        while heap and not is_done():
            time, _, callback, arg = heapq.heappop(heap)
            self.now = time
            self.num_events += 1
            callback(arg)
