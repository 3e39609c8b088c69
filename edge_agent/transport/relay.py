"""A relay through a member, for peers nobody can dial (behind NAT, or at a site with no route).

Roles (docs/transport.md, "Relay"): a member R started with ``--relay`` runs a `RelayService` on
its TLS listener.  A peer P that cannot be dialled keeps a `Reservation` at R: one ordinary
authenticated TLS channel, over which R tells P when someone asks for it.  A client C that
cannot reach P directly calls `dial`: it opens an ordinary channel to R and asks for a circuit
to P; R asks P (over the reservation) to open a fresh connection for it, then splices the two
connections' byte streams.  C and P then run a complete TLS 1.3 handshake and our Ed25519 +
swarm handshake *inside* the spliced stream (TLS in TLS, `tls.over`), so R forwards ciphertext
only: it learns who talks to whom and how much, never what, and cannot alter it unnoticed.

Why this order of messages: a circuit's connection must switch from frames to raw bytes at
one exact point in each direction, with no heartbeat or frame of ours after it.  So each side
stops heartbeats (`TlsChannel.quiesce`) before its last frame, and the first raw byte can only
follow a frame the receiver has already parsed: P's GO is the last frame on its connection
and C's inner TLS ClientHello goes out only after R's OK, which R sends only after GO.

    P -> R  RESERVE                  (reservation channel)    R -> P  RESERVED | REFUSED
    C -> R  CONNECT <P's id>         (C's connection)         R -> P  INCOMING <token> (reservation)
    P -> R  ACCEPT <token>           (P's new connection)     R -> P  READY
    P -> R  GO, then raw             R -> C  OK, then raw     (or REFUSED <reason>)

Every message is a CONTROL frame ``MAGIC | op | body`` (body at most 64 bytes).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from dataclasses import dataclass
from typing import Any, Callable

from ..discovery.identity import Identity, SwarmKey
from . import tls
from .channel import ChannelHandler, hand_over
from .errors import PeerLostError, TransportError
from .frames import Frame, MsgType
from .splice import Splice

log = logging.getLogger(__name__)

MAGIC = b"EAR\x01"
RESERVE, RESERVED, CONNECT, INCOMING, ACCEPT, READY, GO, OK, REFUSED = range(1, 10)
MAX_BODY = 64
TOKEN_BYTES = 16
RELAY_KEY = "rl"  # capability record entry: id prefixes of the relays that hold a reservation for us
ID_PREFIX_HEX = 16
MAX_ADVERTISED = 2
RESERVE_RETRY_S = (1.0, 10.0)  # reconnect backoff of a lost reservation: from, to
DIRECT_TIMEOUT_S = 3.0  # a client's direct attempts when a relay is there to fall back on


@dataclass(frozen=True)
class RelayLimits:
    """What one relay member gives away; every bound holds with hostile members too."""

    max_reservations: int = 64  # peers reachable through this relay
    max_circuits: int = 32  # circuits open or being set up at once
    setup_timeout_s: float = 5.0  # CONNECT to spliced, and each wait of P's while setting up
    idle_timeout_s: float = 30.0  # a circuit with no byte either way this long is closed
    max_circuit_bytes: int = 8 << 30  # bytes forwarded per circuit (both ways); then it is closed


@dataclass
class RelayStats:
    reservations: int = 0
    circuits_opened: int = 0
    circuits_refused: int = 0
    bytes_forwarded: int = 0


def message(op: int, body: bytes = b"") -> Frame:
    return Frame.from_bytes(MsgType.CONTROL, MAGIC + bytes((op,)) + body)


def parse(frame: Frame) -> tuple[int, bytes] | None:
    """(op, body) of a relay message, None for any other frame (untrusted bytes: size first)."""
    payload = frame.payload
    if frame.type != MsgType.CONTROL or len(payload) < 5 or len(payload) > 5 + MAX_BODY or bytes(payload[:4]) != MAGIC:
        return None
    return payload[4], bytes(payload[5:])


async def _expect(channel: Any, op: int, timeout: float) -> bytes:
    """The body of the next relay message if it is `op`; PeerLostError with R's reason if not."""
    try:
        msg = parse(await asyncio.wait_for(channel.recv(), timeout))
    except asyncio.TimeoutError:
        raise PeerLostError(f"relay: no answer in {timeout:.0f} s") from None
    if msg is None:
        raise PeerLostError("relay: not a relay message (is that member started with --relay?)")
    if msg[0] == REFUSED:
        raise PeerLostError("relay refused: " + msg[1].decode("utf-8", "replace"))
    if msg[0] != op:
        raise PeerLostError(f"relay: unexpected message {msg[0]}")
    return msg[1]


