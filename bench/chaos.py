"""`llmesh bench chaos`: SIGKILL and restart mesh processes at chosen moments under a
steady streaming load, then check that nothing was lost.

The mesh: a scheduler, 2 gateways and --workers workers of the embedded tiny model as
real processes on loopback, in KunServe's memory-constrained configuration
(bench/_chaos_mesh.py). --clients streaming clients send requests all along, through
whichever gateway is up (bench/_chaos_load.py). A seeded plan of rounds kills, at once
in each round, workers at each migration stage (source or destination), a KunServe
member mid KV exchange (the sender or its peer), a decoding worker, the scheduler or a
gateway, and restarts each (bench/_chaos_faults.py), until --faults were injected.

Then the checks, each a failure when it does not hold:
  - every request finished with exactly the tokens of an undisturbed run (an
    in-process engine), or failed with a status only because its gateway died and the
    client did not resume (the SDK's gateway failover resumes it, and re-submits it
    when the resume finds it on no worker);
  - every surviving worker is idle with all its blocks free and its block manager's
    integrity check passing (`leaked_blocks` counts what is still held);
  - the mesh still serves: a fresh request through each gateway gets exact tokens.

Prints the fault kind x count x outcome table, then a JSON line with `faults`,
`by_kind`, `requests`, `exact`, `resumed`, `resubmitted`, `failed`, `violations`,
`leaked_blocks`, `seed`. Exit code 1 when a check fails.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
from pathlib import Path

from bench._chaos_faults import WORKER_KINDS, Injector, plan_round, refill
from bench._chaos_load import Load, RequestRecord, make_specs, reference_tokens
from bench._chaos_mesh import NUM_GATEWAYS, ChaosMesh
from bench._chaos_report import table, violations
from bench._chaos_survivors import check_survivors, fresh_requests

WARM_UP_S = 1.5


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="llmesh bench chaos", description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="(the JSON line is always last)")
    parser.add_argument("--seed", type=int, default=1, help="the fault plan and the workload")
    parser.add_argument("--faults", type=int, default=60, help="faults to inject (at least)")
    parser.add_argument("--workers", type=int, default=4, help="worker processes (>= 3)")
    parser.add_argument("--clients", type=int, default=8, help="concurrent streaming clients")
    parser.add_argument("--log-dir", default=None, help="process logs (default: a temp dir)")
    args = parser.parse_args(argv)
    if args.workers < 3:
        parser.error(f"--workers must be >= 3, got {args.workers}")
    for name in ("faults", "clients"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name} must be > 0, got {getattr(args, name)}")
    return args


async def _chaos(mesh: ChaosMesh, args, specs, expected) -> dict:
    load = Load(mesh, specs, expected, args.clients, args.seed)
    load.start()
    await asyncio.sleep(WARM_UP_S)
    injector = Injector(mesh, load)
    rng, deck, faults = random.Random(f"chaos-plan-{args.seed}"), [], []
    started = time.monotonic()
    for round_index in range(4 * args.faults):
        if sum(f.injected for f in faults) >= args.faults:
            break
        refill(rng, deck)
        round_faults = plan_round(rng, deck, args.workers)
        round_start = time.monotonic()
        await injector.run_round(round_faults)
        faults += round_faults
        # A missed worker fault is drawn again next round (each kind must happen).
        deck += [f.kind for f in round_faults if f.kind in WORKER_KINDS and not f.injected]
        print(
            f"round {round_index + 1:3d} at {round_start - started:6.1f}s "
            f"({time.monotonic() - round_start:4.1f}s): "
            + ", ".join(
                f"{f.kind}{f' -> {f.victim}' if f.injected else ''} {f.took_s:.1f}s"
                + ("" if f.injected else f" ({f.note})")
                for f in round_faults
            ),
            flush=True,
        )
    await load.stop()
    await injector.settle()
    survivors = await check_survivors(mesh)
    fresh = await fresh_requests(mesh, specs[0], expected[0])
    return {"faults": faults, "records": load.records, "survivors": survivors, "fresh": fresh}


def _summary(args, outcome: dict) -> tuple[dict, list[str]]:
    faults, records = outcome["faults"], outcome["records"]
    text, by_kind = table(faults, records)
    print(text)
    problems = violations(records)
    for record in records:  # allowed (its gateway died, none was up to resume on): said why
        if record.outcome.startswith("failed:"):
            print(f"FAILED: {record.request_id} ({record.outcome}): {record.detail}")
    problems += outcome["survivors"]["problems"] + outcome["fresh"]
    summary = {
        "faults": sum(f.injected for f in faults),
        "missed_faults": sum(not f.injected for f in faults),
        "by_kind": by_kind,
        "requests": len(records),
        "exact": _count(records, "exact"),
        "resumed": _count(records, "resumed"),
        "resubmitted": _count(records, "resubmitted"),
        "failed": sum(r.outcome.startswith("failed:") for r in records),
        "violations": len(problems),
        "leaked_blocks": outcome["survivors"]["leaked_blocks"],
        "survivors": outcome["survivors"]["workers"],
        "seed": args.seed,
    }
    return summary, problems


def _count(records: list[RequestRecord], outcome: str) -> int:
    return sum(r.outcome == outcome for r in records)


def main(argv: list[str] | None = None) -> int:
    args = _parse(sys.argv[1:] if argv is None else argv)
    specs = make_specs(args.seed)
    expected = reference_tokens(specs)
    log_dir = Path(args.log_dir or tempfile.mkdtemp(prefix="llmesh-bench-chaos-"))
    print(
        f"chaos: seed {args.seed}, >= {args.faults} faults, {args.workers} workers, "
        f"{NUM_GATEWAYS} gateways, {args.clients} streaming clients; logs in {log_dir}",
        flush=True,
    )
    mesh = ChaosMesh(log_dir, args.workers).start()
    try:
        outcome = asyncio.run(_chaos(mesh, args, specs, expected))
    finally:
        mesh.stop()
    summary, problems = _summary(args, outcome)
    for problem in problems:
        print(f"VIOLATION: {problem}")
    print(json.dumps(summary))
    return 1 if problems or summary["faults"] < args.faults else 0
