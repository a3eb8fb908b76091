from __future__ import annotations

import time

import pytest
import torch

from services.worker.engine import EngineConfig
from services.worker.migration import MigrationConfig
from services.worker.migration.faults import NO_FAULTS, FaultHooks
from tests.unit.worker.migration.harness import Node, Stream

torch.set_num_threads(1)

# The torch kernels: these tests move requests while engine threads decode them, and a
# request must outlive its move; with the native kernels the tiny model decodes a
# 200-token request alone in about a third of a second.
ENGINE_CONFIG = EngineConfig(block_size=4, num_kv_blocks=512, max_model_len=2048, kernels="torch")


@pytest.fixture
async def cluster():
    """cluster(config=MigrationConfig(...)) -> (a, b, streams) (b_engine_config: b's
    engine, if not a's; a_faults: fault hooks of a's source); both nodes are checked clean (integrity, all blocks free, no transfers left) and stopped at the end."""
    nodes: list[Node] = []
    streams: dict[str, Stream] = {}

    async def make(
        config: MigrationConfig = MigrationConfig(),
        engine_config: EngineConfig = ENGINE_CONFIG,
        b_engine_config: EngineConfig | None = None,
        a_faults: FaultHooks = NO_FAULTS,
        b_clock=time.monotonic,
    ):
        a = Node("a", streams, engine_config, config, a_faults)
        b = Node("b", streams, b_engine_config or engine_config, config, clock=b_clock)
        peers = {"a": a, "b": b}
        for node in (a, b):
            nodes.append(node)
            await node.start(peers)
        return a, b, streams

    yield make
    try:
        for node in nodes:
            await node.assert_clean()
    finally:
        for node in nodes:
            await node.stop()
