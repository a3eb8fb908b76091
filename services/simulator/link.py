"""A KunServe group member's outgoing link (groups.py): activations first, KV after.

    time  ──────────────────────────────────────────────────────────────>
    link  | KV piece ...... | activation | ...... KV piece (resumed) | next piece
                            ^ paused here, the rest goes once the activation is out

A piece's bytes already sent are counted when an activation pauses it; activations on
one link queue behind each other.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from services.simulator.loop import EventLoop


@dataclass
class _Piece:
    """KV bytes of one request on one link."""

    nbytes: float
    on_done: Callable[[], None]
    started_s: float = 0.0


class Link:
    """A member's outgoing link: activations go first; KV pieces queue (FIFO) and send
    in the time activations leave, pausing while one is sent."""

    def __init__(self, loop: EventLoop, bandwidth_bytes_per_s: float) -> None:
        self.loop = loop
        self.bandwidth = bandwidth_bytes_per_s
        self.pieces: deque[_Piece] = deque()
        self.activation_until = 0.0
        self._version = 0

    def send_kv(self, nbytes: float, on_done: Callable[[], None]) -> None:
        self.pieces.append(_Piece(nbytes, on_done))
        if len(self.pieces) == 1:
            self._resume()

    def send_activation(self, nbytes: float) -> float:
        """Sends at once (after earlier activations); returns seconds until it arrived."""
        now = self.loop.now
        if self.pieces:  # pause the piece being sent: count what went out so far
            head = self.pieces[0]
            head.nbytes = max(0.0, head.nbytes - max(0.0, now - head.started_s) * self.bandwidth)
        self.activation_until = max(now, self.activation_until) + nbytes / self.bandwidth
        if self.pieces:
            self._resume()
        return self.activation_until - now

    def _resume(self) -> None:
        head = self.pieces[0]
        head.started_s = max(self.loop.now, self.activation_until)
        self._version += 1
        self.loop.at(head.started_s + head.nbytes / self.bandwidth, self._done, self._version)

    def _done(self, version: int) -> None:
        if version != self._version:
            return  # rescheduled by an activation
        piece = self.pieces.popleft()
        if self.pieces:
            self._resume()
        piece.on_done()
