"""Helpers for the membership and DHT tests (and bench/membership.py): signed member records,
fuzzing a bounded codec, and members on loopback over real TLS channels, in one process."""

from __future__ import annotations

from typing import Any, Callable, Sequence

from hypothesis import strategies as st

from edge_agent.discovery.capabilities import Capabilities
from edge_agent.discovery.identity import Identity, SwarmKey
from edge_agent.discovery.membership import DEFAULT_INTERVAL_S, Membership
from edge_agent.discovery.membership_wire import MemberRecord
from edge_agent.discovery.peers import DEFAULT_STALE_AFTER_S, PeerTable
from edge_agent.transport import PeerLostError, tls

MODEL = "0123456789abcdef"


def sealed(identity: Identity, swarm: SwarmKey, *, port: int = 4000, layers: tuple[int, int] = (0, 12),
           extra: tuple[tuple[str, str], ...] = ()) -> Capabilities:
    """`identity`'s capability record serving `layers` of MODEL, sealed for `swarm`."""
    return Capabilities(identity.agent_id, tls_port=port, shards=((MODEL, *layers),), extra=extra).sealed(identity, swarm)


def record(swarm: SwarmKey, *, layers: tuple[int, int] = (0, 12), counter: int = 5,
           addresses: Sequence[str] = ("10.0.0.1",), identity: Identity | None = None) -> MemberRecord:
    """A member record as its owner signs it (a new identity unless one is given)."""
    ident = identity or Identity.generate()
    return MemberRecord.signed(ident, sealed(ident, swarm, layers=layers), counter, tuple(addresses))


# -- fuzzing a bounded codec -----------------------------------------------------------------

def decode_or_refuse(decode: Callable[[bytes], Any], error: type[Exception], raw: bytes) -> Any | None:
    """What `decode` makes of untrusted bytes: a message, or None where it refused them with
    `error`; any other exception fails the test."""
    try:
        return decode(raw)
    except error:
        return None


def mutated(raw: bytes, data: st.DataObject) -> bytes:
    """`raw` with 1 to 4 of its bytes overwritten, as hypothesis draws them."""
    out = bytearray(raw)
    for _ in range(data.draw(st.integers(1, 4))):
        out[data.draw(st.integers(0, len(out) - 1))] = data.draw(st.integers(0, 255))
    return bytes(out)


# -- members on loopback ---------------------------------------------------------------------

class LoopbackMember:
    """A member's discovery half: an identity, a peer table and `Membership` over real TLS.
    `listen` opens its listener (membership and DHT messages are answered there, every other
    frame goes to `handler`) and advertises its record; rounds run only once `start`ed."""

    def __init__(self, swarm: SwarmKey, bootstrap: Sequence[tuple[str, int]] = (), *,
                 interval_s: float = DEFAULT_INTERVAL_S, stale_after_s: float = DEFAULT_STALE_AFTER_S) -> None:
        self.identity = Identity.generate()
        self.swarm = swarm
        self.table = PeerTable(swarm, self_id=self.identity.agent_id, stale_after_s=stale_after_s)
        self.membership = Membership(self.identity, swarm, self.table, self.connect, bootstrap=bootstrap,
                                     interval_s=interval_s)
        self.server: Any = None

    async def connect(self, host: str, port: int, expect: str | None) -> Any:
        return await tls.connect(self.identity, self.swarm, host, port, expect_peer_id=expect)

    async def handler(self, channel: Any) -> None:
        """Stands in for the hop server: takes (and drops) every frame membership passes on."""
        while True:
            try:
                await channel.recv()
            except PeerLostError:
                return

    async def listen(self, layers: tuple[int, int] = (0, 12), *, port: int = 0,
                     extra: tuple[tuple[str, str], ...] = ()) -> None:
        self.server = await tls.listen(self.identity, self.swarm, "127.0.0.1", port, self.membership.wrap(self.handler))
        caps = sealed(self.identity, self.swarm, port=self.server.port, layers=layers, extra=extra)
        self.membership.advertise(caps, ["127.0.0.1"])

    @property
    def address(self) -> tuple[str, int]:
        return "127.0.0.1", self.server.port

    @property
    def agent_id(self) -> str:
        return self.identity.agent_id

    async def stop(self) -> None:
        await self.membership.close()
        await self.table.close()
        if self.server is not None:
            await self.server.close()
