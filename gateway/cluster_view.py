"""The gateway's own last-known view of the cluster, for validation and fallback dispatch.

Refreshed from Scheduler.GetClusterState in the background. When the scheduler is
down the view simply stops changing; `age_s` says how old it is, and the dispatcher
decides how far to trust it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

import grpc

from gateway.validation import ModelLimits
from protos import scheduler_pb2
from services.common.convert import instance_spec_from_proto, load_from_proto
from services.common.logging import get_logger
from services.common.messages import InstanceSpec
from services.policies import InstanceLoad

log = get_logger(__name__)


@dataclass(frozen=True)
class InstanceView:
    spec: InstanceSpec
    load: InstanceLoad  # its last report's, with the block size of its registration


class ClusterView:
    """Instances as the scheduler last reported them.

    An instance missing from a refresh is kept for `forget_after_s`: a scheduler that
    just restarted reports an empty cluster until the workers re-register, and that
    must not wipe out what the gateway knows (fallback dispatch needs it). Instances
    that really died are caught by the gateway's own health watches and Submit errors.
    """

    def __init__(
        self, forget_after_s: float = 10.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.forget_after_s = forget_after_s
        self._clock = clock
        self.instances: dict[str, InstanceView] = {}
        self._missing_since: dict[str, float] = {}
        self._last_limits: ModelLimits | None = None
        self.updated_at: float | None = None
        self.is_scheduler_reachable = False

    def update(self, instances: list[InstanceView]) -> None:
        now = self._clock()
        fresh = {i.spec.instance_id: i for i in instances}
        for instance_id in fresh:
            self._missing_since.pop(instance_id, None)
        for instance_id, old in self.instances.items():
            if instance_id not in fresh:
                since = self._missing_since.setdefault(instance_id, now)
                if now - since < self.forget_after_s:
                    fresh[instance_id] = old
                else:
                    del self._missing_since[instance_id]
        self.instances = fresh
        self.updated_at = now
        self.is_scheduler_reachable = True

    def age_s(self) -> float:
        return float("inf") if self.updated_at is None else self._clock() - self.updated_at

    def model_limits(self) -> ModelLimits | None:
        """Limits of the served model; None before any instance was ever seen."""
        if not self.instances:
            return self._last_limits
        views = sorted(self.instances.values(), key=lambda v: v.spec.instance_id)
        spec = views[0].spec
        capacity = max(v.load.num_total_blocks * v.spec.block_size for v in views)
        self._last_limits = ModelLimits(
            model_id=spec.model_id,
            vocab_size=spec.vocab_size,
            max_model_len=spec.max_model_len,
            eos_token_id=spec.eos_token_id,
            # A fresh registration has not reported its pool yet: do not refuse on 0.
            max_tokens_per_instance=capacity if capacity > 0 else spec.max_model_len,
        )
        return self._last_limits

    def is_full(self, max_waiting_per_instance: int) -> bool:
        """Admission control: every known instance has a full waiting queue."""
        return bool(self.instances) and all(
            v.load.num_waiting >= max_waiting_per_instance for v in self.instances.values()
        )


def view_from_proto(state: scheduler_pb2.ClusterState) -> list[InstanceView]:
    views = []
    for instance in state.instances:
        spec = instance_spec_from_proto(instance.info)
        views.append(InstanceView(spec, load_from_proto(instance.load, spec.block_size).load))
    return views


async def refresh_forever(
    view: ClusterView, scheduler_stub, interval_s: float, timeout_s: float
) -> None:
    """Poll the scheduler; on failure keep the last view and log once per outage."""
    is_outage = False
    while True:
        try:
            state = await scheduler_stub.GetClusterState(
                scheduler_pb2.GetClusterStateRequest(), timeout=timeout_s
            )
        except grpc.aio.AioRpcError as exc:
            if not is_outage:
                log.warning(
                    "scheduler_unreachable", code=exc.code().name, view_age_s=round(view.age_s(), 3)
                )
            is_outage = True
            view.is_scheduler_reachable = False
        else:
            # A failed Dispatch may have found the outage first (view marked unreachable).
            if is_outage or (view.updated_at is not None and not view.is_scheduler_reachable):
                log.info("scheduler_reachable_again", num_instances=len(state.instances))
            is_outage = False
            view.update(view_from_proto(state))
        await asyncio.sleep(interval_s)