def advertised(extra: tuple[tuple[str, str], ...]) -> list[str]:
    """The relay id prefixes in a capability record's extra entries (malformed ones ignored)."""
    value = dict(extra).get(RELAY_KEY, "")
    return [p for p in value.split(",")[:MAX_ADVERTISED]
            if len(p) == ID_PREFIX_HEX and all(c in "0123456789abcdef" for c in p)]


def routes(table: Any, caps: Any) -> list[tuple[str, str, int]]:
    """(relay id, host, port) to try for the peer `caps`: each relay it advertises that is a
    member we know with a TLS address (the relay's own signed record says where it is)."""
    out = []
    for prefix in advertised(caps.extra):
        for entry in table.peers():
            if entry.agent_id.startswith(prefix) and entry.agent_id != caps.agent_id and entry.caps.tls_port:
                out += [(entry.agent_id, host, entry.caps.tls_port) for host in entry.addresses]
    return out


# -- the relay member (R) ------------------------------------------------------------------

class RelayService:
    """Reservations and circuits on a member's TLS listener: `wrap(handler)` answers relay
    messages and passes every other frame to `handler`'s channel as before."""

    def __init__(self, limits: RelayLimits = RelayLimits()) -> None:
        self.limits = limits
        self.stats = RelayStats()
        self.circuits: set[Splice] = set()
        self._reservations: dict[str, Any] = {}
        self._pending: dict[bytes, tuple[str, asyncio.Future[Any]]] = {}

    def wrap(self, handler: ChannelHandler) -> ChannelHandler:
        async def on_channel(channel: Any) -> None:
            res = handler(_RelayingChannel(channel, self))
            if asyncio.iscoroutine(res):
                await res
        return on_channel

    async def close(self) -> None:
        for circuit in list(self.circuits):
            circuit.close("relay closing")
        for _, fut in self._pending.values():
            if not fut.done():
                fut.set_exception(PeerLostError("relay closing"))

    def _carried(self, n: int) -> None:
        self.stats.bytes_forwarded += n

    async def handle(self, channel: Any, op: int, body: bytes) -> None:
        if op == RESERVE:
            await self._reserve(channel)
        elif op == CONNECT:
            await self._connect(channel, body)
        elif op == ACCEPT:
            await self._accept(channel, body)
        else:
            await channel.send(message(REFUSED, b"unexpected message"))

    async def _refuse(self, channel: Any, reason: str) -> None:
        self.stats.circuits_refused += 1
        log.info("relay: refused %s: %s", channel.peer_id[:12], reason)
        await channel.send(message(REFUSED, reason.encode()[:MAX_BODY]))

    async def _reserve(self, channel: Any) -> None:
        peer = channel.peer_id
        if peer not in self._reservations and len(self._reservations) >= self.limits.max_reservations:
            await self._refuse(channel, "relay full: no reservation left")
            return
        self._reservations[peer] = channel  # a newer reservation of the same peer replaces the old one

        def lost(_exc: PeerLostError) -> None:
            if self._reservations.get(peer) is channel:
                del self._reservations[peer]

        channel.add_lost_callback(lost)
        self.stats.reservations += 1
        await channel.send(message(RESERVED))

    async def _connect(self, channel: Any, body: bytes) -> None:
        target = body.hex()
        reservation = self._reservations.get(target)
        if len(body) != 32 or reservation is None:
            await self._refuse(channel, "no reservation for that peer here")
            return
        if target == channel.peer_id:
            await self._refuse(channel, "a circuit to yourself")
            return
        if len(self.circuits) + len(self._pending) >= self.limits.max_circuits:
            await self._refuse(channel, "relay busy: too many circuits")
            return
        channel.quiesce()  # C sends nothing more until OK; our heartbeats must not follow OK either
        token = os.urandom(TOKEN_BYTES)
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[token] = (target, fut)
        try:
            await reservation.send(message(INCOMING, token))
            target_channel = await asyncio.wait_for(fut, self.limits.setup_timeout_s)
        except (asyncio.TimeoutError, PeerLostError):
            await self._refuse(channel, "the peer did not answer in time")
            await channel.close()
            return
        finally:
            self._pending.pop(token, None)
        try:
            c_transport, c_rest = channel.detach(message(OK))
        except PeerLostError:  # C went away meanwhile
            await target_channel.close()
            return
        p_transport, p_rest = target_channel.detach()
        self.circuits.add(Splice((c_transport, c_rest), (p_transport, p_rest), max_bytes=self.limits.max_circuit_bytes,
                                 idle_timeout_s=self.limits.idle_timeout_s, on_bytes=self._carried,
                                 on_close=self.circuits.discard))
        self.stats.circuits_opened += 1
        log.info("relay: circuit %s -> %s", channel.peer_id[:12], target[:12])

    async def _accept(self, channel: Any, token: bytes) -> None:
        pending = self._pending.get(token)
        if pending is None or pending[0] != channel.peer_id:
            await self._refuse(channel, "no such circuit")
            return
        fut = pending[1]
        channel.quiesce()
        await channel.send(message(READY))
        try:
            await _expect(channel, GO, self.limits.setup_timeout_s)
        except (PeerLostError, asyncio.TimeoutError):
            if not fut.done():
                fut.set_exception(PeerLostError("the peer did not finish setting up"))
            await channel.close()
            return
        if fut.done():  # C gave up meanwhile
            await channel.close()
        else:
            fut.set_result(channel)


