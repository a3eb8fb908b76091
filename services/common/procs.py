"""Start llmesh services as child OS processes on this machine and stop them cleanly.

Used by `./llmesh up`, `./llmesh bench serve` and the integration tests, so all three
start processes the same way compose does: `python -m <service> --flags`.

Ready protocol: every service takes `--ready-file PATH`. Once bound and SERVING it
writes `{"address": "host:port", "pid": N, "metrics_address": "host:port"}` there
(atomically, by rename; metrics_address is "" when its /metrics endpoint is off). The
parent polls for the file, so ports can be chosen by the OS (`--bind 127.0.0.1:0`).

No orphans: children start in their own session (a Ctrl-C in the terminal reaches only
the parent, which stops them in order) and, on Linux, get SIGTERM from the kernel if
the parent dies without cleaning up (PR_SET_PDEATHSIG, set by the child itself in
`die_with_parent()`, which every service's main() calls). That signal fires when the
*thread* that started the child exits, so start services from a long-lived thread
(the main thread, as the CLI, the bench and pytest fixtures do).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from protos import gateway_pb2, gateway_pb2_grpc

SERVICE_MODULES = {
    "scheduler": "services.scheduler",
    "worker": "services.worker",
    "gateway": "gateway",
}
REPO_ROOT = Path(__file__).resolve().parents[2]
_PR_SET_PDEATHSIG = 1


def write_ready_file(path: str, address: str, metrics_address: str = "", **extra: str) -> None:
    """Called by a service once it is SERVING: tells the parent where it listens, where
    its Prometheus /metrics are ("" = off) and `extra` addresses (the gateway's
    `http_address`)."""
    target = Path(path)
    tmp = target.with_name(target.name + ".tmp")
    ready = {"address": address, "pid": os.getpid(), "metrics_address": metrics_address}
    tmp.write_text(json.dumps({**ready, **extra}))
    os.replace(tmp, target)


PARENT_PID_ENV = "LLMESH_PARENT_PID"


def die_with_parent() -> None:
    """Called first thing by every service's main(): if a launcher started it (it set
    LLMESH_PARENT_PID), get SIGTERM when the launching thread dies, and exit at once if
    the parent is already gone.

    Done in the child after exec rather than in a `preexec_fn`: Python code between
    fork and exec can deadlock or crash when the parent runs gRPC threads (the
    scheduler's provisioner and asyncio tests fork from such processes).
    """
    expected = os.environ.pop(PARENT_PID_ENV, "")
    if not expected or not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if str(os.getppid()) != expected:  # the parent died before prctl took effect
        os._exit(1)


class ServiceStartError(RuntimeError):
    """A service exited or did not become ready in time; the message has its log tail."""


class ServiceProcess:
    """One running service: its process, where it listens, and its log file."""

    def __init__(
        self, name: str, kind: str, popen: subprocess.Popen, ready_file: Path, log_path: Path
    ):
        self.name = name
        self.kind = kind
        self.popen = popen
        self.ready_file = ready_file
        self.log_path = log_path
        self.address: str | None = None
        self.ready_info: dict = {}  # the whole ready file (extra addresses)
        self.metrics_address = ""  # its Prometheus /metrics host:port ("" = off)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def is_alive(self) -> bool:
        return self.popen.poll() is None

    def wait_ready(self, timeout_s: float = 120.0) -> str:
        """Block until the service wrote its ready file; returns its address."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.ready_file.exists():
                self.ready_info = json.loads(self.ready_file.read_text())
                self.address = self.ready_info["address"]
                self.metrics_address = self.ready_info.get("metrics_address", "")
                return self.address
            if not self.is_alive():
                raise ServiceStartError(
                    f"{self.name} exited with code {self.popen.returncode} before it was ready; "
                    f"last log lines ({self.log_path}):\n{self.log_tail()}"
                )
            time.sleep(0.05)
        raise ServiceStartError(
            f"{self.name} was not ready after {timeout_s:.0f}s; last log lines ({self.log_path}):\n"
            f"{self.log_tail()}"
        )

    def kill(self) -> None:
        """SIGKILL (no cleanup at all), then reap."""
        if self.is_alive():
            os.kill(self.pid, signal.SIGKILL)
        self.popen.wait()

    def signal_stop(self) -> None:
        if self.is_alive():
            os.kill(self.pid, signal.SIGTERM)

    def stop(self, grace_s: float = 10.0) -> int:
        """SIGTERM, wait up to grace_s for a graceful exit, then SIGKILL. Returns the exit code."""
        self.signal_stop()
        try:
            return self.popen.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            self.kill()
            return self.popen.returncode

    def log_tail(self, num_lines: int = 30) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        return "\n".join(lines[-num_lines:])


def start_service(
    kind: str,
    args: list[str],
    *,
    log_dir: Path,
    name: str | None = None,
    env: dict[str, str] | None = None,
) -> ServiceProcess:
    """Start `python -m <service> ARGS --ready-file ...` with its output in log_dir/NAME.log."""
    if kind not in SERVICE_MODULES:
        raise ValueError(f"service kind {kind!r} is not one of {sorted(SERVICE_MODULES)}")
    name = name or kind
    log_dir.mkdir(parents=True, exist_ok=True)
    ready_file = log_dir / f"{name}.ready.json"
    ready_file.unlink(missing_ok=True)
    log_path = log_dir / f"{name}.log"
    child_env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        **(env or {}),
        PARENT_PID_ENV: str(os.getpid()),
    }
    # Children import `protos`, `services`, `gateway` from the repository.
    child_env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(REPO_ROOT), child_env.get("PYTHONPATH", "")) if p
    )
    with open(log_path, "ab") as log:
        popen = subprocess.Popen(
            [sys.executable, "-m", SERVICE_MODULES[kind], *args, "--ready-file", str(ready_file)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=REPO_ROOT,
            env=child_env,
            start_new_session=True,
        )
    return ServiceProcess(name, kind, popen, ready_file, log_path)


def stop_all(processes: list[ServiceProcess], grace_s: float = 10.0) -> None:
    """SIGTERM every live process at once, wait up to grace_s in total, SIGKILL the rest."""
    for proc in processes:
        proc.signal_stop()
    deadline = time.monotonic() + grace_s
    for proc in processes:
        try:
            proc.popen.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()


def ensure_cluster_secret(env: dict[str, str]) -> None:
    """Make sure the children (and this process's clients) find a cluster secret: the
    environment's or `env`'s, else the per-user default file, written now if missing."""
    from services.common.cluster_auth import ensure_secret_file

    names = ("LLMESH_CLUSTER_SECRET", "LLMESH_CLUSTER_SECRET_FILE")
    if not any(name in env or name in os.environ for name in names):
        ensure_secret_file()


def gateway_num_instances(
    gateway_address: str, timeout_s: float = 1.0, api_key: str = ""
) -> int | None:
    """Instances the gateway currently knows, or None if it does not answer."""
    metadata = [("authorization", f"Bearer {api_key}")] if api_key else None
    with grpc.insecure_channel(gateway_address) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        try:
            return stub.GetModelInfo(
                gateway_pb2.GetModelInfoRequest(), timeout=timeout_s, metadata=metadata
            ).num_instances
        except grpc.RpcError:
            return None


def wait_for_instances(
    gateway_address: str, num_instances: int, timeout_s: float = 60.0, api_key: str = ""
) -> None:
    """Block until the gateway's cluster view lists num_instances instances."""
    deadline = time.monotonic() + timeout_s
    seen = None
    while time.monotonic() < deadline:
        seen = gateway_num_instances(gateway_address, api_key=api_key)
        if seen == num_instances:
            return
        time.sleep(0.1)
    raise ServiceStartError(
        f"gateway {gateway_address} saw {seen} instances, not {num_instances}, after {timeout_s:.0f}s"
    )


@dataclass
class LocalMesh:
    """A scheduler, a gateway and N workers as separate processes on loopback.

    with LocalMesh(log_dir=Path("/tmp/mesh"), num_workers=2) as mesh:
        client = Client(mesh.gateway_address)
    """

    log_dir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="llmesh-")))
    num_workers: int = 2
    model: str = "tiny"
    host: str = "127.0.0.1"
    scheduler_port: int = 0
    gateway_port: int = 0
    gateway_http_port: int = 0  # the OpenAI-compatible HTTP API
    worker_args: tuple[str, ...] = ()  # extra flags for every worker
    gateway_args: tuple[str, ...] = ()
    gateway_api_key: str = ""  # a key the gateway accepts, when its gateway_args turn keys on
    scheduler_args: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    # Instances to wait for at start (default num_workers); with the scheduler's
    # --autoscale its provisioner starts workers itself, so this can exceed num_workers.
    wait_instances: int | None = None
    ready_timeout_s: float = 180.0
    scheduler: ServiceProcess | None = None
    gateway: ServiceProcess | None = None
    workers: list[ServiceProcess] = field(default_factory=list)
    _next_worker_index: int = 0

    @property
    def scheduler_address(self) -> str:
        assert self.scheduler is not None and self.scheduler.address
        return self.scheduler.address

    @property
    def gateway_address(self) -> str:
        assert self.gateway is not None and self.gateway.address
        return self.gateway.address

    @property
    def gateway_http_address(self) -> str:
        """host:port of the gateway's OpenAI-compatible API (base URL http://ADDRESS/v1)."""
        assert self.gateway is not None and self.gateway.ready_info.get("http_address")
        return self.gateway.ready_info["http_address"]

    def processes(self) -> list[ServiceProcess]:
        return [p for p in (self.gateway, *self.workers, self.scheduler) if p is not None]

    def start(self) -> LocalMesh:
        ensure_cluster_secret(self.env)
        try:
            self.start_scheduler(self.scheduler_port)
            new_workers = [self._spawn_worker() for _ in range(self.num_workers)]
            self.gateway = self.spawn_gateway(self.gateway_port, self.gateway_http_port)
            for proc in [*new_workers, self.gateway]:
                proc.wait_ready(self.ready_timeout_s)
            wait_for_instances(
                self.gateway_address,
                self.num_workers if self.wait_instances is None else self.wait_instances,
                self.ready_timeout_s,
                api_key=self.gateway_api_key,
            )
        except BaseException:
            self.stop()
            raise
        return self

    def start_scheduler(self, port: int) -> ServiceProcess:
        """(Re)start the scheduler; pass its old port to come back at the same address."""
        self.scheduler = start_service(
            "scheduler",
            ["--bind", f"{self.host}:{port}", *self.scheduler_args],
            log_dir=self.log_dir,
            env=self.env,
        )
        self.scheduler.wait_ready(self.ready_timeout_s)
        return self.scheduler

    def spawn_gateway(self, port: int = 0, http_port: int = 0, name: str = "gateway"):
        """Start a gateway of this mesh (not waiting for it): the mesh's own at start,
        more or restarted ones (its old port: back at the same address) by callers."""
        return start_service(
            "gateway",
            [
                "--bind", f"{self.host}:{port}",
                "--scheduler", self.scheduler_address,
                "--model", self.model,
                "--http-bind", f"{self.host}:{http_port}",
                *self.gateway_args,
            ],
            log_dir=self.log_dir,
            name=name,
            env=self.env,
        )  # fmt: skip

    def _spawn_worker(self) -> ServiceProcess:
        index = self._next_worker_index
        self._next_worker_index += 1
        proc = start_service(
            "worker",
            [
                "--bind", f"{self.host}:0",
                "--scheduler", self.scheduler_address,
                "--model", self.model,
                "--instance-id", f"worker-{index}",
                *self.worker_args,
            ],
            log_dir=self.log_dir,
            name=f"worker-{index}",
            env=self.env,
        )  # fmt: skip
        self.workers.append(proc)
        return proc

    def add_worker(self, wait: bool = True) -> ServiceProcess:
        """Start one more worker and (unless wait=False) wait until it is SERVING.

        Call it from a long-lived thread (see the module docstring), e.g. from the
        event loop of `asyncio.run` on the main thread, then `wait_ready` elsewhere."""
        proc = self._spawn_worker()
        if wait:
            proc.wait_ready(self.ready_timeout_s)
        return proc

    def live_workers(self) -> list[ServiceProcess]:
        return [w for w in self.workers if w.is_alive()]

    def stop(self, grace_s: float = 10.0) -> None:
        """Gateway first (no new work), then workers, then the scheduler."""
        if self.gateway is not None:
            stop_all([self.gateway], grace_s)
        stop_all([w for w in self.workers], grace_s)
        if self.scheduler is not None:
            stop_all([self.scheduler], grace_s)

    def __enter__(self) -> LocalMesh:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
