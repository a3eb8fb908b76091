"""Errors raised by the data plane. Every failure a caller can see is a TransportError."""

from __future__ import annotations


class TransportError(Exception):
    """Base class for every data-plane failure."""


class TransferTimeout(TransportError):
    """A deadline passed: a receive that saw no data, or a send the peer never took.

    The peer may still be alive; the transfer is abandoned either way.
    """


class TransferCancelled(TransportError):
    """The transfer was cancelled, by this side or by the peer (the message says which)."""


class PeerUnreachable(TransportError):
    """The peer is gone: its connection failed, or the control plane declared it dead."""


class TransferMismatch(TransportError):
    """The buffers given to `recv(into=...)` do not match what the sender announced."""
