"""The mesh `llmesh bench chaos` attacks: a scheduler, two gateways and N workers as
real processes on loopback (services/common/procs.py), and what the driver does to
them: SIGKILL, restart (workers as new instances on new ports, the scheduler and the
gateways at their old addresses, as an orchestrator would), arm a worker's fault point
(bench/_chaos_hooks.py) and the admin RPCs a fault needs (load, migrate, drop, restore).

Workers run the memory-constrained KunServe configuration (a small pool, so a drop
frees room) and neither the scheduler's migration loop nor its group policy acts on its
own: every migration and every group is the driver's, so a seed gives one plan.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
from pathlib import Path

import grpc

from bench._chaos_hooks import point_dir
from protos import (
    common_pb2,
    scheduler_pb2,
    scheduler_pb2_grpc,
    worker_pb2,
    worker_pb2_grpc,
)
from services.common.grpc_client import aio_channel
from services.common.procs import LocalMesh, ServiceProcess, gateway_num_instances

RPC_TIMEOUT_S = 10.0
MIGRATE_TIMEOUT_S = 60.0
GROUP_TIMEOUT_S = 60.0
NUM_GATEWAYS = 2
WORKER_ENV = {
    "LLMESH_WORKER_TORCH_THREADS": "1",  # 2 shared cores: one torch thread per worker
    "LLMESH_WORKER_ENGINE_MEMORY_CAPACITY_BYTES": str(32 << 20),  # KunServe's small pool
    "LLMESH_TEST_HOOKS": "bench._chaos_hooks",
    "LLMESH_SCHEDULER_GROUP_POLICY": "none",
    # A process that stops answering gets SIGABRT: its threads' stacks go to its log.
    "PYTHONFAULTHANDLER": "1",
}
WORKER_ARGS = (
    # 8 blocks (32 KiB each) a stage: a request of a few hundred tokens takes several.
    "--migration-stage-chunk-bytes", "256KiB",
    # A dead source's reservation on its destination is freed this fast.
    "--migration-lease-s", "1.5",
)  # fmt: skip


class ChaosMesh:
    """The processes, which of them are up, and each gateway's incarnation (`epoch`,
    bumped before a kill: a request that began in an older one saw its gateway die)."""

    def __init__(self, log_dir: Path, num_workers: int) -> None:
        self.mesh = LocalMesh(
            log_dir=log_dir,
            num_workers=num_workers,
            worker_args=WORKER_ARGS,
            scheduler_args=("--migration-policy", "none"),
            env=dict(WORKER_ENV),
        )
        self.gateways: list[ServiceProcess] = []
        self.gateway_ports: list[int] = []
        self.gateway_epoch = [0] * NUM_GATEWAYS
        self.gateway_up = [False] * NUM_GATEWAYS
        self.scheduler_port = 0
        # Fixed: a restarted scheduler comes back here. (The mesh's own property asserts
        # a started process, which it is not while a restart is under way.)
        self.scheduler_address = ""
        self.points = point_dir(os.getpid())

    # -- lifecycle -------------------------------------------------------------------

    def start(self) -> ChaosMesh:
        shutil.rmtree(self.points, ignore_errors=True)
        self.points.mkdir(parents=True)
        self.mesh.start()
        try:
            self.scheduler_address = self.mesh.scheduler_address
            self.scheduler_port = _port(self.scheduler_address)
            second = self.mesh.spawn_gateway(name="gateway-1")
            second.wait_ready(self.mesh.ready_timeout_s)
            self.gateways = [self.mesh.gateway, second]
            self.gateway_ports = [_port(g.address) for g in self.gateways]
            self.gateway_up = [True] * NUM_GATEWAYS
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        for gateway in self.gateways[1:]:
            gateway.stop()
        self.mesh.stop()
        shutil.rmtree(self.points, ignore_errors=True)

    def gateway_address(self, index: int) -> str:
        return f"{self.mesh.host}:{self.gateway_ports[index]}"

    def live_workers(self) -> list[ServiceProcess]:
        """Running workers that are ready (a replacement may still be loading)."""
        return [w for w in self.mesh.live_workers() if w.address]

    def worker(self, instance_id: str) -> ServiceProcess | None:
        return next((w for w in self.mesh.workers if w.name == instance_id), None)

    async def restart_workers(self, count: int) -> list[ServiceProcess]:
        """`count` fresh workers (new instance ids, new ports), once the scheduler
        lists them. Spawned from this (the main) thread: see procs' docstring."""
        await self._scheduler_started()
        procs = [self.mesh.add_worker(wait=False) for _ in range(count)]
        for proc in procs:
            await asyncio.to_thread(proc.wait_ready, self.mesh.ready_timeout_s)
        names = {p.name for p in procs}
        while True:  # the scheduler may be dead a moment (a fault of the same round)
            with contextlib.suppress(grpc.RpcError):
                state = await self.cluster_state()
                if names <= {i.info.instance_id for i in state.instances}:
                    return procs
            await asyncio.sleep(0.05)

    async def _scheduler_started(self) -> None:
        """Until the scheduler runs (a fault of the same round may be restarting it):
        a process started now is given its address."""
        while not (self.mesh.scheduler.is_alive() and self.mesh.scheduler.address):
            await asyncio.sleep(0.05)

    def kill_scheduler(self) -> None:
        self.mesh.scheduler.kill()

    async def restart_scheduler(self) -> None:
        await asyncio.to_thread(self.mesh.start_scheduler, self.scheduler_port)

    def kill_gateway(self, index: int) -> None:
        self.gateway_up[index] = False
        self.gateway_epoch[index] += 1
        self.gateways[index].kill()

    async def restart_gateway(self, index: int) -> None:
        """The same address, a new process; up again once it knows an instance."""
        name = "gateway" if index == 0 else f"gateway-{index}"
        await self._scheduler_started()
        proc = self.mesh.spawn_gateway(self.gateway_ports[index], name=name)
        await asyncio.to_thread(proc.wait_ready, self.mesh.ready_timeout_s)
        self.gateways[index] = proc
        if index == 0:
            self.mesh.gateway = proc
        while not await asyncio.to_thread(gateway_num_instances, proc.address):
            await asyncio.sleep(0.05)
        self.gateway_up[index] = True

    # -- fault points ----------------------------------------------------------------

    def arm(self, worker: ServiceProcess, point: str) -> None:
        self.clear_hit(worker)
        (self.points / f"arm-{worker.pid}").write_text(point)

    def disarm(self, worker: ServiceProcess) -> None:
        (self.points / f"arm-{worker.pid}").unlink(missing_ok=True)

    def clear_hit(self, worker: ServiceProcess) -> None:
        (self.points / f"hit-{worker.pid}").unlink(missing_ok=True)

    def hit(self, worker: ServiceProcess) -> str | None:
        """The point this worker reached and paused at, if it did."""
        try:
            return (self.points / f"hit-{worker.pid}").read_text()
        except OSError:
            return None

    # -- RPCs ------------------------------------------------------------------------

    async def load(self, address: str, check_integrity: bool = False) -> common_pb2.LoadReport:
        async with aio_channel(address) as channel:
            return await worker_pb2_grpc.WorkerStub(channel).GetLoad(
                worker_pb2.GetLoadRequest(check_integrity=check_integrity),
                timeout=RPC_TIMEOUT_S,
            )

    async def cluster_state(self) -> scheduler_pb2.ClusterState:
        async with aio_channel(self.scheduler_address) as channel:
            return await scheduler_pb2_grpc.SchedulerStub(channel).GetClusterState(
                scheduler_pb2.GetClusterStateRequest(), timeout=RPC_TIMEOUT_S
            )

    async def migrate(
        self, src: ServiceProcess, dst_info, request_id: str
    ) -> list[worker_pb2.MigrationResult]:
        """One live migration of request_id from src to dst, waited for."""
        async with aio_channel(src.address) as channel:
            reply = await worker_pb2_grpc.WorkerStub(channel).MigrateOut(
                worker_pb2.MigrateOutRequest(
                    dst_instance_id=dst_info.instance_id,
                    dst_address=dst_info.address,
                    dst_transport_address=dst_info.transport_address,
                    request_id=request_id,
                    num_requests=1,
                    wait=True,
                    mode=worker_pb2.MIGRATION_MODE_LIVE,
                ),
                timeout=MIGRATE_TIMEOUT_S,
            )
        return list(reply.results)

    async def drop_group(self, instance_ids: list[str]) -> scheduler_pb2.DropGroupResponse:
        async with aio_channel(self.scheduler_address) as channel:
            return await scheduler_pb2_grpc.SchedulerStub(channel).DropGroup(
                scheduler_pb2.DropGroupRequest(instance_ids=instance_ids),
                timeout=GROUP_TIMEOUT_S,
            )

    async def restore_group(self, group_id: str) -> None:
        async with aio_channel(self.scheduler_address) as channel:
            await scheduler_pb2_grpc.SchedulerStub(channel).RestoreGroup(
                scheduler_pb2.RestoreGroupRequest(group_id=group_id), timeout=GROUP_TIMEOUT_S
            )


def _port(address: str) -> int:
    return int(address.rsplit(":", 1)[1])
