"""Provisioners: how the auto-scaler gets and gives back worker instances.

The scaling loop (autoscale.py) decides *how many*; a provisioner makes it so.

    start(count) -> [instance_id]   begin starting workers; they count as *pending*
                                    until they register with the scheduler
    pending(registered) -> [id]     started, not registered yet, still alive
    owns(instance_id)               may this provisioner stop it (scale-down victims
                                    are chosen among owned instances only)
    stop(instance_id)               stop a (drained) worker; returns once it exited
    close()                         stop everything it started (scheduler shutdown)

`LocalProcessProvisioner` starts `python -m services.worker` processes on this machine
with the same launcher as `llmesh up` (services/common/procs.py): each gets its own
session and dies with the scheduler (PR_SET_PDEATHSIG), so none outlives it. A cloud or
Kubernetes provisioner would implement the same five methods.
"""

from __future__ import annotations

import asyncio
import shlex
import tempfile
from collections.abc import Collection
from pathlib import Path

from services.common.config import ConfigError
from services.common.logging import get_logger
from services.common.procs import ServiceProcess, start_service

log = get_logger(__name__)


class Provisioner:
    """Base class; see the module docstring."""

    name = "base"

    def start(self, count: int) -> list[str]:
        raise NotImplementedError

    def pending(self, registered: Collection[str]) -> list[str]:
        raise NotImplementedError

    def owns(self, instance_id: str) -> bool:
        raise NotImplementedError

    async def stop(self, instance_id: str) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError


class LocalProcessProvisioner(Provisioner):
    """Worker processes on this machine, named `<prefix><n>` (auto-0, auto-1, ...)."""

    name = "local"

    def __init__(
        self,
        scheduler_address: str,
        *,
        model: str = "tiny",
        host: str = "127.0.0.1",
        worker_args: str = "",
        log_dir: str | Path = "",
        id_prefix: str = "auto-",
        grace_s: float = 10.0,
    ) -> None:
        self.scheduler_address = scheduler_address
        self.model = model
        self.host = host
        self.worker_args = shlex.split(worker_args)
        self.log_dir = Path(log_dir or tempfile.mkdtemp(prefix="llmesh-workers-"))
        self.id_prefix = id_prefix
        self.grace_s = grace_s
        self._processes: dict[str, ServiceProcess] = {}
        self._ever_registered: set[str] = set()
        self._next_index = 0

    def start(self, count: int) -> list[str]:
        # Started from the event loop's (main) thread on purpose: PR_SET_PDEATHSIG
        # fires when the *thread* that forked the child exits.
        started = []
        for _ in range(count):
            instance_id = f"{self.id_prefix}{self._next_index}"
            self._next_index += 1
            self._processes[instance_id] = start_service(
                "worker",
                [
                    "--bind", f"{self.host}:0",
                    "--scheduler", self.scheduler_address,
                    "--model", self.model,
                    "--instance-id", instance_id,
                    *self.worker_args,
                ],
                log_dir=self.log_dir,
                name=instance_id,
            )  # fmt: skip
            started.append(instance_id)
            log.info(
                "worker_starting",
                instance_id=instance_id,
                pid=self._processes[instance_id].pid,
                log=str(self._processes[instance_id].log_path),
            )
        return started

    def pending(self, registered: Collection[str]) -> list[str]:
        self._ever_registered.update(i for i in registered if i in self._processes)
        waiting = []
        for instance_id, proc in list(self._processes.items()):
            if instance_id in self._ever_registered:
                if not proc.is_alive():
                    # Died after serving: the lease expiry drops it from the registry.
                    log.warning(
                        "worker_exited", instance_id=instance_id, code=proc.popen.returncode
                    )
                    del self._processes[instance_id]
                continue
            if proc.is_alive():
                waiting.append(instance_id)
            else:
                log.error(
                    "worker_start_failed",
                    instance_id=instance_id,
                    code=proc.popen.returncode,
                    log_tail=proc.log_tail(10),
                )
                del self._processes[instance_id]
        return waiting

    def owns(self, instance_id: str) -> bool:
        return instance_id in self._processes

    def pid(self, instance_id: str) -> int | None:
        proc = self._processes.get(instance_id)
        return proc.pid if proc is not None else None

    async def stop(self, instance_id: str) -> None:
        proc = self._processes.pop(instance_id, None)
        if proc is None:
            return
        proc.signal_stop()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.grace_s
        while proc.is_alive() and loop.time() < deadline:
            await asyncio.sleep(0.05)
        if proc.is_alive():
            log.warning("worker_stop_timeout", instance_id=instance_id, grace_s=self.grace_s)
            proc.kill()
        log.info("worker_stopped", instance_id=instance_id, code=proc.popen.returncode)

    async def close(self) -> None:
        await asyncio.gather(*(self.stop(i) for i in list(self._processes)))


def make_provisioner(name: str, scheduler_address: str, **kwargs) -> Provisioner:
    if name == "local":
        return LocalProcessProvisioner(scheduler_address, **kwargs)
    raise ConfigError(f"provisioner {name!r} is not one of ['local']")
