"""A mesh across network-namespace hosts, each service started as its container would be.

    with NetnsMesh(log_dir, worker_env={"MEMORY_CAPACITY": "256MiB"}).start() as mesh:
        mesh.gateway_address, mesh.scheduler_address, mesh.hosts.tx_bytes("w1")

The head host runs the scheduler and the gateway of deploy/compose/head.yaml, each
worker host (w1, w2) the worker of worker.yaml. Each service is started inside its
namespace with the image's entrypoint (deploy/docker/entrypoint.sh), its compose
`command`, and exactly the environment docker-compose resolves for it from a .env
(.env.example with this run's addresses; bench/_compose.py). Only launcher plumbing is
added: the interpreter, PYTHONPATH, the ready-file directory, the parent's PID. Host
paths replace the container paths of the service's volumes (a model under /models).

The .env pins UCX to its TCP transport on each host's eth0 (UCX_TLS / UCX_NET_DEVICES:
the namespaces share one IPC namespace, see bench/_netns.py), so KV between workers
crosses the veth links. Stop order: gateway, workers, scheduler, by PID; then the
namespaces go.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bench._compose import ENV_EXAMPLE, read_env_file, resolved_services, service_environment
from bench._netns import DEVICE, NetnsHosts
from services.common import cluster_auth
from services.common.cluster_tls import write_private_file
from services.common.procs import (
    PARENT_PID_ENV,
    REPO_ROOT,
    ServiceProcess,
    ensure_cluster_secret,
    stop_all,
    wait_for_instances,
)

ENTRYPOINT = REPO_ROOT / "deploy" / "docker" / "entrypoint.sh"
WORKER_HOSTS = ("w1", "w2")
# What this run's .env changes from .env.example (besides each host's address).
NETNS_ENV = {
    "BIND_HOST": "0.0.0.0",
    "MODEL": "tiny",
    "OTLP_ENDPOINT": "",  # no collector in the namespaces
    "UCX_TLS": "tcp,self",
    "UCX_NET_DEVICES": DEVICE,
}


def host_paths(env: Mapping[str, str], volumes: Sequence) -> dict[str, str]:
    """env with container paths of the service's bind mounts (`/models/x`) replaced by
    the host paths they mount (what the process outside a container must open)."""
    mounts = []
    for volume in volumes:
        source, target = (
            (volume["source"], volume["target"])
            if isinstance(volume, dict)
            else volume.split(":")[:2]
        )
        mounts.append((target.rstrip("/"), source.rstrip("/")))
    resolved = {}
    for key, value in env.items():
        for target, source in mounts:
            if value == target or value.startswith(target + "/"):
                value = source + value[len(target) :]
        resolved[key] = value
    return resolved


def port_of(address: str) -> str:
    return address.rpartition(":")[2]


@dataclass
class NetnsMesh:
    log_dir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="llmesh-netns-")))
    env: dict[str, str] = field(default_factory=dict)  # .env values for every host
    worker_args: tuple[str, ...] = ()  # appended to the compose command
    scheduler_args: tuple[str, ...] = ()
    gateway_args: tuple[str, ...] = ()
    rate: str | None = None  # tc tbf on every link, e.g. "10gbit"
    ready_timeout_s: float = 180.0
    hosts: NetnsHosts | None = None
    scheduler: ServiceProcess | None = None
    gateway: ServiceProcess | None = None
    workers: list[ServiceProcess] = field(default_factory=list)
    scheduler_address: str = ""
    gateway_address: str = ""
    gateway_api_key: str = ""  # compose turns client authentication on: the key clients use

    def dotenv(self, worker_host: str | None = None) -> dict[str, str]:
        """The .env of one machine: .env.example, this run's settings, its addresses."""
        assert self.hosts is not None
        env = {**read_env_file(ENV_EXAMPLE), **NETNS_ENV, **self.env}
        env["SECRETS_DIR"] = str(self.log_dir / "secrets")
        env["HEAD_ADDRESS"] = self.hosts.address("head")
        if worker_host is not None:
            env["WORKER_ADDRESS"] = self.hosts.address(worker_host)
            env["WORKER_ID"] = worker_host
        return env

    def _write_secrets(self) -> None:
        """What compose mounts at /llmesh-secrets: this process's cluster secret (so its
        operator calls are a member's) and one client API key."""
        ensure_cluster_secret({})
        secrets_dir = self.log_dir / "secrets"
        secrets_dir.mkdir(exist_ok=True)
        write_private_file(secrets_dir / "cluster-secret", cluster_auth.current().secret.decode())
        self.gateway_api_key = "sk-netns-" + secrets.token_hex(16)
        write_private_file(secrets_dir / "api-keys", f"netns:{self.gateway_api_key}")

    def start(self) -> NetnsMesh:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._write_secrets()
        self.hosts = NetnsHosts.create(["head", *WORKER_HOSTS], rate=self.rate)
        try:
            head = resolved_services(["head.yaml"], self.dotenv())
            self.scheduler = self._start(
                "head", "scheduler", head["scheduler"], self.scheduler_args
            )
            self.scheduler.wait_ready(self.ready_timeout_s)
            head_ip = self.hosts.address("head")
            self.scheduler_address = (
                f"{head_ip}:{port_of(head['scheduler']['environment']['LLMESH_SCHEDULER_BIND'])}"
            )
            for host in WORKER_HOSTS:
                worker = resolved_services(["worker.yaml"], self.dotenv(host))["worker"]
                self.workers.append(self._start(host, host, worker, self.worker_args))
            self.gateway = self._start("head", "gateway", head["gateway"], self.gateway_args)
            for proc in [*self.workers, self.gateway]:
                proc.wait_ready(self.ready_timeout_s)
            self.gateway_address = head["gateway"]["environment"][
                "LLMESH_GATEWAY_ADVERTISE_ADDRESS"
            ]
            wait_for_instances(
                self.gateway_address,
                len(WORKER_HOSTS),
                self.ready_timeout_s,
                api_key=self.gateway_api_key,
            )
        except BaseException:
            self.stop()
            raise
        return self

    def _start(
        self, host: str, name: str, service: Mapping, extra: Sequence[str]
    ) -> ServiceProcess:
        """The service's entrypoint + command inside host's namespace, with its env."""
        assert self.hosts is not None
        run_dir = self.log_dir / f"{name}.run"
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": os.environ.get("HOME", "/root"),
            **host_paths(service_environment(service), service.get("volumes", ())),
            # Launcher plumbing (what the image provides otherwise).
            "LLMESH_ENTRYPOINT_PYTHON": sys.executable,
            "LLMESH_RUN_DIR": str(run_dir),
            "PYTHONPATH": str(REPO_ROOT),
            "PYTHONUNBUFFERED": "1",
            PARENT_PID_ENV: str(os.getpid()),
        }
        log_path = self.log_dir / f"{name}.log"
        with open(log_path, "ab") as log:
            popen = subprocess.Popen(
                [*self.hosts.exec_prefix(host), str(ENTRYPOINT), *service["command"], *extra],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=REPO_ROOT,
                env=env,
                start_new_session=True,
            )
        return ServiceProcess(name, service["command"][0], popen, run_dir / "ready.json", log_path)

    def processes(self) -> list[ServiceProcess]:
        return [p for p in (self.gateway, *self.workers, self.scheduler) if p is not None]

    def live_workers(self) -> list[ServiceProcess]:
        return [w for w in self.workers if w.is_alive()]

    def stop(self, grace_s: float = 10.0) -> None:
        """Gateway, workers, scheduler (by PID), then the namespaces and the bridge."""
        try:
            if self.gateway is not None:
                stop_all([self.gateway], grace_s)
            stop_all(self.workers, grace_s)
            if self.scheduler is not None:
                stop_all([self.scheduler], grace_s)
        finally:
            if self.hosts is not None:
                self.hosts.close()

    def __enter__(self) -> NetnsMesh:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
