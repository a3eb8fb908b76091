"""Per-request records and the latency summary of a simulation run.

    TTFT   first token time - arrival (queueing + prefill, re-queueing after preemption)
    TPOT   per-token decode latency of a request: (finish - first token) / (outputs - 1);
           requests with one output token have none
    E2E    finish - arrival

Percentiles are over requests (numpy's linear interpolation), as in the Llumnix paper's
P99 prefill and decode latencies. Preemption loss is the time a preempted request lost:
from the preemption until it has recomputed its KV and produced its next token (the
re-queueing wait plus the re-prefill), summed over its preemptions.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np


@dataclass(slots=True)
class RequestRecord:
    """What happened to one request (filled in by the simulator)."""

    request_id: str
    arrival_s: float
    priority: int
    num_prompt_tokens: int
    num_output_tokens: int  # target length
    first_token_s: float = math.nan
    finish_s: float = math.nan
    num_generated: int = 0
    num_finishes: int = 0  # conservation check: exactly 1 at the end
    num_preemptions: int = 0
    preemption_loss_s: float = 0.0
    preempted_at_s: float = math.nan  # pending preemption (loss not yet counted)
    num_migrations: int = 0
    instance_id: str = ""  # where it finished

    @property
    def ttft_s(self) -> float:
        return self.first_token_s - self.arrival_s

    @property
    def e2e_s(self) -> float:
        return self.finish_s - self.arrival_s

    @property
    def tpot_s(self) -> float:
        """NaN when the request produced a single token."""
        if self.num_generated < 2:
            return math.nan
        return (self.finish_s - self.first_token_s) / (self.num_generated - 1)


@dataclass(frozen=True)
class LatencySummary:
    """Aggregate latencies of a set of requests (seconds)."""

    num_requests: int
    mean_ttft_s: float
    p99_ttft_s: float
    mean_tpot_s: float
    p99_tpot_s: float
    mean_e2e_s: float
    p99_e2e_s: float
    preemptions: int
    preemption_loss_s: float  # mean over requests
    preemption_loss_total_s: float
    migrations: int

    def to_dict(self) -> dict[str, float | int]:
        return {k: _round(getattr(self, k)) for k in self.__dataclass_fields__}


def _round(value):
    if isinstance(value, float):
        return None if math.isnan(value) else round(value, 6)
    return value


def percentile(values: np.ndarray, q: float) -> float:
    return float(np.percentile(values, q)) if len(values) else math.nan


def summarize(
    records: Iterable[RequestRecord], num_migrations: int | None = None
) -> LatencySummary:
    """Summary over the records (all finished). `num_migrations` overrides the per-request sum
    (it counts committed migrations; a request may move more than once)."""
    records = list(records)
    ttft = np.array([r.ttft_s for r in records])
    e2e = np.array([r.e2e_s for r in records])
    tpot = np.array([r.tpot_s for r in records])
    tpot = tpot[~np.isnan(tpot)]
    loss = sum(r.preemption_loss_s for r in records)
    return LatencySummary(
        num_requests=len(records),
        mean_ttft_s=float(ttft.mean()) if len(ttft) else math.nan,
        p99_ttft_s=percentile(ttft, 99),
        mean_tpot_s=float(tpot.mean()) if len(tpot) else math.nan,
        p99_tpot_s=percentile(tpot, 99),
        mean_e2e_s=float(e2e.mean()) if len(e2e) else math.nan,
        p99_e2e_s=percentile(e2e, 99),
        preemptions=sum(r.num_preemptions for r in records),
        preemption_loss_s=loss / len(records) if records else 0.0,
        preemption_loss_total_s=loss,
        migrations=(
            sum(r.num_migrations for r in records) if num_migrations is None else num_migrations
        ),
    )
