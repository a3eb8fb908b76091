"""Admission control: refuse new requests with RESOURCE_EXHAUSTED when the mesh is full.

The gateway's own bound (requests in flight here) is exact; the per-instance queue bound
reads the cached cluster view (up to a refresh old), so each worker also bounds its
waiting queue itself (WorkerConfig.max_waiting_requests) and refuses Submit beyond it;
the session then tries another instance, and sheds with RESOURCE_EXHAUSTED when every
one refused (gateway/session.py). Per-client-key limits: gateway/key_limits.py.
"""

from __future__ import annotations

from gateway.cluster_view import ClusterView
from services.common.errors import ResourceExhaustedError


class AdmissionControl:
    """Two limits: requests in flight at this gateway, and queued requests per instance."""

    def __init__(
        self,
        max_inflight_requests: int,
        max_waiting_per_instance: int,
        retry_after_s: float = 1.0,
    ) -> None:
        if max_inflight_requests <= 0:
            raise ValueError(f"max_inflight_requests={max_inflight_requests} must be > 0")
        if max_waiting_per_instance <= 0:
            raise ValueError(f"max_waiting_per_instance={max_waiting_per_instance} must be > 0")
        self.max_inflight_requests = max_inflight_requests
        self.max_waiting_per_instance = max_waiting_per_instance
        self.retry_after_s = retry_after_s  # the hint sent with a refusal

    def check(self, num_inflight: int, view: ClusterView) -> None:
        if num_inflight >= self.max_inflight_requests:
            raise ResourceExhaustedError(
                f"the gateway has {num_inflight} requests in flight (max_inflight_requests="
                f"{self.max_inflight_requests}); retry later",
                self.retry_after_s,
            )
        if view.is_full(self.max_waiting_per_instance):
            raise ResourceExhaustedError(
                f"every instance has at least {self.max_waiting_per_instance} queued requests "
                "(max_waiting_per_instance); retry later",
                self.retry_after_s,
            )
