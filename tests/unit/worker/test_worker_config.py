"""Service configs: env vars, flags, and errors that name the bad value."""

from __future__ import annotations

import pytest

from gateway.config import GatewayConfig
from services.common.config import ConfigError, load_config
from services.worker.__main__ import parse_args
from services.worker.config import TestHooksConfig, WorkerConfig

MiB = 1024 * 1024


def test_worker_config_nests_the_engine_and_migration_configs_from_env_and_flags():
    config = load_config(
        WorkerConfig,
        "WORKER",
        overrides={"engine.num_kv_blocks": 32, "engine.max_num_seqs": None},
        environ={
            "LLMESH_WORKER_ENGINE_MEMORY_CAPACITY_BYTES": str(64 * MiB),
            "LLMESH_WORKER_ENGINE_SCHEDULING_POLICY": "priority",
            "LLMESH_WORKER_MIGRATION_LEASE_S": "1.5",
            "LLMESH_WORKER_INSTANCE_ID": "w-1",
        },
    )
    engine, migration = config.engine, config.migration
    assert (config.instance_id, engine.memory_capacity_bytes, engine.num_kv_blocks) == (
        "w-1",
        64 * MiB,
        32,
    )
    assert (engine.scheduling_policy, engine.max_num_seqs, engine.max_model_len) == (
        "priority",
        64,
        None,
    )
    assert (migration.lease_s, migration.stage_chunk_bytes) == (1.5, 16 * MiB)


