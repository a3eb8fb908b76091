"""Engine test fixtures. Every engine or block manager made through these fixtures is
checked after the test: integrity holds and every block is back on the free list."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import torch

from services.worker.engine import BlockManager, EngineConfig, LLMEngine


@pytest.fixture(autouse=True)
def one_torch_thread() -> Iterator[None]:
    """Tests run beside other work on 2 cores: one thread is steadier (restored after)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _assert_clean(engine_or_manager: LLMEngine | BlockManager) -> None:
    engine_or_manager.check_integrity()
    block_manager = (
        engine_or_manager.block_manager
        if isinstance(engine_or_manager, LLMEngine)
        else engine_or_manager
    )
    assert block_manager.num_free_blocks == block_manager.num_total_blocks, "blocks leaked"


@pytest.fixture
def make_engine() -> Iterator[Callable[..., LLMEngine]]:
    """make_engine(executor="torch", profile=None, **EngineConfig fields) -> LLMEngine."""
    engines: list[LLMEngine] = []

    def make(executor: str = "torch", profile=None, **config) -> LLMEngine:
        config.setdefault("memory_capacity_bytes", 32 * 1024 * 1024)
        engine = LLMEngine(EngineConfig(**config), executor=executor, profile=profile)
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        _assert_clean(engine)


@pytest.fixture
def make_block_manager() -> Iterator[Callable[..., BlockManager]]:
    managers: list[BlockManager] = []

    def make(num_blocks: int, block_size: int = 4) -> BlockManager:
        manager = BlockManager(num_blocks, block_size)
        managers.append(manager)
        return manager

    yield make
    for manager in managers:
        _assert_clean(manager)
