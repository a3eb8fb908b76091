"""A gateway request path without workers, for the API unit tests (gRPC and HTTP)."""

from __future__ import annotations

from gateway.admission import AdmissionControl
from gateway.cluster_view import ClusterView
from gateway.generations import Generations, PlacementSettings
from gateway.sessions import SessionTable
from services.common.tokenizer import ByteTokenizer


def idle_generations() -> Generations:
    """Generations over an empty cluster view (tests add instances to `.view`); one
    request in flight at most, no dispatcher or worker pool behind it."""
    return Generations(
        sessions=SessionTable(),
        view=ClusterView(),
        dispatcher=None,
        pool=None,
        admission=AdmissionControl(max_inflight_requests=1, max_waiting_per_instance=8),
        tokenizer=ByteTokenizer(),
        placement=PlacementSettings(owner_address="gw:1", max_placements=2),
    )
