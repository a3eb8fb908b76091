"""Every RPC llmesh serves, read from the generated descriptors, and the status codes
each may answer (the table in docs/mesh.md, "Status codes").

`all_methods()` walks `protos/*_pb2.py` (every `DESCRIPTOR.services_by_name`) plus the
standard health and reflection services every server carries, so an RPC added to a
.proto later is fuzzed without touching the tests; `test_status_table.py` fails until
the new method has a row here and in the docs.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass

import grpc
from google.protobuf.descriptor import Descriptor, MethodDescriptor
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2

import protos

C = grpc.StatusCode

# Which process serves a service (by full name); health and reflection run everywhere.
SERVED_BY = {
    "llmesh.v1.Gateway": ("gateway",),
    "llmesh.v1.OutputSink": ("gateway",),
    "llmesh.v1.Scheduler": ("scheduler",),
    "llmesh.v1.Worker": ("worker",),
    "grpc.health.v1.Health": ("gateway", "scheduler", "worker"),
    "grpc.reflection.v1alpha.ServerReflection": ("gateway", "scheduler", "worker"),
}

# Any RPC may answer these: bad input, a missing id, a state that forbids the call, and
# (once internal authentication is on) a caller without the cluster's credentials.
COMMON = frozenset(
    {C.OK, C.INVALID_ARGUMENT, C.NOT_FOUND, C.FAILED_PRECONDITION, C.UNAUTHENTICATED}
)
# The fuzzer's own deadline or cancellation of a call that legitimately waits (a
# stream, a generation, an operation that waits for other services).
WAITS = frozenset({C.DEADLINE_EXCEEDED, C.CANCELLED})
# A worker answers UNAVAILABLE while its engine loads, and for the RPCs of a feature it
# runs without (live migration, KunServe).
WORKER = frozenset({C.UNAVAILABLE})
# The call reaches another service on the caller's behalf, which may be unreachable (a
# fuzzed address), slow, or full.
FORWARDS = WAITS | {C.UNAVAILABLE, C.RESOURCE_EXHAUSTED}
# Admission control (bounded queues): the caller should retry later.
ADMISSION = frozenset({C.RESOURCE_EXHAUSTED})

# The documented answers per method beyond COMMON (docs/mesh.md, "Status codes").
# UNKNOWN and INTERNAL are never documented: they mean a handler crashed.
EXTRA_CODES: dict[str, frozenset] = {
    "llmesh.v1.Gateway/Generate": WAITS | ADMISSION | {C.UNAVAILABLE, C.ALREADY_EXISTS},
    "llmesh.v1.Gateway/GenerateUnary": WAITS | ADMISSION | {C.UNAVAILABLE, C.ALREADY_EXISTS},
    "llmesh.v1.Gateway/Abort": frozenset(),
    "llmesh.v1.Gateway/Resume": WAITS | {C.UNAVAILABLE, C.ALREADY_EXISTS},
    "llmesh.v1.Gateway/GetModelInfo": frozenset(),
    "llmesh.v1.OutputSink/PushOutputs": WAITS,
    "llmesh.v1.Scheduler/RegisterInstance": frozenset(),
    "llmesh.v1.Scheduler/StreamLoad": WAITS,
    "llmesh.v1.Scheduler/DeregisterInstance": frozenset(),
    "llmesh.v1.Scheduler/Dispatch": ADMISSION,
    "llmesh.v1.Scheduler/GetClusterState": frozenset(),
    "llmesh.v1.Scheduler/Migrate": frozenset(),
    "llmesh.v1.Scheduler/Drain": frozenset(),
    "llmesh.v1.Scheduler/DropGroup": FORWARDS,
    "llmesh.v1.Scheduler/RestoreGroup": FORWARDS,
    "llmesh.v1.Worker/Submit": WORKER | ADMISSION | {C.ALREADY_EXISTS},
    "llmesh.v1.Worker/Abort": WORKER,
    "llmesh.v1.Worker/Rehome": WORKER,
    "llmesh.v1.Worker/GetLoad": WORKER,
    "llmesh.v1.Worker/MigrateOut": WORKER | FORWARDS,
    "llmesh.v1.Worker/PrepareMigration": WORKER | {C.ALREADY_EXISTS},
    "llmesh.v1.Worker/MigrationStage": WORKER | FORWARDS,
    "llmesh.v1.Worker/CommitMigration": WORKER,
    "llmesh.v1.Worker/AbortMigration": WORKER,
    "llmesh.v1.Worker/FormGroup": WORKER | FORWARDS,
    "llmesh.v1.Worker/DissolveGroup": WORKER | FORWARDS,
    "llmesh.v1.Worker/PrepareJoin": WORKER,
    "llmesh.v1.Worker/JoinGroup": WORKER | FORWARDS,
    "llmesh.v1.Worker/Exchange": WORKER | FORWARDS,
    "llmesh.v1.Worker/ExchangeDone": WORKER,
    "llmesh.v1.Worker/LeaveGroup": WORKER | FORWARDS,
    "llmesh.v1.Worker/AbortGroup": WORKER,
    "grpc.health.v1.Health/Check": frozenset(),
    "grpc.health.v1.Health/List": frozenset(),
    "grpc.health.v1.Health/Watch": WAITS,
    "grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo": WAITS,
}


@dataclass(frozen=True)
class Rpc:
    """One method of one service, with what the fuzzer needs to call it raw."""

    service: str
    method: MethodDescriptor

    @property
    def name(self) -> str:
        return f"{self.service}/{self.method.name}"

    @property
    def path(self) -> str:
        return f"/{self.name}"

    @property
    def request_type(self) -> Descriptor:
        return self.method.input_type

    @property
    def client_streaming(self) -> bool:
        return self.method.client_streaming

    @property
    def server_streaming(self) -> bool:
        return self.method.server_streaming

    @property
    def documented_codes(self) -> frozenset:
        return COMMON | EXTRA_CODES[self.name]


def _descriptor_modules():
    for info in pkgutil.iter_modules(protos.__path__):
        if info.name.endswith("_pb2"):
            yield importlib.import_module(f"protos.{info.name}")
    yield health_pb2
    yield reflection_pb2


def all_methods() -> list[Rpc]:
    """Every method of every service the generated descriptors define."""
    rpcs = []
    for module in _descriptor_modules():
        for service in module.DESCRIPTOR.services_by_name.values():
            rpcs.extend(Rpc(service.full_name, method) for method in service.methods)
    return sorted(rpcs, key=lambda rpc: rpc.name)
