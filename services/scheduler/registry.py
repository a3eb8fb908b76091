"""The instance registry: who is alive, what they reported, and what was just sent to them.

Liveness is a lease: registration starts it and every load report renews it; an
instance silent for `lease_s` is dropped by `expire()`. Reports carry a per-process
sequence number so a late report never overwrites a newer one.

Between two reports from an instance the scheduler may dispatch many requests to it.
Each dispatch is remembered as *pending* demand and added to the instance's load until
a report names it among the requests that reached the instance (the instance counts
it from then on), so a burst does not all land on the one instance that looked freest
50 ms ago. A dispatch no report names (the gateway sent the request elsewhere, or it
failed on the way) stops counting after half a second (a quarter of the lease at most).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from services.common.messages import InstanceSpec, LoadReport
from services.policies import InstanceLoad, add_pending_dispatches, make_instance_load


@dataclass
class PendingDispatch:
    """A request sent to an instance that its reports may not show yet."""

    request_id: str
    num_blocks: int
    dispatched_at: float


@dataclass
class InstanceRecord:
    """Everything the scheduler knows about one instance."""

    spec: InstanceSpec
    report: LoadReport
    last_report_at: float
    pending: list[PendingDispatch] = field(default_factory=list)

    def effective_load(self) -> InstanceLoad:
        """The reported load plus dispatches the report cannot reflect yet."""
        return add_pending_dispatches(
            self.report.load, len(self.pending), sum(p.num_blocks for p in self.pending)
        )


class InstanceRegistry:
    """Live instances by id. Not thread-safe: used from the scheduler's event loop only."""

    def __init__(self, lease_s: float, clock: Callable[[], float] = time.monotonic):
        if lease_s <= 0:
            raise ValueError(f"lease_s={lease_s} must be > 0")
        self.lease_s = lease_s
        self._clock = clock
        self._records: dict[str, InstanceRecord] = {}

    def __len__(self) -> int:
        return len(self._records)

    def __contains__(self, instance_id: str) -> bool:
        return instance_id in self._records

    def register(self, spec: InstanceSpec) -> None:
        """Add or replace an instance; a re-registration restarts its sequence numbers."""
        now = self._clock()
        old = self._records.get(spec.instance_id)
        # Until it reports, an instance is assumed idle (with the pool it last reported).
        empty = make_instance_load(
            spec.instance_id,
            num_total_blocks=old.report.load.num_total_blocks if old else 0,
            num_used_blocks=0,
            num_running=0,
            block_size=spec.block_size,
        )
        self._records[spec.instance_id] = InstanceRecord(
            spec=spec,
            report=LoadReport(empty, seq=0),
            last_report_at=now,
        )

    def report(self, report: LoadReport) -> bool:
        """Record a load report and renew the lease. False if the instance is unknown.

        A report with a sequence number not above the last one is ignored (but still
        renews the lease: the instance is evidently alive).
        """
        record = self._records.get(report.load.instance_id)
        if record is None:
            return False
        now = self._clock()
        record.last_report_at = now
        # The instance counts these itself now (even in a report overtaken by a newer
        # one, which then counts them too).
        arrived = set(report.arrived_request_ids)
        if report.seq > record.report.seq or record.report.seq == 0:
            record.report = report
        record.pending = [
            p
            for p in record.pending
            if p.request_id not in arrived and now - p.dispatched_at < self._pending_ttl()
        ]
        return True

    def _pending_ttl(self) -> float:
        return min(0.5, self.lease_s / 4)

    def note_dispatch(self, instance_id: str, request_id: str, num_blocks: int) -> None:
        record = self._records.get(instance_id)
        if record is not None:
            record.pending.append(PendingDispatch(request_id, num_blocks, self._clock()))

    def deregister(self, instance_id: str) -> bool:
        return self._records.pop(instance_id, None) is not None

    def expire(self) -> list[str]:
        """Drop instances whose lease ran out; returns their ids."""
        now = self._clock()
        expired = [i for i, r in self._records.items() if now - r.last_report_at > self.lease_s]
        for instance_id in expired:
            del self._records[instance_id]
        return expired

    def get(self, instance_id: str) -> InstanceRecord | None:
        return self._records.get(instance_id)

    def records(self) -> list[InstanceRecord]:
        """All live instances, by id."""
        return [self._records[i] for i in sorted(self._records)]

    def loads(self) -> list[InstanceLoad]:
        """Policy snapshots of all live instances, pending dispatches included."""
        return [r.effective_load() for r in self.records()]

    def ms_since_report(self, record: InstanceRecord) -> int:
        return int((self._clock() - record.last_report_at) * 1000)
