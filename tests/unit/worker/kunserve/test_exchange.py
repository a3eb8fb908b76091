"""services.worker.kunserve.exchange: KV sends pause while activations go to their peer."""

from __future__ import annotations

import asyncio

import pytest
import torch
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from services.common.groups import KVTransferSpec
from services.worker.kunserve import exchange as exchange_module
from services.worker.kunserve.exchange import KVExchange, kv_pieces


class Handle:
    def __init__(self) -> None:
        self.calls: list[str] = []
        self.done = asyncio.Event()

    def pause(self):
        self.calls.append("pause")

    def resume(self):
        self.calls.append("resume")

    async def wait(self):
        await self.done.wait()


class Transport:
    def __init__(self) -> None:
        self.handles: dict[str, Handle] = {}
        self.inbox: dict[str, list[torch.Tensor]] = {}
        self.released: list[str] = []

    async def send(self, peer, transfer_id, tensors, traffic_class, metadata=None):
        handle = self.handles[transfer_id] = Handle()
        return handle

    async def recv(self, transfer_id, timeout=None):
        if transfer_id not in self.inbox:
            raise TimeoutError(f"transfer {transfer_id!r} not received within {timeout}s")
        return self.inbox[transfer_id]

    def release(self, tensors):
        self.released.append("x")
        return True


def spec(transfer_id: str, to_stage: int = 1) -> KVTransferSpec:
    return KVTransferSpec(transfer_id, "r", 0, to_stage, (4, 5), (4, 5), 2, 4)


async def settle():
    for _ in range(5):
        await asyncio.sleep(0)


async def test_kv_to_a_peer_pauses_while_an_activation_goes_there():
    transport = Transport()
    exchange = KVExchange(transport, timeout_s=5.0)
    done: list[tuple[str, str]] = []
    exchange.send(spec("kv-p"), b"P", torch.zeros(16), lambda s, e: done.append((s.transfer_id, e)))
    exchange.send(spec("kv-q"), b"Q", torch.zeros(8))
    await settle()
    with exchange.activation_to(b"P"):
        with exchange.activation_to(b"P"):  # nested: one pause, one resume
            pass
        # A send to P that starts while an activation is out starts paused.
        exchange.send(spec("kv-p2"), b"P", torch.zeros(4))
        await settle()
    assert transport.handles["kv-p"].calls == ["pause", "resume"]
    assert transport.handles["kv-p2"].calls == ["pause", "resume"]
    assert transport.handles["kv-q"].calls == []  # another peer's link: untouched
    assert exchange.stats.num_pauses == 2
    for handle in transport.handles.values():
        handle.done.set()
    assert await exchange.wait_idle(5.0)
    assert done == [("kv-p", "")]
    assert (exchange.stats.num_sent, exchange.stats.num_bytes_sent) == (3, (16 + 8 + 4) * 4)


async def test_receives_write_then_report_and_failures_report_the_error():
    transport = Transport()
    data = torch.arange(6, dtype=torch.float32)
    transport.inbox["kv-in"] = [data]
    exchange = KVExchange(transport, timeout_s=0.5)
    written, reports = [], []

    async def write(s, tensor):
        written.append((s.transfer_id, tensor.tolist()))

    exchange.receive(spec("kv-in"), write, lambda s, e: reports.append((s.transfer_id, e)))
    exchange.receive(spec("kv-missing"), write, lambda s, e: reports.append((s.transfer_id, e)))
    assert await exchange.wait_idle(5.0)
    assert written == [("kv-in", [0.0, 1.0, 2.0, 3.0, 4.0, 5.0])]
    assert sorted(reports) == [
        ("kv-in", ""),
        ("kv-missing", "TimeoutError: transfer 'kv-missing' not received within 0.5s"),
    ]
    assert transport.released == ["x"]
    assert (exchange.stats.num_received, exchange.stats.num_bytes_received) == (1, 24)


def _spec(blocks: tuple[int, ...], layer_start: int, layer_end: int) -> KVTransferSpec:
    return KVTransferSpec("kvx/g/r/0-1", "r", 0, 1, blocks, blocks, layer_start, layer_end)


def test_kv_pieces_cut_layers_then_blocks_and_cover_the_transfer_once():
    # 2 layers x (K, V) x 5 blocks x 4 tokens x 1 head x 2 dims, float32: a block of one
    # layer (K and V) is 64 bytes, so 150 bytes hold 2 blocks.
    data = torch.arange(2 * 2 * 5 * 4 * 1 * 2, dtype=torch.float32).reshape(2, 2, 5, 4, 1, 2)
    spec = _spec((10, 11, 12, 13, 14), 6, 8)
    pieces = list(kv_pieces(spec, data, max_bytes=150))
    assert [(p.layer, p.block_ids) for p in pieces] == [
        (6, [10, 11]),
        (6, [12, 13]),
        (6, [14]),
        (7, [10, 11]),
        (7, [12, 13]),
        (7, [14]),
    ]
    rebuilt = torch.zeros_like(data)
    for p in pieces:
        assert p.data.shape == (1, 2, len(p.block_ids), 4, 1, 2)
        first = p.block_ids[0] - 10
        rebuilt[p.layer - 6, :, first : first + len(p.block_ids)] += p.data[0]
    assert torch.equal(rebuilt, data)  # every element exactly once
    # A piece holds at least one block, however small max_bytes is.
    assert [len(p.block_ids) for p in kv_pieces(spec, data, max_bytes=1)] == [1] * 10


def test_kv_pieces_refuse_data_of_another_shape():
    data = torch.zeros(2, 2, 5, 4, 1, 2)
    with pytest.raises(ValueError, match="expected 2 layers of 3 blocks"):
        list(kv_pieces(_spec((1, 2, 3), 0, 2), data))


async def test_each_send_is_a_span_with_its_bytes_chunks_and_pauses(monkeypatch):
    spans = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    monkeypatch.setattr(exchange_module, "tracer", provider.get_tracer("test"))
    transport = Transport()
    exchange = KVExchange(transport, timeout_s=5.0, chunk_bytes=24)
    exchange.send(spec("kv-p"), b"P", torch.zeros(16))  # 64 bytes: 3 chunks of 24
    await settle()
    with exchange.activation_to(b"P"):
        pass
    with exchange.activation_to(b"P"):
        pass
    transport.handles["kv-p"].done.set()
    assert await exchange.wait_idle(5.0)
    [span] = spans.get_finished_spans()
    assert span.name == "kunserve.exchange.send"
    assert dict(span.attributes) == {
        "llmesh.request_id": "r",
        "llmesh.transfer_id": "kv-p",
        "llmesh.to_stage": 1,
        "llmesh.num_bytes": 64,
        "llmesh.num_chunks": 3,
        "llmesh.num_pauses": 2,
        "llmesh.error": "",
    }