def test_every_worker_flag_lands_in_its_field():
    args = parse_args(
        [
            "--bind", "127.0.0.1:7001", "--scheduler", "127.0.0.1:7002", "--instance-id", "w-2",
            "--model", "tiny", "--dtype", "float32", "--device", "cpu", "--block-size", "8",
            "--memory-capacity-bytes", "128MiB", "--num-kv-blocks", "none", "--max-num-seqs", "4",
            "--max-num-batched-tokens", "256", "--max-model-len", "none",
            "--scheduling-policy", "priority", "--kernels", "torch", "--torch-threads", "1",
            "--gil-switch-interval-us", "1000", "--transport-backend", "tcp",
            "--migration-selection", "shortest_first", "--migration-lease-s", "2.5",
            "--migration-transfer-timeout-s", "3", "--migration-stage-chunk-bytes", "0.25MiB",
        ]
    )  # fmt: skip
    config = load_config(WorkerConfig, "WORKER", vars(args), environ={})
    assert config == WorkerConfig(
        bind="127.0.0.1:7001",
        scheduler_address="127.0.0.1:7002",
        instance_id="w-2",
        engine=config.engine.replace(
            model="tiny",
            block_size=8,
            memory_capacity_bytes=128 * MiB,
            num_kv_blocks=None,
            max_num_seqs=4,
            max_num_batched_tokens=256,
            max_model_len=None,
            scheduling_policy="priority",
            kernels="torch",
        ),
        migration=config.migration,
        torch_threads=1,
        gil_switch_interval_us=1000,
        transport_backend="tcp",
    )
    assert (
        config.migration.selection,
        config.migration.lease_s,
        config.migration.transfer_timeout_s,
        config.migration.stage_chunk_bytes,
    ) == ("shortest_first", 2.5, 3.0, MiB // 4)
    assert (config.engine.block_size, config.engine.kernels) == (8, "torch")


@pytest.mark.parametrize(
    ("flag", "env", "raw", "value"),
    [
        ("--memory-capacity-bytes", "ENGINE_MEMORY_CAPACITY_BYTES", "134217728", 128 * MiB),
        ("--memory-capacity-bytes", "ENGINE_MEMORY_CAPACITY_BYTES", "128MiB", 128 * MiB),
        ("--migration-stage-chunk-bytes", "MIGRATION_STAGE_CHUNK_BYTES", "0.25 mib", MiB // 4),
        ("--num-kv-blocks", "ENGINE_NUM_KV_BLOCKS", "none", None),
        ("--num-kv-blocks", "ENGINE_NUM_KV_BLOCKS", "7", 7),
        ("--max-model-len", "ENGINE_MAX_MODEL_LEN", "None", None),
    ],
)
def test_a_flag_and_its_env_var_take_the_same_spellings(flag, env, raw, value):
    field = env.lower().split("_", 1)
    from_flag = load_config(WorkerConfig, "WORKER", vars(parse_args([flag, raw])), environ={})
    from_env = load_config(WorkerConfig, "WORKER", environ={f"LLMESH_WORKER_{env}": raw})
    assert from_flag == from_env
    assert getattr(getattr(from_flag, field[0]), field[1]) == value


def test_a_flags_none_wins_over_the_env_var():
    environ = {"LLMESH_WORKER_ENGINE_NUM_KV_BLOCKS": "32"}
    assert load_config(WorkerConfig, "WORKER", environ=environ).engine.num_kv_blocks == 32
    args = parse_args(["--num-kv-blocks", "none"])
    assert (
        load_config(WorkerConfig, "WORKER", vars(args), environ=environ).engine.num_kv_blocks
        is None
    )


@pytest.mark.parametrize("flag", ["--memory-capacity-bytes", "--migration-stage-chunk-bytes"])
@pytest.mark.parametrize("value", ["0", "-1", "0.5", "1e-9MiB", "16MB", "lots"])
def test_a_size_flag_below_one_byte_or_misspelled_is_refused_naming_the_flag(flag, value, capsys):
    with pytest.raises(SystemExit) as info:
        parse_args([flag, value])
    assert info.value.code == 2
    assert f"{flag}={value!r} is not a size of at least 1 byte" in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--num-kv-blocks", "--max-model-len"])
def test_an_optional_flag_is_unset_with_none_and_refuses_zero_like_its_env_var(flag, capsys):
    field = flag.removeprefix("--").replace("-", "_")
    with pytest.raises(ConfigError, match=f"{field} must be None or an int > 0, got 0"):
        load_config(WorkerConfig, "WORKER", vars(parse_args([flag, "0"])), environ={})
    with pytest.raises(SystemExit) as info:
        parse_args([flag, "all"])
    assert info.value.code == 2
    assert f"{flag}='all' is not a valid int" in capsys.readouterr().err


def test_llmesh_kernels_sets_the_engine_kernels_below_the_worker_variable():
    assert load_config(WorkerConfig, "WORKER", environ={}).engine.kernels == "auto"
    env = {"LLMESH_KERNELS": "torch"}
    assert load_config(WorkerConfig, "WORKER", environ=env).engine.kernels == "torch"
    env["LLMESH_WORKER_ENGINE_KERNELS"] = "native"
    assert load_config(WorkerConfig, "WORKER", environ=env).engine.kernels == "native"
    flags = {"engine.kernels": "auto"}
    assert load_config(WorkerConfig, "WORKER", flags, environ=env).engine.kernels == "auto"


def test_test_hooks_come_from_llmesh_test_hooks_only():
    assert load_config(TestHooksConfig, "TEST", environ={}).hooks == ""
    env = {"LLMESH_TEST_HOOKS": "tests.integration.hooks.pause_before_commit"}
    assert load_config(TestHooksConfig, "TEST", environ=env).hooks == env["LLMESH_TEST_HOOKS"]


@pytest.mark.parametrize(
    ("cls", "fields", "message"),
    [
        (WorkerConfig, {"bind": "nohost"}, "bind='nohost' must be host:port"),
        (WorkerConfig, {"report_interval_s": 0}, "report_interval_s=0 must be > 0"),
        (GatewayConfig, {"max_inflight_requests": 0}, "max_inflight_requests=0 must be an int > 0"),
        (GatewayConfig, {"scheduler_address": "x"}, "scheduler_address='x' must be host:port"),
        (GatewayConfig, {"dispatch_timeout_s": 0}, "dispatch_timeout_s=0 must be > 0"),
    ],
)
def test_bad_values_are_named(cls, fields, message):
    with pytest.raises(ConfigError) as info:
        cls(**fields)
    assert message in str(info.value)


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"LLMESH_WORKER_ENGINE_NUM_KV_BLOCKS": "-1"}, "num_kv_blocks must be None or an int > 0"),
        ({"LLMESH_WORKER_ENGINE_BLOCK_SIZE": "0"}, "block_size must be an int > 0, got 0"),
        ({"LLMESH_WORKER_ENGINE_DTYPE": "int8"}, "dtype 'int8'"),
        ({"LLMESH_WORKER_ENGINE_KERNELS": "flash"}, "kernels 'flash' is not one of"),
        (
            {"LLMESH_WORKER_MIGRATION_STAGE_CHUNK_BYTES": "0"},
            "LLMESH_WORKER_MIGRATION_STAGE_CHUNK_BYTES='0' is not a size of at least 1 byte",
        ),
        ({"LLMESH_WORKER_ENGINE_NUM_KV_BLOCKS": "0"}, "num_kv_blocks must be None or an int > 0"),
        ({"LLMESH_WORKER_MIGRATION_LEASE_S": "0"}, "lease_s=0.0 must be > 0"),
        ({"LLMESH_WORKER_ENGINE_MAX_NUM_SEQS": "many"}, "LLMESH_WORKER_ENGINE_MAX_NUM_SEQS='many'"),
    ],
)
def test_bad_nested_values_are_one_error_type_naming_them(environ, message):
    with pytest.raises(ConfigError) as info:
        load_config(WorkerConfig, "WORKER", environ=environ)
    assert message in str(info.value)


