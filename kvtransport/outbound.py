"""Outbound: one transfer in a peer's send queue, and its messages (made as issued)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import numpy as np
import torch

from kvtransport.chunks import ChunkPlan
from kvtransport.fabric import ChunkOut, ControlOut, OutMessage
from kvtransport.handles import SendHandle
from kvtransport.traffic import TrafficClass
from kvtransport.wire import RechunkTransfer


class TransferMessages:
    """messages[0] is the header, messages[p] the chunk at position p of `plan`; each
    chunk message (a view of the source bytes) is made when it is issued."""

    def __init__(
        self,
        header: ControlOut,
        key: int,
        plan: ChunkPlan,
        views: list[np.ndarray],
        traffic_class: TrafficClass,
    ) -> None:
        self.header = header
        self.plan = plan
        self._key = key
        self._views = views  # one flat uint8 view per source tensor
        self._traffic_class = traffic_class

    def __len__(self) -> int:
        return 1 + self.plan.num_chunks

    def __getitem__(self, index: int) -> OutMessage:
        if index == 0:
            return self.header
        chunk = self.plan.chunk(index)
        view = self._views[chunk.tensor_index][chunk.offset : chunk.offset + chunk.nbytes]
        return ChunkOut(self._key, chunk.seq, view, self._traffic_class)


@dataclass(eq=False)
class Outbound:
    """One transfer in a peer's send queue: messages[0] is its header, then chunks."""

    handle: SendHandle
    key: int
    messages: TransferMessages
    tensors: list[torch.Tensor]  # keeps the source memory alive while views are in flight
    next_index: int = 0
    num_in_flight: int = 0
    is_paused: bool = False
    is_cancelling: bool = False
    idle: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def has_next(self) -> bool:
        return self.next_index < len(self.messages)

    @property
    def num_chunks_issued(self) -> int:
        return max(0, self.next_index - 1)

    @property
    def is_issuable(self) -> bool:
        return (
            self.has_next
            and not self.is_paused
            and not self.is_cancelling
            and not self.handle.is_finished
        )

    def rechunk(self, chunk_bytes: int) -> RechunkTransfer | None:
        """Cut the chunks not issued yet every `chunk_bytes` if they are larger; returns
        what tells the receiver, or None when nothing changed."""
        plan = self.messages.plan
        if (
            self.next_index == 0  # the header (with the old plan) is not out yet
            or not 0 < chunk_bytes < plan.chunk_bytes
            or not plan.can_rechunk(self.num_chunks_issued, chunk_bytes)
        ):
            return None
        plan.rechunk(self.num_chunks_issued, chunk_bytes)
        return RechunkTransfer(
            self.handle.transfer_id, self.key, self.num_chunks_issued, chunk_bytes
        )
