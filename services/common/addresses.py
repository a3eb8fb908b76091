"""Advertised addresses: what a service tells its peers, as opposed to what it binds.

A service binds `host:port` (often `0.0.0.0:port` in a container) but peers on other
hosts must be told an address they can reach: a worker's Worker API (registered with
the scheduler), a gateway's OutputSink (given to workers with each request), a TCP data
plane's listener. An explicit advertise address always wins (a worker behind NAT or in
a container announces its host's address); without one, a wildcard bind advertises
this host's name, which every container runtime and every LAN with DNS resolves.
"""

from __future__ import annotations

import socket

WILDCARD_HOSTS = frozenset({"", "0.0.0.0", "::", "[::]", "*"})


def split_host_port(address: str) -> tuple[str, str]:
    """`host:port` (IPv6 hosts in brackets) as (host, port); port may be empty."""
    host, _, port = address.rpartition(":")
    return host, port


def is_wildcard(host: str) -> bool:
    return host in WILDCARD_HOSTS


def advertised_address(bound: str, advertise: str = "") -> str:
    """The address peers should use for a server bound at `bound` (`host:port`, the port
    the OS chose filled in): `advertise` when set, else `bound` with a wildcard host
    replaced by this host's name."""
    if advertise:
        return advertise
    host, port = split_host_port(bound)
    if is_wildcard(host):
        return f"{socket.gethostname()}:{port}"
    return bound
