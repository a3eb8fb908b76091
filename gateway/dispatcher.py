"""Where to run a request: ask the scheduler, else decide locally.

    1. Scheduler.Dispatch (with a deadline)               the normal path
    2. "freest" over the gateway's cached cluster view    scheduler down, view fresh
    3. "round_robin" over the same view's instances       scheduler down, view stale

Both local paths skip the instances the view shows draining (terminating); the view
keeps an instance missing from a refresh for its forget_after_s, then drops it.
Instances the gateway saw die recently are excluded on every path, as are the ones the
caller excludes (e.g. those that already failed this request) and those that just
refused as full (gateway/full_instances.py: when that is every instance, the request
is shed with RESOURCE_EXHAUSTED before any RPC).
"""

from __future__ import annotations

import enum
import math
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import grpc

from gateway.cluster_view import ClusterView
from gateway.full_instances import FullInstances
from protos import scheduler_pb2
from services.common.errors import UnavailableError
from services.common.logging import get_logger
from services.policies import DispatchInfo, add_pending_dispatches, make_dispatch_policy

log = get_logger(__name__)


class PlacementSource(enum.Enum):
    SCHEDULER = "scheduler"
    CACHED_VIEW = "cached_view"
    ROUND_ROBIN = "round_robin"


@dataclass(frozen=True)
class Placement:
    instance_id: str
    address: str
    source: PlacementSource


class LostInstances:
    """Instances seen dying, remembered for `ttl_s` so no path sends work there."""

    def __init__(self, ttl_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl_s = ttl_s
        self._clock = clock
        self._lost_at: dict[str, float] = {}

    def add(self, instance_id: str) -> None:
        self._lost_at[instance_id] = self._clock()

    def recent(self) -> set[str]:
        now = self._clock()
        self._lost_at = {i: t for i, t in self._lost_at.items() if now - t < self.ttl_s}
        return set(self._lost_at)


class Dispatcher:
    def __init__(
        self,
        scheduler_stub,
        view: ClusterView,
        lost: LostInstances,
        *,
        timeout_s: float,
        view_stale_s: float,
        full: FullInstances | None = None,
    ) -> None:
        self._stub = scheduler_stub
        self._full = full or FullInstances()
        self._view = view
        self._lost = lost
        self._timeout_s = timeout_s
        self._view_stale_s = view_stale_s
        self._freest = make_dispatch_policy("freest")
        self._round_robin = make_dispatch_policy("round_robin")
        # Requests (and their prompt blocks) this gateway placed locally since the view
        # last changed.
        self._local_counts: Counter[str] = Counter()
        self._local_blocks: Counter[str] = Counter()
        self._local_counts_view_at: float | None = None

    async def choose(
        self, request_id: str, num_prompt_tokens: int, priority: int, exclude: set[str]
    ) -> Placement:
        excluded = set(exclude) | self._lost.recent()
        # Skip instances whose queue was just full; shed at once when that is all of them.
        excluded |= self._full.check(set(self._view.instances) - excluded)
        if not self._view.is_scheduler_reachable and self._view.updated_at is not None:
            # The background refresh already found the scheduler down: do not pay a
            # Dispatch deadline per request until it is back.
            placement = self.choose_locally(request_id, num_prompt_tokens, priority, excluded)
            if placement is not None:
                return placement
        try:
            reply = await self._stub.Dispatch(
                scheduler_pb2.DispatchRequest(
                    request_id=request_id,
                    num_prompt_tokens=num_prompt_tokens,
                    priority=priority,
                    exclude_instance_ids=sorted(excluded),
                ),
                timeout=self._timeout_s,
            )
            return Placement(reply.instance_id, reply.address, PlacementSource.SCHEDULER)
        except grpc.aio.AioRpcError as exc:
            # RESOURCE_EXHAUSTED: the scheduler knows no candidate (e.g. it just restarted
            # and has not re-learned the instances); the cached view may still know some.
            log.warning("dispatch_fallback", code=exc.code().name, details=exc.details())
            if exc.code() is grpc.StatusCode.UNAVAILABLE:
                # Down (not merely slow): until the background refresh reaches it
                # again, later requests decide locally instead of failing a Dispatch each.
                self._view.is_scheduler_reachable = False
        placement = self.choose_locally(request_id, num_prompt_tokens, priority, excluded)
        if placement is None:
            raise UnavailableError(
                f"no instance can take request {request_id!r}: the scheduler did not place it and the "
                f"gateway knows no other live instance (excluded {sorted(excluded)})"
            )
        return placement

    def note_full(self, instance_id: str, retry_after_s: float) -> None:
        """The instance refused a Submit as full: skip it for its retry hint."""
        self._full.add(instance_id, retry_after_s)

    def choose_locally(
        self, request_id: str, num_prompt_tokens: int, priority: int, excluded: set[str]
    ) -> Placement | None:
        candidates = {i: v for i, v in self._view.instances.items() if i not in excluded}
        if not candidates:
            return None
        request = DispatchInfo(request_id, num_prompt_tokens, priority)
        loads = self._adjusted_loads(candidates)
        if self._view.age_s() <= self._view_stale_s:
            instance_id = self._freest.choose(loads, request)
            source = PlacementSource.CACHED_VIEW
        else:
            instance_id = self._round_robin.choose(loads, request)
            source = PlacementSource.ROUND_ROBIN
        if instance_id is None:
            return None
        spec = candidates[instance_id].spec
        self._local_counts[instance_id] += 1
        self._local_blocks[instance_id] += math.ceil(num_prompt_tokens / max(spec.block_size, 1))
        return Placement(instance_id, spec.address, source)

    def _adjusted_loads(self, candidates):
        """Cached loads plus what this gateway placed since (so it does not herd)."""
        if self._local_counts_view_at != self._view.updated_at:
            self._local_counts.clear()
            self._local_blocks.clear()
            self._local_counts_view_at = self._view.updated_at
        return [
            add_pending_dispatches(
                view.load, self._local_counts[instance_id], self._local_blocks[instance_id]
            )
            for instance_id, view in candidates.items()
        ]
