"""Typed errors of the transport layer (kept apart so every module can import them cycle-free)."""

from __future__ import annotations


class FrameError(ValueError):
    """A frame or fragment was refused; `reason` says why (safe to log: never payload bytes)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class TransportError(Exception):
    """Base class of the channel errors below."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class PeerLostError(TransportError):
    """The peer died, disconnected, closed the channel or went silent past the timeout."""


class HandshakeError(TransportError):
    """Bad swarm proof, bad identity signature, unexpected peer or wrong protocol version."""
