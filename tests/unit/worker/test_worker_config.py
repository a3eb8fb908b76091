"""Service configs: env vars, flags, and errors that name the bad value."""

from __future__ import annotations

import pytest

from gateway.config import GatewayConfig
from services.common.config import load_config
from services.worker.config import MiB, WorkerConfig


def test_worker_config_from_env_and_flags_builds_the_engine_config():
    config = load_config(
        WorkerConfig,
        "WORKER",
        overrides={"num_kv_blocks": 32, "max_num_seqs": None},
        environ={"LLMESH_WORKER_MEMORY_CAPACITY_MB": "64", "LLMESH_WORKER_INSTANCE_ID": "w-1"},
    )
    engine = config.engine_config()
    assert (config.instance_id, engine.memory_capacity_bytes, engine.num_kv_blocks) == (
        "w-1",
        64 * MiB,
        32,
    )
    assert engine.max_num_seqs == 64 and engine.max_model_len is None
    assert config.migration_config().stage_chunk_bytes == 16 * MiB


@pytest.mark.parametrize(
    ("cls", "fields", "message"),
    [
        (WorkerConfig, {"bind": "nohost"}, "bind='nohost' must be host:port"),
        (WorkerConfig, {"num_kv_blocks": -1}, "num_kv_blocks=-1 must be >= 0"),
        (WorkerConfig, {"block_size": 0}, "block_size must be an int > 0, got 0"),
        (WorkerConfig, {"dtype": "int8"}, "dtype 'int8'"),
        (
            WorkerConfig,
            {"migration_stage_chunk_mib": 0},
            "migration_stage_chunk_mib=0 must be > 0",
        ),
        (GatewayConfig, {"max_inflight_requests": 0}, "max_inflight_requests=0 must be an int > 0"),
        (GatewayConfig, {"scheduler_address": "x"}, "scheduler_address='x' must be host:port"),
    ],
)
def test_bad_values_are_named(cls, fields, message):
    with pytest.raises(ValueError) as info:
        cls(**fields)
    assert message in str(info.value)