def test_the_worker_installs_the_fault_hooks_llmesh_test_hooks_names(monkeypatch):
    from services.worker.__main__ import _fault_hooks
    from services.worker.kunserve.faults import NO_GROUP_FAULTS
    from services.worker.migration.faults import NO_FAULTS
    from tests.integration.hooks.pause_before_commit import PauseBeforeCommit
    from tests.integration.hooks.pause_group_exchange import PauseGroupExchange

    monkeypatch.delenv("LLMESH_TEST_HOOKS", raising=False)
    assert _fault_hooks() == (NO_FAULTS, NO_GROUP_FAULTS)
    monkeypatch.setenv("LLMESH_TEST_HOOKS", "tests.integration.hooks.pause_before_commit")
    migration, kunserve = _fault_hooks()
    assert (type(migration), kunserve) == (PauseBeforeCommit, NO_GROUP_FAULTS)
    monkeypatch.setenv("LLMESH_TEST_HOOKS", "tests.integration.hooks.pause_group_exchange")
    migration, kunserve = _fault_hooks()
    assert (migration, type(kunserve)) == (NO_FAULTS, PauseGroupExchange)


def test_old_variable_names_are_warned_about_and_the_service_addresses_are_not(caplog):
    from services.scheduler.config import SchedulerConfig

    env = {
        "LLMESH_WORKER_MEMORY_CAPACITY_MB": "64",  # now ..._ENGINE_MEMORY_CAPACITY_BYTES
        "LLMESH_WORKER_ENGINE_MEMORY_CAPACITY_BYTES": "64MiB",
        "LLMESH_SCHEDULER_LEASE_MS": "300",  # now ..._LEASE_S
        "LLMESH_SCHEDULER_ADDRESS": "127.0.0.1:7002",  # where the CLI finds the scheduler
        "LLMESH_GATEWAY_ADDRESS": "127.0.0.1:7001",
        "LLMESH_KERNELS": "torch",
        "LLMESH_TEST_HOOKS": "",
    }
    with caplog.at_level("WARNING", logger="services.common.config"):
        worker = load_config(WorkerConfig, "WORKER", environ=env)
        scheduler = load_config(SchedulerConfig, "SCHEDULER", environ=env)
        gateway = load_config(GatewayConfig, "GATEWAY", environ=env)
    assert (worker.engine.memory_capacity_bytes, scheduler.lease_s) == (64 * MiB, 3.0)
    assert gateway == GatewayConfig()
    assert [r.getMessage().split()[0] for r in caplog.records] == [
        "LLMESH_WORKER_MEMORY_CAPACITY_MB",
        "LLMESH_SCHEDULER_LEASE_MS",
    ]


