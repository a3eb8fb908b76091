"""Fault points that `llmesh bench chaos` arms in worker processes, one at a time.

A worker started with `LLMESH_TEST_HOOKS=bench._chaos_hooks` runs its migrations and
KunServe exchanges with these hooks. They do nothing unless the chaos driver (the
worker's parent process) armed this worker for a point: it writes the point's name to
`arm-<worker pid>` in `point_dir(parent pid)`. The first time the worker reaches that
point it takes the arm file (one shot), writes `hit-<pid>` there and pauses PAUSE_S: the
window in which the driver SIGKILLs the worker or its peer. A migration source names
its points

    stage0   before its first stage's offer (the request still decodes here)
    stage1   before any later stage's offer (a pre-copy stage or the stop-and-copy one)
    commit   after the last stage's bytes were delivered, before CommitMigration

and a KunServe member `exchange`, before it sends a request's KV at a drop.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
from pathlib import Path

from services.common.logging import get_logger
from services.worker.kunserve.faults import GroupFaultHooks
from services.worker.migration.faults import FaultHooks

PAUSE_S = 2.0
MIGRATION_POINTS = ("stage0", "stage1", "commit")
KUNSERVE_POINTS = ("exchange",)

log = get_logger(__name__)


def point_dir(driver_pid: int) -> Path:
    """Where the driver with this pid arms its workers (no environment variable needed:
    a worker's parent is its driver)."""
    return Path(tempfile.gettempdir()) / f"llmesh-chaos-{driver_pid}"


async def _reached(point: str) -> None:
    directory = point_dir(os.getppid())
    arm = directory / f"arm-{os.getpid()}"
    try:
        if arm.read_text() != point:
            return
        arm.unlink()  # one shot: a second migration passes freely
    except OSError:
        return
    hit = directory / f"hit-{os.getpid()}"
    hit.with_suffix(".tmp").write_text(point)
    os.replace(hit.with_suffix(".tmp"), hit)
    log.warning("chaos_point_reached", point=point)
    await asyncio.sleep(PAUSE_S)


class ChaosMigrationPoints(FaultHooks):
    async def before_stage(self, stage_index: int) -> None:
        await _reached("stage0" if stage_index == 0 else "stage1")

    async def before_commit(self) -> None:
        await _reached("commit")


class ChaosGroupPoints(GroupFaultHooks):
    async def before_exchange_send(self, spec) -> None:
        await _reached("exchange")


migration_faults = ChaosMigrationPoints()
kunserve_faults = ChaosGroupPoints()