class _RelayingChannel:
    """What the hop server sees of a listener channel: relay messages are answered here and
    never reach it; everything else is the channel's own."""

    def __init__(self, channel: Any, relay: RelayService) -> None:
        self._channel = channel
        self._relay = relay

    def __getattr__(self, name: str) -> Any:
        return getattr(self._channel, name)

    async def recv(self) -> Frame:
        while True:
            frame = await self._channel.recv()
            msg = parse(frame)
            if msg is None:
                return frame
            await self._relay.handle(self._channel, *msg)


# -- the unreachable peer (P) --------------------------------------------------------------

class Reservation:
    """Keeps a reservation at the relay at host:port (reconnecting with backoff) and accepts the
    circuits it announces: each becomes an authenticated channel handed to `on_channel`, as the
    TLS listener would.  `on_change()` runs when the reservation comes up or goes down."""

    def __init__(self, identity: Identity, swarm: SwarmKey, host: str, port: int, on_channel: ChannelHandler,
                 on_change: Callable[[], None] = lambda: None, *, max_setups: int = 8, **channel_kw: Any) -> None:
        self.identity, self.swarm, self.host, self.port = identity, swarm, host, port
        self.on_channel, self.on_change = on_channel, on_change
        self.relay_id: str | None = None  # learned from the relay's handshake
        self.active = False
        self.channels: set[Any] = set()
        self._max_setups = max_setups
        self._setups: set[asyncio.Task[None]] = set()  # circuits being set up
        self._serving: set[asyncio.Task[None]] = set()  # circuits handed to on_channel
        self._channel_kw = channel_kw
        self._warned = False
        self._task: asyncio.Task[None] | None = None
        self._reserved = asyncio.Event()

    async def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def wait_reserved(self, timeout: float) -> bool:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._reserved.wait(), timeout)
        return self.active

    async def close(self) -> None:
        tasks = [t for t in (self._task, *self._setups, *self._serving) if t is not None]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for ch in list(self.channels):
            await ch.close()

    async def _run(self) -> None:
        delay = RESERVE_RETRY_S[0]
        while True:
            try:
                ch = await tls.connect(self.identity, self.swarm, self.host, self.port, expect_peer_id=self.relay_id)
                try:
                    await ch.send(message(RESERVE))
                    await _expect(ch, RESERVED, 5.0)
                    self.relay_id, self.active, delay = ch.peer_id, True, RESERVE_RETRY_S[0]
                    self._reserved.set()
                    self.on_change()
                    log.info("relay: reserved at %s:%d (%s)", self.host, self.port, ch.peer_id[:12])
                    while True:
                        msg = parse(await ch.recv())
                        if msg is not None and msg[0] == INCOMING and len(self._setups) < self._max_setups:
                            task = asyncio.get_running_loop().create_task(self._accept(msg[1]))
                            self._setups.add(task)
                            task.add_done_callback(self._setups.discard)
                finally:
                    await ch.close()
            except (TransportError, asyncio.TimeoutError, OSError) as exc:  # unreachable, refused, not that relay
                (log.info if self._warned else log.warning)("relay: no reservation at %s:%d (retrying): %s",
                                                            self.host, self.port, exc)
                self._warned = True
            if self.active:
                self.active = False
                self.on_change()
            await asyncio.sleep(delay)
            delay = min(delay * 2, RESERVE_RETRY_S[1])

    async def _accept(self, token: bytes) -> None:
        try:
            ch = await tls.connect(self.identity, self.swarm, self.host, self.port, expect_peer_id=self.relay_id,
                                   timeout=5.0)
            try:
                ch.quiesce()
                await ch.send(message(ACCEPT, token))
                await _expect(ch, READY, 5.0)
                transport, rest = ch.detach(message(GO))
            except BaseException:
                await ch.close()
                raise
            if rest:  # nothing may follow READY before our GO: a relay that sends it is broken or hostile
                transport.abort()
                raise PeerLostError("relay sent data out of turn")
            inner = await tls.over(transport, self.identity, self.swarm, server_side=True, timeout=5.0, **self._channel_kw)
        except (TransportError, asyncio.TimeoutError, OSError) as exc:  # incl. a stranger inside the circuit
            log.info("relay: a circuit through %s:%d failed: %s", self.host, self.port, exc)
            return
        inner.via_relay = self.relay_id
        task = asyncio.get_running_loop().create_task(hand_over(inner, self.channels, self.on_channel))
        self._serving.add(task)
        task.add_done_callback(self._serving.discard)