def test_kunserve_micro_batching_from_env_and_flags():
    args = parse_args(["--kunserve-micro-batching", "simple", "--kunserve-max-in-flight", "3"])
    config = load_config(
        WorkerConfig,
        "WORKER",
        vars(args),
        environ={"LLMESH_WORKER_KUNSERVE_MIN_CHUNK_TOKENS": "16"},
    )
    kunserve = config.kunserve
    assert (kunserve.micro_batching, kunserve.max_in_flight, kunserve.min_chunk_tokens) == (
        "simple",
        3,
        16,
    )
    assert WorkerConfig().kunserve.micro_batching == "lookahead"
    assert WorkerConfig().kunserve.cost_profile == "tiny-cpu"
    with pytest.raises(ConfigError, match=r"micro_batching='greedy' must be one of"):
        load_config(
            WorkerConfig, "WORKER", environ={"LLMESH_WORKER_KUNSERVE_MICRO_BATCHING": "greedy"}
        )


def test_worker_data_plane_bind_and_advertise_reach_the_tcp_transport():
    from services.worker.server import transport_config

    config = load_config(
        WorkerConfig,
        "WORKER",
        environ={
            "LLMESH_WORKER_TRANSPORT_BACKEND": "tcp",
            "LLMESH_WORKER_TRANSPORT_BIND": "0.0.0.0:50071",
            "LLMESH_WORKER_TRANSPORT_ADVERTISE_ADDRESS": "10.0.0.2:6071",
        },
    )
    transport = transport_config(config)
    assert (transport.backend, transport.tcp_host, transport.tcp_port) == ("tcp", "0.0.0.0", 50071)
    assert transport.tcp_advertise_address == "10.0.0.2:6071"


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("TRANSPORT_BIND", "0.0.0.0", "transport_bind='0.0.0.0' must be host:port"),
        ("TRANSPORT_BIND", "h:x", "transport_bind='h:x' must be host:port"),
        ("TRANSPORT_ADVERTISE_ADDRESS", "10.0.0.2", "transport_advertise_address='10.0.0.2'"),
    ],
)
def test_worker_data_plane_addresses_are_validated(field, value, message):
    with pytest.raises(ConfigError, match=message):
        load_config(WorkerConfig, "WORKER", environ={f"LLMESH_WORKER_{field}": value})


def test_admission_bounds_come_from_flags_and_env_vars_and_none_unbounds():
    worker = load_config(
        WorkerConfig, "WORKER", overrides=vars(parse_args(["--max-waiting-requests", "none"]))
    )
    assert worker.max_waiting_requests is None
    assert WorkerConfig().max_waiting_requests == 256
    worker = load_config(
        WorkerConfig, "WORKER", environ={"LLMESH_WORKER_MAX_WAITING_REQUESTS": "8"}
    )
    assert worker.max_waiting_requests == 8
    gateway = load_config(
        GatewayConfig,
        "GATEWAY",
        environ={
            "LLMESH_GATEWAY_KEY_MAX_CONCURRENT": "4",
            "LLMESH_GATEWAY_KEY_RATE_PER_S": "2.5",
            "LLMESH_GATEWAY_KEY_BURST": "10",
        },
    )
    assert (gateway.key_max_concurrent, gateway.key_rate_per_s, gateway.key_burst) == (4, 2.5, 10)
    assert (GatewayConfig().key_max_concurrent, GatewayConfig().key_rate_per_s) == (None, None)
    with pytest.raises(ConfigError, match="max_waiting_requests=0 must be none or an int > 0"):
        load_config(WorkerConfig, "WORKER", environ={"LLMESH_WORKER_MAX_WAITING_REQUESTS": "0"})
    with pytest.raises(ConfigError, match="key_rate_per_s=0.0 must be none or > 0"):
        load_config(GatewayConfig, "GATEWAY", environ={"LLMESH_GATEWAY_KEY_RATE_PER_S": "0"})
