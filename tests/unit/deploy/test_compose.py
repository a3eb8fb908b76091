"""deploy/compose: every file passes `docker-compose config` with .env.example, and the
keys that make workers work across machines (security, UCX, addresses) are there.

Uses Debian's docker-compose 1.29 (`.ci/run` installs it): its own interpolation,
`extends` and overlays, no Docker engine needed.
"""

from __future__ import annotations

import logging

import pytest
import yaml

from bench._compose import (
    COMPOSE_DIR,
    ENV_EXAMPLE,
    ComposeError,
    compose_config,
    read_env_file,
    resolved_services,
    service_environment,
)
from gateway.config import GatewayConfig
from services.common.config import load_config
from services.scheduler.config import SchedulerConfig
from services.worker.config import WorkerConfig

EXAMPLE = read_env_file(ENV_EXAMPLE)
FILE_SETS = {
    "one host": ["compose.yaml"],
    "head": ["head.yaml"],
    "worker": ["worker.yaml"],
    "worker with RDMA": ["worker.yaml", "worker.rdma.yaml"],
}
LLMESH_SERVICES = {"scheduler": SchedulerConfig, "gateway": GatewayConfig, "worker": WorkerConfig}


def services(files, **changes) -> dict[str, dict]:
    return resolved_services(files, {**EXAMPLE, **changes})


def workers(resolved: dict[str, dict]) -> dict[str, dict]:
    return {name: s for name, s in resolved.items() if s.get("command") == ["worker"]}


@pytest.mark.parametrize("files", FILE_SETS.values(), ids=FILE_SETS.keys())
def test_every_compose_file_passes_docker_compose_config_with_the_example_env(files):
    assert "services:" in compose_config(files, EXAMPLE)


@pytest.mark.parametrize(("files", "missing"), [(["head.yaml"], "HEAD_ADDRESS"), (["worker.yaml"], "WORKER_ADDRESS"), (["worker.yaml"], "HEAD_ADDRESS")])  # fmt: skip
def test_multi_host_files_refuse_to_start_without_the_addresses(files, missing):
    env = {k: v for k, v in EXAMPLE.items() if k != missing}
    with pytest.raises(ComposeError, match=f"set {missing} in .env"):
        compose_config(files, env)


def test_prometheus_scrapes_the_metrics_ports_the_demo_binds():
    resolved = resolved_services(["compose.yaml"], {})
    bound = {
        name: int(env[f"LLMESH_{s['command'][0].upper()}_TELEMETRY_METRICS_BIND"].rsplit(":", 1)[1])
        for name, s in resolved.items()
        if s.get("command") and (env := service_environment(s))
    }
    config = yaml.safe_load((COMPOSE_DIR / "observability" / "prometheus.yml").read_text())
    scraped = {
        job["job_name"]: sorted(
            int(target.rsplit(":", 1)[1])
            for static in job["static_configs"]
            for target in static["targets"]
        )
        for job in config["scrape_configs"]
    }
    assert scraped == {
        "llmesh-scheduler": [bound["scheduler"]],
        "llmesh-gateway": [bound["gateway"]],
        "llmesh-worker": sorted([bound["worker-0"], bound["worker-1"]]),
    }


def test_the_one_host_demo_keeps_every_api_on_loopback():
    # Only the read-only /metrics listen wider (Prometheus scrapes them from a bridge).
    for name, service in resolved_services(["compose.yaml"], {}).items():
        for key, value in service_environment(service).items():
            if key.endswith("_BIND") and "TELEMETRY_METRICS" not in key:
                assert value.startswith("127.0.0.1:"), (name, key, value)


def test_one_host_demo_needs_no_env_file():
    resolved = resolved_services(["compose.yaml"], {})
    assert set(resolved) == {
        "scheduler", "gateway", "worker-0", "worker-1", "jaeger", "prometheus", "grafana",
    }  # fmt: skip
    envs = {name: service_environment(s) for name, s in workers(resolved).items()}
    assert {n: e["LLMESH_WORKER_ADVERTISE_ADDRESS"] for n, e in envs.items()} == {
        "worker-0": "127.0.0.1:50061",
        "worker-1": "127.0.0.1:50062",
    }
    assert {n: e["LLMESH_WORKER_TELEMETRY_METRICS_BIND"] for n, e in envs.items()} == {
        "worker-0": "0.0.0.0:9103",
        "worker-1": "0.0.0.0:9104",
    }
    # Traces go to the demo's Jaeger.
    endpoints = {service_environment(s)["OTEL_EXPORTER_OTLP_ENDPOINT"] for s in resolved.values() if s.get("command")}  # fmt: skip
    assert endpoints == {"http://127.0.0.1:4317"}


def mounts(service: dict) -> dict[str, str]:
    """Container path -> host path of a resolved service's bind mounts."""
    found = {}
    for volume in service.get("volumes", ()):
        if isinstance(volume, dict):
            found[volume["target"]] = volume["source"]
        else:
            source, target = volume.split(":")[:2]
            found[target] = source
    return found


