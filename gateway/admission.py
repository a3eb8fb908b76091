"""Admission control: refuse new requests with RESOURCE_EXHAUSTED when the mesh is full."""

from __future__ import annotations

from gateway.cluster_view import ClusterView
from services.common.errors import ResourceExhaustedError


class AdmissionControl:
    """Two limits: requests in flight at this gateway, and queued requests per instance."""

    def __init__(self, max_inflight_requests: int, max_waiting_per_instance: int) -> None:
        if max_inflight_requests <= 0:
            raise ValueError(f"max_inflight_requests={max_inflight_requests} must be > 0")
        if max_waiting_per_instance <= 0:
            raise ValueError(f"max_waiting_per_instance={max_waiting_per_instance} must be > 0")
        self.max_inflight_requests = max_inflight_requests
        self.max_waiting_per_instance = max_waiting_per_instance

    def check(self, num_inflight: int, view: ClusterView) -> None:
        if num_inflight >= self.max_inflight_requests:
            raise ResourceExhaustedError(
                f"the gateway has {num_inflight} requests in flight (max_inflight_requests="
                f"{self.max_inflight_requests}); retry later"
            )
        if view.is_full(self.max_waiting_per_instance):
            raise ResourceExhaustedError(
                f"every instance has at least {self.max_waiting_per_instance} queued requests "
                "(max_waiting_per_instance); retry later"
            )
