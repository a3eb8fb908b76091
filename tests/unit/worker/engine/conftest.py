"""Engine test fixtures. Every engine or block manager made through these fixtures is
checked after the test: integrity holds and every block is back on the free list."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import torch

from services.worker.engine import BlockManager, EngineConfig, LLMEngine
from tests.unit.worker.engine.helpers import skip_without_native_kernels


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
def engines() -> Iterator[list[LLMEngine]]:
    """Engines checked clean after the test (make_engine, make_simulated_engine)."""
    made: list[LLMEngine] = []
    yield made
    for engine in made:
        _assert_clean(engine)


def _config(config: dict) -> EngineConfig:
    config.setdefault("memory_capacity_bytes", 32 * 1024 * 1024)
    return EngineConfig(**config)


@pytest.fixture
def make_engine(engines) -> Callable[..., LLMEngine]:
    """make_engine(**EngineConfig fields) -> a torch LLMEngine (LLMEngine.from_config).
    kernels="native" skips the test where the native kernels cannot be built."""

    def make(**config) -> LLMEngine:
        if config.get("kernels") == "native":
            skip_without_native_kernels()
        engine = LLMEngine.from_config(_config(config))
        engines.append(engine)
        return engine

    return make


@pytest.fixture
def make_simulated_engine(engines) -> Callable[..., LLMEngine]:
    """make_simulated_engine(profile, **EngineConfig fields) -> LLMEngine.simulated."""

    def make(profile: str, **config) -> LLMEngine:
        engine = LLMEngine.simulated(_config(config), profile)
        engines.append(engine)
        return engine

    return make


@pytest.fixture
def needs_native_kernels() -> None:
    """Skips the test where the native kernels cannot be built (no C compiler: the
    README makes one optional)."""
    skip_without_native_kernels()


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