@pytest.mark.parametrize("files", FILE_SETS.values(), ids=FILE_SETS.keys())
def test_workers_get_what_ucx_needs_and_announce_their_machine(files):
    found = workers(services(files))
    assert found or files == ["head.yaml"]
    for name, worker in found.items():
        assert worker["network_mode"] == "host", name
        assert worker["ipc"] == "host", name
        assert worker["pid"] == "host", name
        assert {"SYS_PTRACE", "IPC_LOCK"} <= set(worker["cap_add"]), name
        assert worker["ulimits"]["memlock"] == {"soft": -1, "hard": -1}, name
        assert worker["shm_size"] == EXAMPLE["SHM_SIZE"], name
        assert worker.get("privileged") is not True, name
        assert mounts(worker)["/models"] == EXAMPLE["MODEL_DIR"], name
        env = service_environment(worker)
        rdma = "worker.rdma.yaml" in files
        assert env["UCX_TLS"] == EXAMPLE["UCX_TLS_RDMA" if rdma else "UCX_TLS"], name
        assert env["UCX_NET_DEVICES"] == EXAMPLE["UCX_NET_DEVICES"], name
        assert ("/dev/infiniband:/dev/infiniband" in worker.get("devices", ())) == rdma, name
        if files == ["compose.yaml"]:
            continue  # the one-host demo: checked in test_one_host_demo_needs_no_env_file
        host, port = EXAMPLE["WORKER_ADDRESS"], EXAMPLE["WORKER_PORT"]
        assert env["LLMESH_WORKER_BIND"] == f"{EXAMPLE['BIND_HOST']}:{port}"
        assert env["LLMESH_WORKER_ADVERTISE_ADDRESS"] == f"{host}:{port}"
        assert env["LLMESH_WORKER_TRANSPORT_ADVERTISE_ADDRESS"] == (
            f"{host}:{EXAMPLE['TRANSPORT_PORT']}"
        )
        assert env["LLMESH_WORKER_SCHEDULER_ADDRESS"] == (
            f"{EXAMPLE['HEAD_ADDRESS']}:{EXAMPLE['SCHEDULER_PORT']}"
        )


def test_worker_reserves_its_gpus_from_the_env():
    worker = services(["worker.yaml"], GPU_IDS="2,3")["worker"]
    [device] = worker["deploy"]["resources"]["reservations"]["devices"]
    assert device == {"driver": "nvidia", "device_ids": ["2,3"], "capabilities": ["gpu"]}


@pytest.mark.parametrize("endpoint", ["", "http://10.0.0.9:4317"])
def test_the_otlp_endpoint_reaches_every_service_config_and_empty_turns_traces_off(endpoint):
    for name, service in services(["head.yaml"], OTLP_ENDPOINT=endpoint).items():
        if not service.get("command"):
            continue
        command = service["command"][0]
        config = load_config(
            LLMESH_SERVICES[command], command.upper(), environ=service_environment(service)
        )
        assert config.telemetry.otlp_endpoint == endpoint, name


def test_ucx_transports_are_chosen_in_the_env_file():
    env = service_environment(
        services(["worker.yaml"], UCX_TLS="tcp,self", UCX_NET_DEVICES="eth1")["worker"]
    )
    assert (env["UCX_TLS"], env["UCX_NET_DEVICES"]) == ("tcp,self", "eth1")


@pytest.mark.parametrize("files", [["compose.yaml"], ["head.yaml"]], ids=["one host", "head"])
def test_head_runs_observability_with_the_shared_config_paths(files):
    resolved = services(files)
    assert {"jaeger", "prometheus", "grafana"} <= set(resolved)
    mounts = {
        (v["source"] if isinstance(v, dict) else v.split(":")[0]).split("deploy/compose/")[-1]
        for name in ("prometheus", "grafana")
        for v in resolved[name]["volumes"]
    }
    assert mounts == {
        "observability/prometheus.yml",
        "observability/grafana/provisioning",
        "observability/grafana/dashboards",
    }
    for name in ("scheduler", "gateway"):
        env = service_environment(resolved[name])
        assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == EXAMPLE["OTLP_ENDPOINT"]
        assert f"LLMESH_{name.upper()}_TELEMETRY_METRICS_BIND" in env
    assert "LLMESH_GATEWAY_HTTP_BIND" in service_environment(resolved["gateway"])


@pytest.mark.parametrize("files", FILE_SETS.values(), ids=FILE_SETS.keys())
def test_every_llmesh_variable_is_a_valid_field_of_its_service(files, caplog):
    """A typo in a variable name (ignored with a warning) or an invalid value (refused
    at start) fails here instead of on a machine."""
    for name, service in services(files).items():
        command = service.get("command") or [""]
        if command[0] not in LLMESH_SERVICES:
            continue
        env = service_environment(service)
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            load_config(LLMESH_SERVICES[command[0]], command[0].upper(), environ=env)
        assert [r.getMessage() for r in caplog.records] == [], name
