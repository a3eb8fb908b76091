"""services.worker.output_router: one stream per gateway, one message per step."""

from __future__ import annotations

import asyncio

import pytest

from protos import common_pb2, gateway_pb2, gateway_pb2_grpc
from services.common.grpc_server import GrpcServer
from services.common.messages import FinishReason, OutputDelta
from services.worker.output_router import OutputRouter


class FakeSink(gateway_pb2_grpc.OutputSinkServicer):
    def __init__(self) -> None:
        self.batches: list[gateway_pb2.OutputBatch] = []
        self.num_streams = 0
        self.received = asyncio.Event()

    async def PushOutputs(self, request_iterator, context):
        self.num_streams += 1
        async for batch in request_iterator:
            self.batches.append(batch)
            self.received.set()
        return gateway_pb2.PushOutputsAck(num_batches=len(self.batches))


@pytest.fixture
async def sinks():
    servers, fakes = [], []
    for name in ("gw-a", "gw-b"):
        server = GrpcServer(name, "127.0.0.1:0", grace_s=0)
        fake = FakeSink()
        gateway_pb2_grpc.add_OutputSinkServicer_to_server(fake, server.server)
        await server.start(["llmesh.v1.OutputSink"])
        servers.append(server)
        fakes.append(fake)
    yield [(s.address, f) for s, f in zip(servers, fakes, strict=True)]
    for server in servers:
        await server.stop()


async def wait_for(predicate, timeout_s=5.0):
    async with asyncio.timeout(timeout_s):
        while not predicate():
            await asyncio.sleep(0.01)


async def test_each_step_is_one_batch_per_owning_gateway(sinks):
    (addr_a, sink_a), (addr_b, sink_b) = sinks
    gone: list[list[str]] = []
    router = OutputRouter("worker-7", owner_unreachable_s=5.0, on_owner_gone=gone.append)
    router.register("r1", addr_a)
    router.register("r2", addr_a)
    router.register("r3", addr_b)
    router.publish(
        [OutputDelta("r1", 0, (11,)), OutputDelta("r2", 0, (21,)), OutputDelta("r3", 0, (31,))]
    )
    await wait_for(lambda: sink_a.batches and sink_b.batches)
    router.publish(
        [OutputDelta("r1", 1, (12,), FinishReason.LENGTH), OutputDelta("unknown", 0, (1,))]
    )
    await wait_for(lambda: len(sink_a.batches) == 2)
    await router.close()

    assert [[(o.request_id, list(o.token_ids)) for o in b.outputs] for b in sink_a.batches] == [
        [("r1", [11]), ("r2", [21])],
        [("r1", [12])],
    ]
    assert sink_a.batches[1].outputs[0].finish_reason == common_pb2.FINISH_REASON_LENGTH
    assert {b.instance_id for b in sink_a.batches + sink_b.batches} == {"worker-7"}
    assert [list(o.token_ids) for b in sink_b.batches for o in b.outputs] == [[31]]
    assert (sink_a.num_streams, sink_b.num_streams, gone) == (1, 1, [])


async def test_an_unreachable_gateway_gets_its_requests_given_up():
    gone: list[list[str]] = []
    router = OutputRouter("worker-7", owner_unreachable_s=0.3, on_owner_gone=gone.append)
    router.register("r1", "127.0.0.1:1")  # nothing listens there
    router.register("r2", "127.0.0.1:1")
    router.publish([OutputDelta("r1", 0, (1,))])
    await wait_for(lambda: gone)
    assert sorted(gone[0]) == ["r1", "r2"]
    await router.close()


async def test_a_rehomed_request_sends_here_from_then_on_and_outlives_its_dead_gateway(sinks):
    (addr_b, sink_b), _ = sinks
    gone: list[list[str]] = []
    router = OutputRouter("worker-7", owner_unreachable_s=0.3, on_owner_gone=gone.append)
    router.register("moved", "127.0.0.1:1")  # its gateway died
    router.register("stays", "127.0.0.1:1")
    router.publish([OutputDelta("moved", 0, (1,)), OutputDelta("stays", 0, (2,))])
    router.rehome("moved", addr_b)
    router.rehome("unknown", addr_b)  # not here: nothing registered
    router.publish([OutputDelta("moved", 1, (3,)), OutputDelta("stays", 1, (4,))])
    await wait_for(lambda: gone and sink_b.batches)
    await router.close()
    assert gone == [["stays"]]  # only the request nobody took over is given up
    assert [(o.request_id, list(o.token_ids)) for b in sink_b.batches for o in b.outputs] == [
        ("moved", [3])
    ]
    assert (router.owner_of("moved"), router.owner_of("unknown")) == (addr_b, None)


async def test_a_dead_gateway_is_given_up_even_while_its_request_keeps_producing():
    # Each retry of the stream takes a queued step before it fails; that once counted
    # as "the stream is up" and the window never ended for a request that kept decoding.
    gone: list[list[str]] = []
    router = OutputRouter("worker-7", owner_unreachable_s=0.3, on_owner_gone=gone.append)
    router.register("busy", "127.0.0.1:1")  # nothing listens there
    index = 0
    async with asyncio.timeout(10):
        while not gone:
            router.publish([OutputDelta("busy", index, (index % 250,))])
            index += 1
            await asyncio.sleep(0.01)
    assert gone == [["busy"]]
    await router.close()


async def test_a_gateway_restarted_at_the_same_address_gets_every_token():
    """Regression (found by `llmesh bench chaos`): while the channel to a killed gateway
    was still reconnecting, each retry took the queued steps off the queue and lost
    them with the failed stream, so the new gateway at the same address received a
    request's later tokens but never its first ones, and the stream hung on the gap."""
    server = GrpcServer("gw-old", "127.0.0.1:0", grace_s=0)
    old = FakeSink()
    gateway_pb2_grpc.add_OutputSinkServicer_to_server(old, server.server)
    await server.start(["llmesh.v1.OutputSink"])
    address = server.address
    gone: list[list[str]] = []
    router = OutputRouter("worker-7", owner_unreachable_s=30.0, on_owner_gone=gone.append)
    router.register("old-request", address)
    router.publish([OutputDelta("old-request", 0, (1,))])
    await wait_for(lambda: old.batches)
    await server.stop()  # the gateway dies...
    router.publish([OutputDelta("old-request", 1, (2,))])
    link = router._links[address]
    await wait_for(lambda: link.failing_since is not None)
    await asyncio.sleep(1.5)  # the channel's reconnect backoff grows meanwhile

    new_server = GrpcServer("gw-new", address, grace_s=0)  # ...and comes back there
    new = FakeSink()
    gateway_pb2_grpc.add_OutputSinkServicer_to_server(new, new_server.server)
    await new_server.start(["llmesh.v1.OutputSink"])
    router.register("new-request", address)
    for index in range(20):  # steps while the worker's channel is still reconnecting
        router.publish([OutputDelta("new-request", index, (100 + index,))])
        await asyncio.sleep(0.02)

    def received() -> list[int]:
        return [
            t for b in new.batches for o in b.outputs if o.request_id == "new-request"
            for t in o.token_ids
        ]  # fmt: skip

    try:
        await wait_for(lambda: len(received()) >= 20, timeout_s=10.0)
        assert received() == [100 + i for i in range(20)]
        assert gone == []
    finally:
        await router.close()
        await new_server.stop()
