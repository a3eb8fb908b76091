"""Layer weights between members at a restore: each member sends the layers it kept to
every other member, as one KV-class transfer of its tensors (names in the metadata).
The bytes are the ones it loaded, so the restored weights are bit-identical."""

from __future__ import annotations

import json

import torch

from kvtransport import TrafficClass, Transport


async def send_weights(
    transport: Transport, peer: bytes, transfer_id: str, tensors: dict[str, torch.Tensor]
) -> None:
    names = sorted(tensors)
    handle = await transport.send(
        peer,
        transfer_id,
        [tensors[name].contiguous() for name in names],
        TrafficClass.KV,
        {"names": json.dumps(names)},
    )
    await handle.wait()


async def receive_weights(
    transport: Transport, transfer_id: str, timeout_s: float
) -> dict[str, torch.Tensor]:
    """{HF name: tensor} (copies: the receive buffer goes back to the pool)."""
    received = await transport.recv_transfer(transfer_id, timeout=timeout_s)
    try:
        names = json.loads(received.metadata["names"])
        if len(names) != len(received.tensors):
            raise ValueError(f"{transfer_id}: {len(names)} names for {len(received.tensors)}")
        return {name: t.clone() for name, t in zip(names, received.tensors, strict=True)}
    finally:
        transport.release(received.tensors)
