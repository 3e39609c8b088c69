"""Membership beyond one LAN: join through ``--bootstrap HOST:PORT``, then gossip.

mDNS ends at the multicast segment.  Here an agent that reaches one member over the
existing TLS transport learns the others, and keeps learning them after that member is
gone: every round it runs a push-pull exchange (`membership_wire`: SYN with a digest of what
it holds, ACK with the news it lacks and the peer's digest, PUSH with the peer's news) with a
few members picked at random.  Why this and not a peer-to-peer engine: docs/discovery.md
("Beyond one LAN") has the measurements.

Trust: a record enters the peer table only when both of its owner's signatures verify
and its swarm MAC matches (`MemberRecord.verify`); relays are never trusted.  Exchanges
run only over channels whose handshake proved the swarm key, so a private swarm's
records never leave it and an outsider learns nothing.  Liveness is clock-free: each
member bumps a signed counter every round, and a receiver notes on its own clock when it
last saw the counter grow (`PeerTable.stale_after_s` then expires a silent member).  An
expired member's counter is remembered for `FORGET_AFTER_S`, so a slow relay cannot bring
it back.  Everything is bounded: records per message, members known, targets per round.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Sequence

from edge_agent.discovery.capabilities import Capabilities
from edge_agent.discovery.identity import Identity, SwarmKey
from edge_agent.discovery.membership_wire import (ACK, MAX_ADDRESSES, MAX_DIGEST, MAX_ENTRIES, PUSH, SYN, Beat, Digest,
                                                  MemberRecord, MembershipDecodeError, Message, check_addresses, decode,
                                                  encode, is_membership_message)
from edge_agent.discovery.peers import PeerTable
from edge_agent.discovery.periodic import Periodic
from edge_agent.transport import Frame, MsgType, PeerLostError

log = logging.getLogger(__name__)

Connect = Callable[[str, int, "str | None"], Awaitable[Any]]  # (host, port, expected agent id) -> Channel
DEFAULT_INTERVAL_S = 1.0
DEFAULT_FANOUT = 2  # members contacted per round: news reaches n members in O(log n) rounds
EXCHANGE_TIMEOUT_S = 5.0
BOOTSTRAP_EVERY = 10  # rounds: ask a bootstrap address again even with a full view (heals partitions)
FORGET_AFTER_S = 300.0  # how long an expired member's counter is kept (refuses its replays)
MAX_KNOWN = 4096  # members remembered, live or recently expired
THREAD_BATCH = 8  # more signature checks than this per message go to a worker thread
SOURCE = "gossip"


@dataclass
class _Known:
    record: MemberRecord
    seen_at: float  # our monotonic clock when its counter last grew (made older by the relay's age hint)


@dataclass
class MembershipStats:
    exchanges_ok: int = 0
    exchanges_failed: int = 0
    answered: int = 0
    records_accepted: int = 0
    records_rejected: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0


class Membership:
    """Gossip membership over authenticated channels, feeding `table` (source "gossip").

    ``connect(host, port, expect_peer_id)`` opens an authenticated channel (node.py passes
    TLS); ``bootstrap`` are HOST:PORT pairs of any members' TLS listeners.  A serving agent
    calls `advertise` with its sealed record and puts `wrap(handler)` on its listener so
    exchanges are answered there; an agent that only consumes (a client) just pulls.
    """

    def __init__(self, identity: Identity, swarm: SwarmKey, table: PeerTable, connect: Connect, *,
                 bootstrap: Sequence[tuple[str, int]] = (), interval_s: float = DEFAULT_INTERVAL_S,
                 fanout: int = DEFAULT_FANOUT, clock: Callable[[], float] = time.monotonic,
                 rng: random.Random | None = None) -> None:
        self.identity = identity
        self.swarm = swarm
        self.table = table
        self.bootstrap = list(dict.fromkeys(bootstrap))
        self.interval_s = interval_s
        self.fanout = max(1, fanout)
        self.stats = MembershipStats()
        self._connect = connect
        self._clock = clock
        self._rng = rng or random.Random()
        self._known: dict[str, _Known] = {}
        self._verified_caps: dict[str, bytes] = {}  # agent id -> record bytes whose signatures held
        self._caps: Capabilities | None = None
        self._addresses: tuple[str, ...] = ()
        self._own: MemberRecord | None = None
        self._counter = 0
        self._rounds = 0
        self._loop = Periodic(self._tick, lambda: self.interval_s * self._rng.uniform(0.8, 1.2),  # jitter: no lockstep
                              log=log, what="membership round")
        # (is it yours?, answer) for other protocols riding the same listener (the DHT, dht.py)
        self.answerers: list[tuple[Callable[[bytes], bool], Callable[[bytes, str], Awaitable[bytes | None]]]] = []

    # -- own record ------------------------------------------------------------------------
    def advertise(self, caps: Capabilities, addresses: Sequence[str]) -> None:
        """Publish our sealed record, reachable at `addresses` (IPs; the TLS port is in caps).
        Anything that is not an IP address (a host name given as --host) is left out and said."""
        usable = []
        for a in addresses:
            try:
                usable.append(check_addresses([a])[0])
            except ValueError:
                log.warning("membership: %r is not an IP address; peers beyond the LAN will not be told it", a)
        self._caps, self._addresses = caps, tuple(dict.fromkeys(usable))[:MAX_ADDRESSES]
        self._bump()

    def _bump(self) -> None:
        if self._caps is None:
            return
        # Wall-clock milliseconds keep the counter growing across restarts; +1 covers a clock step back.
        self._counter = max(self._counter + 1, time.time_ns() // 1_000_000)
        self._own = MemberRecord.signed(self.identity, self._caps, self._counter, self._addresses)

    @property
    def own(self) -> MemberRecord | None:
        return self._own

    # -- what we know ----------------------------------------------------------------------
    def live_records(self, exclude: str | None = None) -> list[MemberRecord]:
        """Our own record and those of members whose counter grew within the staleness window,
        each with its age (how long ago we saw its counter grow)."""
        now = self._clock()
        out = [self._own] if self._own is not None else []
        return out + [k.record.with_age((now - k.seen_at) * 1000) for a, k in self._known.items()
                      if a != exclude and now - k.seen_at <= self.table.stale_after_s]

    def digest(self) -> Digest:
        """What we hold, for a peer to send us only the news (bounded like the peer table)."""
        live = self.live_records()
        if len(live) > MAX_DIGEST:
            live = self._rng.sample(live, MAX_DIGEST)
        return dict(r.digest_entry() for r in live)

    def news_for(self, digest: Digest, exclude: str | None = None) -> tuple[list[MemberRecord], list[Beat]]:
        """The records a peer with `digest` lacks or holds older: full where it lacks the
        capability record, else only the presence; at most MAX_ENTRIES, in random order."""
        full, beats = [], []
        for r in self.live_records(exclude):
            prefix, (counter, caps) = r.digest_entry()
            theirs = digest.get(prefix)
            if theirs is not None and theirs[0] >= counter:
                continue
            if theirs is None or theirs[1] != caps:
                full.append(r)
            else:
                beats.append(Beat(r.agent_id, r.counter, r.addresses, r.signature, r.age_ms))
        news = [(True, r) for r in full] + [(False, b) for b in beats]
        news = self._rng.sample(news, min(len(news), MAX_ENTRIES))
        return [r for is_full, r in news if is_full], [b for is_full, b in news if not is_full]

    def merge(self, msg: Message) -> int:
        """Take in the verified news of a message; returns how many records were accepted."""
        news = self._news(msg)
        return self._apply(news, [self._check(r, cached) for r, cached in news])

    async def merge_async(self, msg: Message) -> int:
        """`merge`, with the signature checks of a large batch in a worker thread (libsodium
        releases the GIL), so a full message does not stall the hop server's event loop."""
        news = self._news(msg)
        if len(news) <= THREAD_BATCH:
            return self._apply(news, [self._check(r, cached) for r, cached in news])
        verdicts = await asyncio.to_thread(lambda: [self._check(r, cached) for r, cached in news])
        return self._apply(news, verdicts)

    def _news(self, msg: Message) -> list[tuple[MemberRecord, bool]]:
        """(record, its capability record is already verified) for each record that is news;
        a beat renews a capability record we hold, else it is ignored (our digest asks for it whole)."""
        candidates = list(msg.records)
        for b in msg.beats:
            known = self._known.get(b.agent_id)
            if known is not None:
                candidates.append(known.record.with_presence(b.counter, b.addresses, b.signature, b.age_ms))
        news = []
        for r in candidates:
            known = self._known.get(r.agent_id)
            if r.agent_id != self.identity.agent_id and (known is None or r.counter > known.record.counter):
                news.append((r, self._verified_caps.get(r.agent_id) == r.caps_txt))
        return news  # what is not news costs no signature check

    def _check(self, r: MemberRecord, caps_verified: bool) -> bool:
        """Both signatures (only the presence when the capability record was verified before).
        Pure: it may run in a worker thread."""
        return r.presence_holds() if caps_verified else r.verify(self.swarm)

    def _apply(self, news: list[tuple[MemberRecord, bool]], verdicts: list[bool]) -> int:
        now = self._clock()
        accepted = 0
        for (r, _), ok in zip(news, verdicts):
            if not ok:
                self.stats.records_rejected += 1
                self.table.rejected += 1
                continue
            known = self._known.get(r.agent_id)
            if known is not None and r.counter <= known.record.counter:
                continue  # another message brought it meanwhile
            if known is None and len(self._known) >= MAX_KNOWN:
                self._forget(now, force=True)
                if len(self._known) >= MAX_KNOWN:
                    continue
            if len(self._verified_caps) >= MAX_KNOWN and r.agent_id not in self._verified_caps:
                self._verified_caps.pop(next(iter(self._verified_caps)))
            self._verified_caps[r.agent_id] = r.caps_txt
            seen = now - r.age_ms / 1000 if known is None else max(now - r.age_ms / 1000, known.seen_at)
            self._known[r.agent_id] = _Known(r.with_age(0), seen)
            entry = self.table.get(r.agent_id)
            if entry is not None and entry.caps == r.caps and entry.addresses == list(r.addresses) and SOURCE in entry.sources:
                self.table.heartbeat(r.agent_id, seen)  # a beat: the table need not check the record again
            else:
                self.table.upsert(r.caps, list(r.addresses), SOURCE, seen_at=seen)
            accepted += 1
        self.stats.records_accepted += accepted
        return accepted

    def _forget(self, now: float, force: bool = False) -> None:
        """Drop members expired for FORGET_AFTER_S (or, when full, every expired one)."""
        horizon = self.table.stale_after_s + (0.0 if force else FORGET_AFTER_S)
        for a in [a for a, k in self._known.items() if now - k.seen_at > horizon]:
            del self._known[a]
            self._verified_caps.pop(a, None)

    # -- answering (listener side) ---------------------------------------------------------
    async def answer(self, payload: bytes, peer_id: str) -> bytes | None:
        """Handle one message from `peer_id` (already authenticated): a SYN gets an ACK, a PUSH
        nothing; None also for anything malformed (logged, dropped)."""
        self.stats.bytes_received += len(payload)
        try:
            msg = decode(payload)
        except MembershipDecodeError as exc:
            log.info("membership message from %s refused: %s", peer_id[:12], exc)
            return None
        await self.merge_async(msg)
        if msg.kind != SYN:
            return None
        self.stats.answered += 1
        records, beats = self.news_for(msg.digest, exclude=peer_id)
        reply = encode(Message(ACK, self.digest(), records, beats))
        self.stats.bytes_sent += len(reply)
        return reply

    def wrap(self, handler: Callable[[Any], Awaitable[None]]) -> Callable[[Any], Awaitable[None]]:
        """A listener handler that answers membership messages and passes every other frame on."""

        async def on_channel(channel: Any) -> None:
            await handler(_AnsweringChannel(channel, self))

        return on_channel

    # -- asking (every round) --------------------------------------------------------------
    @property
    def active(self) -> bool:
        """Rounds run once there is someone beyond the LAN to talk to (LAN-only swarms: no traffic)."""
        return bool(self.bootstrap or self._known)

    async def start(self) -> None:
        if not self._loop.running:
            self._rounds = 0  # a (re)start asks a bootstrap address in its first round
            self._loop.start()

    async def close(self) -> None:
        await self._loop.close()

    async def _tick(self) -> None:
        """One turn of the background loop: a new heartbeat, forgetting the long expired, and
        an exchange round when there is anyone to talk to."""
        n, self._rounds = self._rounds, self._rounds + 1
        self._bump()
        self._forget(self._clock())
        if self.active:
            await self.run_round(n)

    def targets(self, n: int) -> list[tuple[str, int, str | None]]:
        """This round's peers: `fanout` random members with a TLS address, plus a bootstrap
        address while we know nobody (and every BOOTSTRAP_EVERY rounds)."""
        # a multi-homed member (docker0 first, say) is tried at each of its signed addresses in turn
        members = [(e.addresses[n % len(e.addresses)], e.caps.tls_port, e.agent_id) for e in self.table.peers()
                   if e.caps.tls_port and e.addresses and e.caps.role == "peer"]
        picks: list[tuple[str, int, str | None]] = list(self._rng.sample(members, min(self.fanout, len(members))))
        if self.bootstrap and (not picks or n % BOOTSTRAP_EVERY == 0):
            turn = n // BOOTSTRAP_EVERY if picks else n  # knowing nobody: try the next address each round
            host, port = self.bootstrap[turn % len(self.bootstrap)]
            picks.append((host, port, None))
        return picks

    async def run_round(self, n: int = 0) -> None:
        await asyncio.gather(*(self.exchange(h, p, pid) for h, p, pid in self.targets(n)))

    async def exchange(self, host: str, port: int, expect_peer_id: str | None = None) -> bool:
        """One push-pull with the member at host:port; False when it failed (no news is fine)."""
        try:
            channel = await asyncio.wait_for(self._connect(host, port, expect_peer_id), EXCHANGE_TIMEOUT_S)
        except Exception as exc:  # noqa: BLE001 - unreachable, refused, wrong swarm: all the same here
            self.stats.exchanges_failed += 1
            log.debug("membership: %s:%d unreachable: %r", host, port, exc)
            return False
        try:
            syn = encode(Message(SYN, self.digest()))
            await self._send(channel, syn)
            reply = await asyncio.wait_for(channel.recv(), EXCHANGE_TIMEOUT_S)
            self.stats.bytes_received += len(reply.payload)
            ack = decode(reply.payload)
            if ack.kind != ACK:
                raise MembershipDecodeError("expected an ACK")
            await self.merge_async(ack)
            records, beats = self.news_for(ack.digest, exclude=channel.peer_id)
            if records or beats:
                await self._send(channel, encode(Message(PUSH, {}, records, beats)))
            self.stats.exchanges_ok += 1
            return True
        except (MembershipDecodeError, PeerLostError, asyncio.TimeoutError, OSError) as exc:
            self.stats.exchanges_failed += 1
            log.debug("membership exchange with %s:%d failed: %r", host, port, exc)
            return False
        finally:
            await channel.close()

    async def _send(self, channel: Any, payload: bytes) -> None:
        await channel.send(Frame.from_bytes(MsgType.CONTROL, payload, seq=1))
        self.stats.bytes_sent += len(payload)


class _AnsweringChannel:
    """What the hop server sees of a channel: membership messages are answered here and never
    reach it; every other attribute is the channel's own."""

    def __init__(self, channel: Any, membership: Membership) -> None:
        self._channel = channel
        self._membership = membership

    def __getattr__(self, name: str) -> Any:
        return getattr(self._channel, name)

    async def recv(self) -> Frame:
        while True:
            frame = await self._channel.recv()
            answer = self._answerer(frame)
            if answer is None:
                return frame
            reply = await answer(bytes(frame.payload), self._channel.peer_id)
            if reply is not None:
                await self._channel.send(Frame.from_bytes(MsgType.CONTROL, reply, request_id=frame.request_id,
                                                          seq=frame.seq))

    def _answerer(self, frame: Frame) -> Callable[[bytes, str], Awaitable[bytes | None]] | None:
        if frame.type != MsgType.CONTROL:
            return None
        if is_membership_message(frame.payload):
            return self._membership.answer
        return next((answer for mine, answer in self._membership.answerers if mine(frame.payload)), None)
