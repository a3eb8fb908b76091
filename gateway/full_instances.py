"""Instances that just refused a Submit because their waiting queue was full.

Each is remembered for the retry hint it sent (`retry-after-ms`): placements skip it
meanwhile, and when every live instance is marked full the gateway sheds a new
request with RESOURCE_EXHAUSTED at once, without a Dispatch or Submit round trip per
instance (under overload the refusals would otherwise cost the mesh's CPU as much as
the admitted work).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from services.common.errors import ResourceExhaustedError


class FullInstances:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._full_until: dict[str, float] = {}

    def add(self, instance_id: str, retry_after_s: float) -> None:
        self._full_until[instance_id] = self._clock() + retry_after_s

    def current(self) -> dict[str, float]:
        """Instance id -> seconds until it may take requests again (only those still full)."""
        now = self._clock()
        self._full_until = {i: t for i, t in self._full_until.items() if t > now}
        return {i: t - now for i, t in self._full_until.items()}

    def check(self, live: Iterable[str]) -> set[str]:
        """The full ones among `live`; ResourceExhaustedError when that is all of them."""
        full = self.current()
        live = set(live)
        if live and live <= full.keys():
            raise ResourceExhaustedError(
                f"every instance's waiting queue is full ({', '.join(sorted(live))}); retry later",
                min(full[i] for i in live),
            )
        return live & full.keys()