# -- the client (C) ------------------------------------------------------------------------

async def dial(identity: Identity, swarm: SwarmKey, host: str, port: int, relay_id: str, target_id: str, *,
               timeout: float = 5.0, **channel_kw: Any) -> tls.TlsChannel:
    """An authenticated channel to `target_id` through the relay member at host:port (whose id
    is `relay_id`): end-to-end TLS and handshake, so it is as good as `tls.connect`'s."""
    outer = await tls.connect(identity, swarm, host, port, expect_peer_id=relay_id, timeout=timeout)
    try:
        outer.quiesce()
        await outer.send(message(CONNECT, bytes.fromhex(target_id)))
        await _expect(outer, OK, RelayLimits.setup_timeout_s + timeout)
        transport, rest = outer.detach()
    except BaseException:
        await outer.close()
        raise
    if rest:  # the peer speaks only after our ClientHello
        transport.abort()
        raise PeerLostError("relay sent data out of turn")
    inner = await tls.over(transport, identity, swarm, server_side=False, expect_peer_id=target_id, timeout=timeout,
                           **channel_kw)
    inner.via_relay = relay_id
    return inner



def with_relays(caps: Any, reservations: list[Reservation], n: int = MAX_ADVERTISED) -> Any:
    """`caps` (unsealed) naming up to `n` relays that hold a live reservation for us (RELAY_KEY)."""
    ids = list(dict.fromkeys(r.relay_id[:ID_PREFIX_HEX] for r in reservations if r.active and r.relay_id))[:n]
    extra = tuple((k, v) for k, v in caps.extra if k != RELAY_KEY)
    return caps.with_changes(extra=extra + (((RELAY_KEY, ",".join(ids)),) if ids else ()))
