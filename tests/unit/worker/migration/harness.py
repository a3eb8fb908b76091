"""Two real engines on engine threads, two real UCX transports, one process.

The destination's RPCs are called in-process (LocalClient), so these tests pin the
protocol itself; tests/integration/ runs it across worker processes over gRPC.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from kvtransport import Backend, TransportConfig, make_transport
from services.worker.async_engine import AsyncEngine
from services.worker.engine import EngineConfig, LLMEngine, SamplingParams
from services.worker.migration import (
    MigrationConfig,
    MigrationDestination,
    MigrationSource,
    MigrationTarget,
    RequestHandoff,
    StageOffer,
)
from services.worker.migration.faults import NO_FAULTS, FaultHooks
from services.worker.migration.local import LocalDestinationClient


@dataclass
class Stream:
    """What a gateway would see of one request: tokens by index, and where they came from."""

    tokens: list[int] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)
    finished: asyncio.Event = field(default_factory=asyncio.Event)


class LocalClient(LocalDestinationClient):
    """The in-process client with fault hooks: before_stage(offer) may rewrite or delay."""

    def __init__(self, destination: MigrationDestination) -> None:
        super().__init__(destination)
        self.before_stage = None

    async def stage(self, offer: StageOffer):
        if self.before_stage is not None:
            offer = await self.before_stage(offer)
        return await super().stage(offer)


class Node:
    def __init__(
        self,
        name: str,
        streams: dict[str, Stream],
        engine_config: EngineConfig,
        config: MigrationConfig,
        faults: FaultHooks = NO_FAULTS,
        clock=time.monotonic,
    ):
        self.name = name
        self.clock = clock  # the destination's lease clock
        self.faults = faults
        self.streams = streams
        self.engine = LLMEngine.from_config(engine_config)
        self.async_engine = AsyncEngine(self.engine, self._on_step, snapshot_interval_s=0.05)
        self.transport = make_transport(TransportConfig(backend=Backend.UCX))
        self.config = config
        self.destination: MigrationDestination | None = None
        self.source: MigrationSource | None = None
        self.clients: dict[str, LocalClient] = {}

    def _on_step(self, outputs, snapshot) -> None:
        for out in outputs:
            stream = self.streams[out.request_id]
            assert out.first_token_index == len(stream.tokens), (self.name, out, stream.tokens)
            stream.tokens += out.new_token_ids
            stream.sources += [self.name] * len(out.new_token_ids)
            if out.finished:
                stream.finished.set()

    async def start(self, peers: dict[str, Node]) -> None:
        await self.transport.start()
        self.async_engine.start()
        self.destination = MigrationDestination(
            self.async_engine, self.transport, self.config, clock=self.clock
        )
        self.destination.start()

        def client_for(target: MigrationTarget) -> LocalClient:
            return self.clients.setdefault(
                target.instance_id, LocalClient(peers[target.instance_id].destination)
            )

        self.source = MigrationSource(
            self.name,
            self.async_engine,
            self.transport,
            self.config,
            client_for=client_for,
            handoff_for=lambda request_id, state: RequestHandoff(state, owner_address="test"),
            faults=self.faults,
        )

    def target(self) -> MigrationTarget:
        return MigrationTarget(self.name, "", self.transport.address)

    async def add(self, request_id: str, prompt: list[int], params: SamplingParams) -> None:
        self.streams.setdefault(request_id, Stream())
        await self.async_engine.run(lambda e: e.add_request(request_id, prompt, params))

    async def stop(self) -> None:
        await self.destination.close()
        await self.async_engine.stop()
        await self.transport.close()

    async def assert_clean(self) -> None:
        def check(engine: LLMEngine) -> tuple[int, int]:
            engine.check_integrity()
            return engine.block_manager.num_free_blocks, engine.block_manager.num_total_blocks

        num_free, num_total = await self.async_engine.run(check)
        assert num_free == num_total, f"{self.name}: {num_total - num_free} blocks leaked"
        assert self.destination.num_active == 0
        stats = self.transport.stats()
        assert stats.num_active_sends == 0 and stats.num_incoming == 0, stats


def reference_tokens(
    engine_config: EngineConfig, prompt: list[int], params: SamplingParams
) -> list[int]:
    """The request run alone, unmoved, on a fresh engine."""
    engine = LLMEngine.from_config(engine_config)
    engine.add_request("ref", prompt, params)
    tokens: list[int] = []
    while engine.has_unfinished_requests():
        for out in engine.step():
            tokens += out.new_token_ids
    return tokens
