"""Simulator view of the engine's cost-model profiles.

The step-time coefficients, the model shape and the source of the numbers live in the
engine (services/worker/engine/cost_model.py): `llama-7b-a10` is derived from published
A10 figures, `tiny-cpu` is calibrated from the real tiny engine (`llmesh calibrate`).
This module adds what a simulated instance needs besides step time: the KV pool size
(the profiled machine's memory minus the weights, as the engine sizes it), the context
limit, and KV bytes per token (for migration transfer time).
"""

from __future__ import annotations

from dataclasses import dataclass

from services.worker.engine.config import EngineConfig
from services.worker.engine.cost_model import CostModelProfile
from services.worker.engine.cost_model import get_profile as get_cost_profile
from services.worker.engine.engine import LLMEngine


@dataclass(frozen=True)
class SimProfile:
    name: str
    cost_profile: CostModelProfile
    memory_capacity_bytes: int  # weights + KV pool of one instance
    num_kv_blocks: int  # per instance, at `block_size`
    block_size: int
    max_model_len: int
    kv_bytes_per_token: int  # all layers, K and V
    source: str
    weight_nbytes: int = 0  # all layers (KunServe: the weight share of memory)


def get_profile(
    name_or_path: str | CostModelProfile,
    block_size: int = 16,
    memory_capacity_bytes: int | None = None,
) -> SimProfile:
    """A profile by name (or calibrate JSON path). The KV pool is sized by the engine
    itself: the capacity (the profiled machine's when known, else the engine's default
    EngineConfig.memory_capacity_bytes) minus the weights, in blocks."""
    cost = get_cost_profile(name_or_path)
    capacity = (
        memory_capacity_bytes or cost.memory_capacity_bytes or EngineConfig().memory_capacity_bytes
    )
    probe = LLMEngine.simulated(
        EngineConfig(block_size=block_size, memory_capacity_bytes=capacity), cost
    )
    return SimProfile(
        name=cost.name,
        cost_profile=cost,
        memory_capacity_bytes=capacity,
        num_kv_blocks=probe.block_manager.num_total_blocks,
        block_size=block_size,
        max_model_len=probe.max_model_len,
        kv_bytes_per_token=probe.kv_block_nbytes // block_size,
        weight_nbytes=probe.weight_nbytes,
        source=cost.source,
    )
