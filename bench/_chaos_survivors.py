"""After the chaos: what the survivors hold, and whether the mesh still serves.

Every process the driver did not kill is alive (one that died on its own is a failure
however it died); no KunServe group is left; every live worker is idle with all its
KV blocks free and its block manager's integrity check passing; a fresh request
through each gateway gets exactly the undisturbed tokens.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time

import grpc

from bench._chaos_load import Spec
from bench._chaos_mesh import NUM_GATEWAYS, ChaosMesh
from gateway.client import AsyncClient, GatewayError

SETTLE_TIMEOUT_S = 60.0


async def check_survivors(mesh: ChaosMesh) -> dict:
    problems = [
        f"{p.name} exited with code {p.popen.returncode}, not killed by the chaos"
        for p in [*mesh.mesh.workers, *mesh.gateways, mesh.mesh.scheduler]
        if not p.is_alive() and p.popen.returncode != -signal.SIGKILL
    ]
    problems += await _restore_groups(mesh)
    leaked, workers = 0, mesh.live_workers()
    for worker in workers:
        report = await _settled(mesh, worker.address)
        if report is None:
            os.kill(worker.pid, signal.SIGABRT)  # faulthandler: its stacks, in its log
            problems.append(
                f"{worker.name} does not answer GetLoad (its stacks: {worker.log_path})"
            )
            continue
        leaked += report.num_used_blocks
        if report.integrity_error:
            problems.append(f"{worker.name}: integrity: {report.integrity_error}")
        busy = (report.num_running, report.num_waiting, report.num_used_blocks)
        if busy != (0, 0, 0) or report.group_id:
            problems.append(
                f"{worker.name} not idle and alone after the run: running/waiting/blocks "
                f"{busy}, group {report.group_id!r}, migrating {report.num_migrating}"
            )
    return {"workers": len(workers), "leaked_blocks": leaked, "problems": problems}


async def _restore_groups(mesh: ChaosMesh) -> list[str]:
    """Restore a group a missed fault left behind; a group still there later is a
    problem."""
    problems = []
    for group in (await mesh.cluster_state()).groups:
        try:
            await mesh.restore_group(group.group_id)
        except grpc.RpcError as exc:
            problems.append(f"group {group.group_id} could not be restored: {exc.details()}")
    deadline = time.monotonic() + SETTLE_TIMEOUT_S
    while (await mesh.cluster_state()).groups and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    return problems


async def _settled(mesh: ChaosMesh, address: str):
    """The worker's checked load once it is idle (or when SETTLE_TIMEOUT_S ran out);
    None if it never answered."""
    deadline = time.monotonic() + SETTLE_TIMEOUT_S
    report = None
    while True:
        try:
            report = await mesh.load(address, check_integrity=True)
        except grpc.RpcError:
            pass
        else:
            busy = (report.num_running, report.num_waiting, report.num_used_blocks)
            if busy == (0, 0, 0) and not report.group_id:
                return report
        if time.monotonic() > deadline:
            return report
        await asyncio.sleep(0.1)


async def fresh_requests(mesh: ChaosMesh, spec: Spec, expected: list[int]) -> list[str]:
    """One request through each gateway; the problems (none when the mesh serves)."""
    problems = []
    for g in range(NUM_GATEWAYS):
        async with AsyncClient(mesh.gateway_address(g)) as client:
            try:
                result = await client.generate(
                    prompt_token_ids=list(spec.prompt), request_id=f"after-chaos-{g}",
                    **spec.sampling,
                )  # fmt: skip
            except GatewayError as exc:
                problems.append(f"a fresh request through gateway {g} failed: {exc}")
                continue
        if list(result.token_ids) != expected:
            problems.append(f"a fresh request through gateway {g} got other tokens")
    return problems
