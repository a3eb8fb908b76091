"""Undo what fuzzed internal RPCs legitimately did to the mesh's state.

A fuzzed `Drain` may mark a real worker terminating, `DropGroup` / `FormGroup` may form
a KunServe group (a `Worker.FormGroup` may even reuse the id of a group this scheduler
restored before, which it then never learns: that one is dissolved at its stage 0), `RegisterInstance` may add instances that do not exist (or re-register
a real id at a fuzzed address). None of that is a bug; it is what those RPCs are for.
Between batches the scheduler is told the truth again (operator RPCs only: restore
groups, un-drain, deregister impostors so the real workers re-register), so the next
batch and the final Generate run on a usable mesh.
"""

from __future__ import annotations

import time

import grpc

from protos import group_pb2, scheduler_pb2, scheduler_pb2_grpc, worker_pb2_grpc
from services.common.procs import LocalMesh
from tests.fuzz.harness import UNARY_TIMEOUT_S, channel_to, cluster_state

SETTLE_TIMEOUT_S = 90.0


def _is_settled(mesh: LocalMesh, state: scheduler_pb2.ClusterState) -> bool:
    real = {w.name: w.address for w in mesh.live_workers()}
    seen = {i.info.instance_id: i.info.address for i in state.instances}
    return (
        seen == real
        and not state.groups
        and not state.draining_instance_ids
        and all(not i.load.is_terminating and not i.load.group_id for i in state.instances)
    )


def restore_mesh(mesh: LocalMesh) -> None:
    """Return the scheduler's view to the live workers, undrained and ungrouped."""
    stub = scheduler_pb2_grpc.SchedulerStub(channel_to(mesh.scheduler_address))
    real = {w.name: w.address for w in mesh.live_workers()}
    deadline = time.monotonic() + SETTLE_TIMEOUT_S
    while True:
        state = cluster_state(mesh.scheduler_address)
        if _is_settled(mesh, state):
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"the fuzzed mesh did not settle: {state}")
        try:
            for group in state.groups:
                if group.status == group_pb2.GROUP_STATUS_SERVING:
                    stub.RestoreGroup(
                        scheduler_pb2.RestoreGroupRequest(group_id=group.group_id), timeout=60.0
                    )
            known_groups = {group.group_id for group in state.groups}
            stage0_groups = {
                i.load.group_id
                for i in state.instances
                if i.load.group_id and i.load.group_stage == 0
            }
            for instance in state.instances:
                info = instance.info
                load = instance.load
                if load.group_id and load.group_id not in known_groups and load.group_stage == 0:
                    # Formed by a fuzzed Worker.FormGroup under an id this scheduler
                    # already restored once: it never re-learns such an id, so dissolve
                    # the group at its stage 0 directly.
                    worker_pb2_grpc.WorkerStub(channel_to(info.address)).DissolveGroup(
                        group_pb2.DissolveGroupRequest(group_id=load.group_id), timeout=60.0
                    )
                elif load.group_id and load.group_id not in known_groups | stage0_groups:
                    # A member left behind by such a group with no stage 0 (a fuzzed
                    # JoinGroup, or its stage 0 dissolved first): it leaves on its own.
                    worker_pb2_grpc.WorkerStub(channel_to(info.address)).AbortGroup(
                        group_pb2.AbortGroupRequest(group_id=load.group_id, reason="fuzz"),
                        timeout=60.0,
                    )
                if real.get(info.instance_id) != info.address:
                    stub.DeregisterInstance(
                        scheduler_pb2.DeregisterInstanceRequest(instance_id=info.instance_id),
                        timeout=UNARY_TIMEOUT_S,
                    )
                elif (
                    instance.load.is_terminating or info.instance_id in state.draining_instance_ids
                ):
                    stub.Drain(
                        scheduler_pb2.SchedulerDrainRequest(
                            instance_id=info.instance_id, is_terminating=False
                        ),
                        timeout=UNARY_TIMEOUT_S,
                    )
        except grpc.RpcError:
            pass  # a group still dropping, an instance re-registering: look again
        time.sleep(0.2)
