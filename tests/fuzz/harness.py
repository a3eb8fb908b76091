"""Calling any RPC of the live mesh raw, and keeping the mesh usable between batches.

`channel_to(address)` is the one place that builds the fuzzer's channels (and so the
one place credentials come from: once internal authentication lands, the cluster
credentials of services.common.grpc_client go here). `call_raw` sends already
serialized requests through `channel.unary_unary(path, identity serializer)` and its
streaming siblings, so typed messages and malformed bytes take the same path, and
returns the status code the server answered.
"""

from __future__ import annotations

import collections
import itertools
import threading
from dataclasses import dataclass

import grpc

from protos import scheduler_pb2, scheduler_pb2_grpc
from services.common.grpc_client import CHANNEL_OPTIONS, cluster_channel
from tests.fuzz.rpc_catalog import SERVED_BY, Rpc

UNARY_TIMEOUT_S = 5.0
STREAM_TIMEOUT_S = 2.0
MAX_STREAM_REPLIES = 8  # read this many replies of a stream, then cancel it
# Streams that never end by themselves: one reply shows the call works.
ENDLESS_STREAMS = {"grpc.health.v1.Health/Watch"}


def _identity(data: bytes) -> bytes:
    return data


_channels: dict[tuple[str, bool, bool], grpc.Channel] = {}
_channels_lock = threading.Lock()


def channel_to(
    address: str, with_credentials: bool = True, unlimited_send: bool = False
) -> grpc.Channel:
    """A cached channel to address; `with_credentials` = as a cluster member would call
    (every call signed with the cluster secret), else an outsider's plain channel;
    `unlimited_send` lifts the client's own message limit (to send oversized requests)."""
    key = (address, with_credentials, unlimited_send)
    options = CHANNEL_OPTIONS
    if unlimited_send:
        options = [(k, v) for k, v in options if k != "grpc.max_send_message_length"]
        options.append(("grpc.max_send_message_length", -1))
    with _channels_lock:
        if key not in _channels:
            _channels[key] = (
                cluster_channel(address, options=options)
                if with_credentials
                else grpc.insecure_channel(address, options=options)
            )
        return _channels[key]


def close_channels() -> None:
    with _channels_lock:
        for channel in _channels.values():
            channel.close()
        _channels.clear()


def call_raw(
    channel: grpc.Channel, rpc: Rpc, payloads: list[bytes], timeout_s: float | None = None
) -> grpc.StatusCode:
    """Send payloads (one for a unary request, any number for a client stream)."""
    kwargs = dict(request_serializer=_identity, response_deserializer=_identity)
    stream = rpc.client_streaming or rpc.server_streaming
    timeout = timeout_s or (STREAM_TIMEOUT_S if stream else UNARY_TIMEOUT_S)
    try:
        if rpc.client_streaming and rpc.server_streaming:
            call = channel.stream_stream(rpc.path, **kwargs)(iter(payloads), timeout=timeout)
            return _drain(call, MAX_STREAM_REPLIES)
        if rpc.client_streaming:
            channel.stream_unary(rpc.path, **kwargs)(iter(payloads), timeout=timeout)
            return grpc.StatusCode.OK
        if rpc.server_streaming:
            call = channel.unary_stream(rpc.path, **kwargs)(payloads[0], timeout=timeout)
            return _drain(call, 1 if rpc.name in ENDLESS_STREAMS else MAX_STREAM_REPLIES)
        channel.unary_unary(rpc.path, **kwargs)(payloads[0], timeout=timeout)
        return grpc.StatusCode.OK
    except grpc.RpcError as exc:
        return exc.code()


def _drain(call, max_replies: int) -> grpc.StatusCode:
    """Read a stream to its end or max_replies replies, then cancel it (OK)."""
    for _ in itertools.islice(call, max_replies):
        pass
    if call.is_active():  # still open: we cut it short (code() would wait for the end)
        call.cancel()
        return grpc.StatusCode.OK
    return call.code()


@dataclass(frozen=True)
class MeshFacts:
    """What a valid request needs to name: the live instances and their addresses."""

    gateway_address: str
    scheduler_address: str
    worker_ids: tuple[str, ...]
    worker_addresses: tuple[str, ...]
    transport_addresses: tuple[bytes, ...]

    def addresses_serving(self, service: str) -> list[str]:
        kinds = SERVED_BY[service]
        out = []
        if "gateway" in kinds:
            out.append(self.gateway_address)
        if "scheduler" in kinds:
            out.append(self.scheduler_address)
        if "worker" in kinds:
            out.extend(self.worker_addresses)
        return out


def cluster_state(scheduler_address: str) -> scheduler_pb2.ClusterState:
    stub = scheduler_pb2_grpc.SchedulerStub(channel_to(scheduler_address))
    return stub.GetClusterState(scheduler_pb2.GetClusterStateRequest(), timeout=UNARY_TIMEOUT_S)


def mesh_facts(mesh) -> MeshFacts:
    by_address = {w.address: w for w in mesh.live_workers()}
    instances = [
        i.info
        for i in cluster_state(mesh.scheduler_address).instances
        if i.info.address in by_address
    ]
    instances.sort(key=lambda info: info.instance_id)
    return MeshFacts(
        gateway_address=mesh.gateway_address,
        scheduler_address=mesh.scheduler_address,
        worker_ids=tuple(i.instance_id for i in instances),
        worker_addresses=tuple(i.address for i in instances),
        transport_addresses=tuple(i.transport_address for i in instances),
    )


def dead_processes(mesh) -> list[str]:
    return [p.name for p in mesh.processes() if not p.is_alive()]


CASE_COUNT: collections.Counter = collections.Counter()


# (method or endpoint, status) -> cases: what the fuzzers actually reached.
ANSWERS: collections.Counter = collections.Counter()


def count_case(kind: str) -> None:
    CASE_COUNT[kind] += 1
    CASE_COUNT["total"] += 1


def count_answer(what: str, status: str) -> None:
    ANSWERS[(what, status)] += 1
