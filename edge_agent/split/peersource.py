"""What the split client needs from whoever knows the swarm: the ``PeerSource`` interface
(``directory.PeerDirectory`` implements it on a running agent; tests and the simulation bring
their own), and the peers it must not route to (``IncompatiblePeer``)."""

from __future__ import annotations

from typing import NamedTuple, Protocol

from edge_agent.split.links import PeerLink
from edge_agent.split.planner import PeerCapability


class IncompatiblePeer(NamedTuple):
    """A peer that serves the model but would change the arithmetic (never routed to)."""

    peer_id: str
    ranges: tuple[tuple[int, int], ...]
    reason: str  # e.g. "flash_attn on on the peer, off on this device"


class PeerSource(Protocol):
    """Who is out there and how to reach them (discovery + transport, wired in node.py)."""

    def capabilities(self) -> list[PeerCapability]: ...  # peers the client may route to

    def incompatible(self) -> list[IncompatiblePeer]: ...

    def speculates(self, peer_id: str) -> bool: ...  # it advertises speculative steps (REWIND, DRAFT)

    def on_probation(self, peer_id: str) -> bool: ...  # neither stake nor history (split.needs.ProbationQuota)

    async def link(self, peer_id: str) -> PeerLink: ...

    def address(self, peer_id: str) -> tuple[str, int]: ...  # TLS host, port (chain forwarding)
