"""Hosts made of Linux network namespaces: a head and N workers on one bridge.

    with NetnsHosts.create(["head", "w1", "w2"]) as hosts:   # root only
        hosts.address("w1")            # 10.213.K.3: that host's IP on the "LAN"
        hosts.exec_prefix("w1")        # ["ip", "netns", "exec", NS]: run a command there
        hosts.tx_bytes("w1")           # bytes that host sent over its link

Each host is a namespace with one veth pair to a bridge in the root namespace (which
gets the subnet's .1, so this process reaches every host); each host's end is `eth0`.
Traffic between hosts crosses two veths and the bridge, and nothing else: no loopback
shortcut, so what the counters show is what went over the "network". A rate limit
(`tc tbf` on every host's egress, e.g. 10 Gb/s) shapes the links. Names carry a
per-run random tag, and `close()` (also on any failure, and by the context manager)
deletes the namespaces (which deletes their veths) and the bridge.

Namespaces share the IPC namespace and the PID space with the root: UCX would see one
machine and use shared memory, so UCX processes here run with UCX_TLS=tcp (the test
sets it in the env files it gives the compose files).
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

DEVICE = "eth0"  # every host's interface, as UCX_NET_DEVICES names it


class NetnsUnavailable(RuntimeError):
    """This machine cannot create network namespaces (not root, no `ip`); says why."""


def unavailable_reason() -> str | None:
    """Why namespaces cannot be made here, or None when they can."""
    if os.geteuid() != 0:
        return "needs root (ip netns)"
    if shutil.which("ip") is None:
        return "needs iproute2's `ip`"
    if not Path("/var/run/netns").exists() and not os.access("/var/run", os.W_OK):
        return "cannot create /var/run/netns"
    return None


def _ip(*args: str) -> None:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if result.returncode != 0:
        raise NetnsUnavailable(f"ip {' '.join(args)}: {result.stderr.strip()}")


def _free_subnet() -> int:
    """A third octet K such that 10.213.K.0/24 is not routed here yet."""
    routes = subprocess.run(["ip", "-4", "route"], capture_output=True, text=True).stdout
    taken = {line.split(".")[2] for line in routes.splitlines() if line.startswith("10.213.")}
    choices = [k for k in range(1, 255) if str(k) not in taken]
    if not choices:
        raise NetnsUnavailable("no free 10.213.K.0/24 subnet")
    return random.choice(choices)


@dataclass
class NetnsHosts:
    tag: str
    subnet: int
    hosts: list[str]
    rate: str | None = None
    _created_namespaces: list[str] = field(default_factory=list)
    _bridge_created: bool = False

    @classmethod
    def create(cls, hosts: list[str], rate: str | None = None) -> NetnsHosts:
        """Make the bridge and one namespace per host; `rate` (e.g. "10gbit") shapes
        every host's egress with tc tbf. Cleans up what it made if a step fails."""
        reason = unavailable_reason()
        if reason:
            raise NetnsUnavailable(reason)
        self = cls(
            f"{os.getpid() % 10000}{random.randrange(1000):03d}", _free_subnet(), hosts, rate
        )
        try:
            self._setup()
        except BaseException:
            self.close()
            raise
        return self

    @property
    def bridge(self) -> str:
        return f"llbr{self.tag}"

    def namespace(self, host: str) -> str:
        return f"llmesh-{self.tag}-{host}"

    def _host_veth(self, host: str) -> str:
        return f"llv{self.tag}{self.hosts.index(host)}"  # <= 15 characters

    def address(self, host: str) -> str:
        return f"10.213.{self.subnet}.{self.hosts.index(host) + 2}"

    @property
    def gateway_ip(self) -> str:
        """The root namespace's address on the bridge (this process)."""
        return f"10.213.{self.subnet}.1"

    def _setup(self) -> None:
        _ip("link", "add", self.bridge, "type", "bridge")
        self._bridge_created = True
        _ip("addr", "add", f"{self.gateway_ip}/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        for host in self.hosts:
            ns = self.namespace(host)
            _ip("netns", "add", ns)
            self._created_namespaces.append(ns)
            veth = self._host_veth(host)
            _ip("link", "add", veth, "type", "veth", "peer", "name", DEVICE, "netns", ns)
            _ip("link", "set", veth, "master", self.bridge, "up")
            _ip("-n", ns, "addr", "add", f"{self.address(host)}/24", "dev", DEVICE)
            _ip("-n", ns, "link", "set", DEVICE, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
            if self.rate:
                self._shape(ns)

    def _shape(self, ns: str) -> None:
        result = subprocess.run(
            ["ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", DEVICE, "root", "tbf",
             "rate", self.rate, "burst", "4mb", "latency", "50ms"],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        if result.returncode != 0:
            raise NetnsUnavailable(f"tc tbf {self.rate}: {result.stderr.strip()}")

    def exec_prefix(self, host: str) -> list[str]:
        return ["ip", "netns", "exec", self.namespace(host)]

    def _counter(self, host: str, name: str) -> int:
        # The root-side end of the host's veth: its rx is what the host sent.
        path = Path("/sys/class/net") / self._host_veth(host) / "statistics" / name
        return int(path.read_text())

    def tx_bytes(self, host: str) -> int:
        """Bytes the host has sent over its link so far."""
        return self._counter(host, "rx_bytes")

    def rx_bytes(self, host: str) -> int:
        """Bytes the host has received over its link so far."""
        return self._counter(host, "tx_bytes")

    def close(self) -> None:
        """Delete every namespace (their veths go with them) and the bridge. Idempotent."""
        while self._created_namespaces:
            ns = self._created_namespaces.pop()
            with contextlib.suppress(NetnsUnavailable):
                _ip("netns", "delete", ns)
        if self._bridge_created:
            self._bridge_created = False
            with contextlib.suppress(NetnsUnavailable):
                _ip("link", "delete", self.bridge)

    def __enter__(self) -> NetnsHosts:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
