"""What `llmesh bench chaos` prints: fault kind x count x outcome of the requests each
fault hit, the violations in full, and the JSON summary (its last line).

A request counts under a fault when the fault aimed at it (the migrated request, the
requests of a dropped group), when it was streaming from the killed worker or through
the killed gateway at the kill, or, for the scheduler, when it was in flight while the
scheduler was dead. A request hit by several faults counts under each.
"""

from __future__ import annotations

from collections import Counter

from bench._chaos_faults import ALL_KINDS, Fault
from bench._chaos_load import RequestRecord

OUTCOMES = ("exact", "resumed", "resubmitted", "failed", "violation")


def outcome_class(record: RequestRecord) -> str:
    return "failed" if record.outcome.startswith("failed:") else record.outcome


def hit_requests(fault: Fault, records: list[RequestRecord]) -> set[str]:
    ids = set(fault.request_ids)
    if fault.kind == "scheduler" and fault.injected:
        until = fault.at + fault.down_s
        ids |= {
            r.request_id
            for r in records
            if r.started <= until and (r.ended is None or r.ended >= fault.at)
        }
    return ids


def table(faults: list[Fault], records: list[RequestRecord]) -> tuple[str, dict]:
    by_id = {r.request_id: r for r in records}
    rows, by_kind = [], {}
    header = f"{'fault kind':28} {'faults':>6} {'missed':>6} {'requests':>8}" + "".join(
        f" {o:>9}" for o in OUTCOMES
    )
    for kind in ALL_KINDS:
        of_kind = [f for f in faults if f.kind == kind]
        injected = [f for f in of_kind if f.injected]
        hit = set().union(*(hit_requests(f, records) for f in injected)) & set(by_id)
        counts = Counter(outcome_class(by_id[i]) for i in hit)
        by_kind[kind] = {
            "faults": len(injected),
            "missed": len(of_kind) - len(injected),
            "requests": len(hit),
            **{o: counts[o] for o in OUTCOMES},
        }
        rows.append(
            f"{kind:28} {len(injected):6d} {len(of_kind) - len(injected):6d} {len(hit):8d}"
            + "".join(f" {counts[o]:9d}" for o in OUTCOMES)
        )
    totals = Counter(outcome_class(r) for r in records)
    rows.append(
        f"{'all requests':28} {sum(f.injected for f in faults):6d} "
        f"{sum(not f.injected for f in faults):6d} {len(records):8d}"
        + "".join(f" {totals[o]:9d}" for o in OUTCOMES)
    )
    return "\n".join([header, "-" * len(header), *rows]), by_kind


def violations(records: list[RequestRecord]) -> list[str]:
    return [
        f"{r.request_id} (gateway {r.gateway}, on {sorted(r.instances)}): {r.detail}"
        for r in records
        if r.outcome == "violation" or r.outcome == "running"
    ]
