"""kvtransport: the data plane. KV-cache blocks and activations between workers.

    transport = make_transport(TransportConfig())         # UCX by default
    await transport.start()
    my_address = transport.address                         # bytes, share over gRPC
    handle = await transport.send(peer, "mig-7-stage-0", kv_blocks)        # TrafficClass.KV
    await handle.pause(); handle.resume(); await handle.cancel(); await handle.wait()
    tensors = await transport.recv("mig-7-stage-0", into=staging, timeout=5.0)
    await transport.close()

See docs/kvtransport.md for the protocol, the priority rules and UCX settings.
"""

from __future__ import annotations

import importlib

from kvtransport.base import ReceivedTransfer, Transport, TransportStats
from kvtransport.config import Backend, SchedulingPolicy, TransportConfig
from kvtransport.errors import (
    PeerUnreachable,
    TransferCancelled,
    TransferMismatch,
    TransferTimeout,
    TransportError,
)
from kvtransport.handles import SendHandle, TransferStatus
from kvtransport.traffic import TrafficClass

# Backend -> "module:class". Imported on use, so the TCP fallback works without ucxx.
TRANSPORTS: dict[Backend, str] = {
    Backend.UCX: "kvtransport.ucx:UcxTransport",
    Backend.TCP: "kvtransport.tcp:TcpTransport",
}


def make_transport(config: TransportConfig | None = None) -> Transport:
    """A transport for `config.backend` (not started yet: `await transport.start()`)."""
    config = config or TransportConfig()
    module_name, _, class_name = TRANSPORTS[config.backend].partition(":")
    transport_class = getattr(importlib.import_module(module_name), class_name)
    return transport_class(config)


__all__ = [
    "Backend",
    "PeerUnreachable",
    "ReceivedTransfer",
    "SchedulingPolicy",
    "SendHandle",
    "TrafficClass",
    "TransferCancelled",
    "TransferMismatch",
    "TransferStatus",
    "TransferTimeout",
    "Transport",
    "TransportConfig",
    "TransportError",
    "TransportStats",
    "make_transport",
]
