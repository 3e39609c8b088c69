"""Membership for large swarms: a Kademlia DHT with segment keys, on our TLS channels.

Gossip (membership.py) tells every member about every other: O(n) bytes a round per
member.  Here (docs/discovery.md, "The real DHT") a serving node stores its signed member
record under one key per layer segment it serves (dht_wire.publish_keys), on the K nodes
closest to that key, and a client fetches only the keys of the layers it needs: O(log n)
messages per lookup, and a client never learns the swarm beyond them.

Soundness: every contact and every value is a member record whose two signatures and swarm
MAC are verified on receipt (`MemberRecord.verify`), so a node can neither forge nor alter
one; a STORE is taken only from the record's owner (the authenticated channel's peer id)
and only under the keys its own shards name, so nobody fills keys with others' records or
replays a dead member's.  Positions are hashes of the Ed25519 key (`node_id`).  Messages
ride the channels gossip uses, which prove the swarm key in their handshake: an outsider
cannot even ask.  Stored values expire after `ttl_s` (owners re-publish every third of
it); keys, values per key, routing contacts, lookup rounds and every wait are bounded.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Sequence

from edge_agent.discovery.dht_wire import (FIND_NODE, FIND_VALUE, GET, K, MAX_VALUES, REPLY, STORE, DhtDecodeError,
                                           DhtMessage, decode, encode, is_dht_message, lookup_keys, node_id,
                                           publish_keys)
from edge_agent.discovery.membership import EXCHANGE_TIMEOUT_S, Membership
from edge_agent.discovery.membership_wire import MemberRecord
from edge_agent.discovery.periodic import Periodic
from edge_agent.transport import Frame, MsgType, PeerLostError

log = logging.getLogger(__name__)

ALPHA = 3  # parallel queries per lookup step
MAX_LOOKUP_ROUNDS = 12  # steps per lookup: O(log n) suffice, this bounds a hostile answerer
LOOKUP_TIMEOUT_S = 15.0
MAX_KEYS = 512  # keys a node stores values for
MAX_LOOKUP_KEYS = 64  # keys one find_layers may fetch
DEFAULT_TTL_S = 120.0
SOURCE = "dht"


@dataclass
class DhtStats:
    rpcs_ok: int = 0
    rpcs_failed: int = 0
    answered: int = 0
    stored: int = 0
    refused: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0


def _distance(a: bytes, b: bytes) -> int:
    return int.from_bytes(a, "big") ^ int.from_bytes(b, "big")


class Dht:
    """A DHT node riding `membership`'s identity, channels and listener hook.

    A serving agent's own record is `membership.own` (set by `Membership.advertise`); an
    agent without one runs in client mode: it asks, it is never a contact nor a store.
    """

    def __init__(self, membership: Membership, *, bootstrap: Sequence[tuple[str, int]] = (),
                 ttl_s: float = DEFAULT_TTL_S) -> None:
        self.membership = membership
        self.swarm = membership.swarm
        self.table = membership.table
        self.bootstrap = list(dict.fromkeys(bootstrap))
        self.ttl_s = ttl_s
        self.interval_s = self.table.stale_after_s / 2  # how often wants are fetched again
        self.stats = DhtStats()
        self.me = node_id(membership.identity.agent_id)
        self._clock = membership._clock
        self._buckets: dict[int, dict[str, MemberRecord]] = {}  # by shared prefix length; insertion = age
        self._store: dict[bytes, dict[str, tuple[MemberRecord, float]]] = {}  # key -> agent id -> (record, expires)
        self._verified: dict[str, tuple] = {}  # agent id -> the signed content last seen to hold
        self._wants: list[tuple[str, int, int]] = []
        self._holders: dict[bytes, list[MemberRecord]] = {}  # wanted key -> the nodes closest to it, last lookup
        self._published_at: float | None = None
        self._published_caps = b""  # the capability record last published: a new one is published at once
        # jitter, so no two nodes run in lockstep; the round's timeout bounds a stalled lookup
        self._loop = Periodic(self._bounded_round, lambda: self.interval_s * self.membership._rng.uniform(0.8, 1.0),
                              log=log, what="DHT round")
        membership.answerers.append((is_dht_message, self.answer))

    # -- checking and remembering ----------------------------------------------------------
    def _valid(self, r: MemberRecord) -> bool:
        signed = (r.caps_txt, r.counter, r.addresses, r.signature)  # all a signature covers, and itself
        if self._verified.get(r.agent_id) == signed:
            return True
        if not r.verify(self.swarm):
            self.stats.refused += 1
            return False
        if len(self._verified) >= 4 * MAX_KEYS:
            self._verified.pop(next(iter(self._verified)))
        self._verified[r.agent_id] = signed
        return True

    def _learn(self, r: MemberRecord) -> None:
        """Add a verified serving node to the routing table: a full bucket keeps its old
        contacts (Kademlia's preference for nodes that stayed up); failed ones are dropped."""
        if r.agent_id == self.membership.identity.agent_id or not (r.caps.tls_port and r.addresses):
            return
        bucket = self._buckets.setdefault(256 - _distance(self.me, node_id(r.agent_id)).bit_length(), {})
        known = bucket.get(r.agent_id)
        if known is not None and known.counter >= r.counter:
            return
        if known is not None or len(bucket) < K:
            bucket[r.agent_id] = r

    def _forget(self, agent_id: str) -> None:
        for bucket in self._buckets.values():
            bucket.pop(agent_id, None)

    def closest(self, key: bytes, count: int = K) -> list[MemberRecord]:
        contacts = [r for b in self._buckets.values() for r in b.values()]
        return sorted(contacts, key=lambda r: _distance(key, node_id(r.agent_id)))[:count]

    def contacts(self) -> int:
        return sum(len(b) for b in self._buckets.values())

    def values(self, key: bytes) -> list[MemberRecord]:
        now = self._clock()
        held = self._store.get(key, {})
        return [r.with_age((now - (exp - self.ttl_s)) * 1000) for r, exp in held.values() if exp > now]

    def _put(self, key: bytes, r: MemberRecord) -> bool:
        now = self._clock()
        self._expire(now)
        held = self._store.get(key)
        if held is None:
            if len(self._store) >= MAX_KEYS:
                return False
            held = self._store[key] = {}
        old = held.get(r.agent_id)
        if old is not None and old[0].counter > r.counter:
            return False  # the same counter again is the owner re-publishing (only owners store): renewed
        if old is None and len(held) >= MAX_VALUES:
            return False
        held[r.agent_id] = (r.with_age(0), now + self.ttl_s)
        self.stats.stored += 1
        return True

    def _expire(self, now: float) -> None:
        for key in list(self._store):
            held = self._store[key]
            for a in [a for a, (_, exp) in held.items() if exp <= now]:
                del held[a]
            if not held:
                del self._store[key]

    # -- answering (listener side) ---------------------------------------------------------
    async def answer(self, payload: bytes, peer_id: str) -> bytes | None:
        """One request from `peer_id` (already authenticated); None for anything malformed."""
        self.stats.bytes_received += len(payload)
        try:
            msg = decode(payload)
        except DhtDecodeError as exc:
            log.info("DHT message from %s refused: %s", peer_id[:12], exc)
            return None
        for r in msg.contacts[:1]:  # the asker's own record, when it serves: only that one is taken
            if r.agent_id == peer_id and self._valid(r):
                self._learn(r)
        reply = DhtMessage(REPLY, msg.key)
        if msg.kind == STORE:
            ok = [r for r in msg.values[:1] if r.agent_id == peer_id and msg.key in publish_keys(r.caps)
                  and self._valid(r) and self._put(msg.key, r)]
            reply.values = ok
        elif msg.kind == GET:
            reply.values = self.values(msg.key)
        elif msg.kind in (FIND_NODE, FIND_VALUE):
            reply.contacts = [r for r in self.closest(msg.key) if r.agent_id != peer_id]
            if self.membership.own is not None:
                reply.contacts.append(self.membership.own)  # lets the asker learn who answered
            if msg.kind == FIND_VALUE:
                reply.values = self.values(msg.key)
        else:
            return None
        self.stats.answered += 1
        raw = encode(reply)
        self.stats.bytes_sent += len(raw)
        return raw

    # -- asking ----------------------------------------------------------------------------
    async def rpc(self, host: str, port: int, expect: str | None, msg: DhtMessage) -> DhtMessage | None:
        own = self.membership.own
        if own is not None and msg.kind != STORE:
            msg.contacts = [own]
        try:
            channel = await asyncio.wait_for(self.membership._connect(host, port, expect), EXCHANGE_TIMEOUT_S)
        except Exception as exc:  # noqa: BLE001 - unreachable, refused, wrong swarm: all the same here
            self.stats.rpcs_failed += 1
            log.debug("DHT: %s:%d unreachable: %r", host, port, exc)
            return None
        try:
            raw = encode(msg)
            await channel.send(Frame.from_bytes(MsgType.CONTROL, raw, seq=1))
            self.stats.bytes_sent += len(raw)
            reply = await asyncio.wait_for(channel.recv(), EXCHANGE_TIMEOUT_S)
            self.stats.bytes_received += len(reply.payload)
            answer = decode(reply.payload)
            if answer.kind != REPLY or answer.key != msg.key:
                raise DhtDecodeError("expected the reply to our request")
            self.stats.rpcs_ok += 1
            return answer
        except (DhtDecodeError, PeerLostError, asyncio.TimeoutError, OSError) as exc:
            self.stats.rpcs_failed += 1
            log.debug("DHT request to %s:%d failed: %r", host, port, exc)
            return None
        finally:
            await channel.close()

    async def _ask(self, contact: MemberRecord, msg: DhtMessage) -> DhtMessage | None:
        reply = await self.rpc(contact.addresses[0], contact.caps.tls_port, contact.agent_id, msg)
        if reply is None:
            self._forget(contact.agent_id)
        return reply

    async def lookup(self, key: bytes, find_value: bool = False) -> tuple[list[MemberRecord], list[MemberRecord]]:
        """Iterative Kademlia lookup: (the K closest serving nodes found, verified values under `key`)."""
        kind = FIND_VALUE if find_value else FIND_NODE
        shortlist = {r.agent_id: r for r in self.closest(key)}
        values: dict[str, MemberRecord] = {}
        asked: set[str] = set()

        def take(reply: DhtMessage | None) -> None:
            if reply is None:
                return
            for r in reply.contacts[:2 * K]:
                if r.agent_id != self.membership.identity.agent_id and self._valid(r):
                    self._learn(r)
                    shortlist.setdefault(r.agent_id, r)
            self._take_values(key, reply, values)

        deadline = self._clock() + LOOKUP_TIMEOUT_S
        if not shortlist:
            for reply in await asyncio.gather(*(self.rpc(h, p, None, DhtMessage(kind, key)) for h, p in self.bootstrap)):
                take(reply)
        for _ in range(MAX_LOOKUP_ROUNDS):
            nearest = sorted(shortlist.values(), key=lambda r: _distance(key, node_id(r.agent_id)))[:K]
            pending = [r for r in nearest if r.agent_id not in asked][:ALPHA]
            if not pending or self._clock() > deadline:
                break
            asked.update(r.agent_id for r in pending)
            replies = await asyncio.gather(*(self._ask(r, DhtMessage(kind, key)) for r in pending))
            for r, reply in zip(pending, replies):
                if reply is None:
                    shortlist.pop(r.agent_id, None)
                take(reply)
        nearest = sorted(shortlist.values(), key=lambda r: _distance(key, node_id(r.agent_id)))[:K]
        return nearest, list(values.values())

    def _take_values(self, key: bytes, reply: DhtMessage, into: dict[str, MemberRecord]) -> None:
        for v in reply.values[:MAX_VALUES]:
            old = into.get(v.agent_id)
            if (old is None or v.counter > old.counter) and key in publish_keys(v.caps) and self._valid(v):
                into[v.agent_id] = v

    async def fetch(self, key: bytes, full: bool = True) -> list[MemberRecord]:
        """The verified values under `key`: a whole lookup, or (`full=False`, once one found the
        key's holders) a GET at the nearest holder that answers, at most 2 tried."""
        holders = [] if full else self._holders.get(key, [])[:2]
        for holder in holders:
            reply = await self._ask(holder, DhtMessage(GET, key))
            if reply is not None:
                values: dict[str, MemberRecord] = {}
                self._take_values(key, reply, values)
                return list(values.values())
        nearest, found = await self.lookup(key, find_value=True)
        if len(self._holders) >= 8 * MAX_LOOKUP_KEYS and key not in self._holders:
            self._holders.pop(next(iter(self._holders)))
        self._holders[key] = nearest
        return found

    async def publish(self) -> int:
        """Store our record under each of our segment keys on the K nodes closest to it;
        returns how many stores were taken."""
        own = self.membership.own
        if own is None:
            return 0
        taken = 0
        self._published_caps = own.caps_txt
        for key in publish_keys(own.caps):
            nearest, _ = await self.lookup(key)
            replies = await asyncio.gather(*(self._ask(r, DhtMessage(STORE, key, values=[own])) for r in nearest))
            taken += sum(1 for r in replies if r is not None and r.values)
            if self._distance_rank(key, nearest) < K:
                self._put(key, own)  # we are among the closest ourselves
        return taken

    def _distance_rank(self, key: bytes, nearest: list[MemberRecord]) -> int:
        mine = _distance(key, self.me)
        return sum(1 for r in nearest if _distance(key, node_id(r.agent_id)) < mine)

    async def find_layers(self, model_hash: str, first: int, last: int, full: bool = True) -> list[MemberRecord]:
        """Who serves any of layers first..last of `model_hash`: fetch those segment keys (whole
        lookups, or GETs at their known holders), keep the verified records that overlap, and
        feed them to the peer table (source "dht")."""
        keys = lookup_keys(model_hash, first, last)[:MAX_LOOKUP_KEYS]
        found: dict[str, MemberRecord] = {}
        for values in await asyncio.gather(*(self.fetch(k, full) for k in keys)):
            for v in values:
                if v.agent_id not in found or v.counter > found[v.agent_id].counter:
                    found[v.agent_id] = v
        out = [v for v in found.values() if v.agent_id != self.membership.identity.agent_id
               and any(m == model_hash and a <= last and b >= first for m, a, b in v.caps.shards)]
        for v in out:
            # live as long as a store holds it: owners re-publish every ttl/3, a dead one's record expires
            self.table.upsert(v.caps, list(v.addresses), SOURCE)
        return out

    # -- the loop --------------------------------------------------------------------------
    def want(self, model_hash: str, first: int, last: int) -> None:
        """Keep the peer table fed with who serves these layers (refreshed every round)."""
        if (model_hash, first, last) not in self._wants:
            self._wants = (self._wants + [(model_hash, first, last)])[-8:]

    async def round(self) -> None:
        now = self._clock()
        own = self.membership.own
        changed = own is not None and own.caps_txt != self._published_caps  # serving began, or re-advertised
        due = changed or self._published_at is None or now - self._published_at >= self.ttl_s / 3
        if due:
            self._published_at = now
            await self.lookup(self.me)  # join and routing refresh: the nodes near us learn us, we learn them
            await self.publish()
        for want in self._wants:  # whole lookups every TTL/3 (new holders, new servers), GETs between
            await self.find_layers(*want, full=due)
        self._expire(self._clock())

    async def start(self) -> None:
        self._loop.start()

    async def close(self) -> None:
        await self._loop.close()

    async def _bounded_round(self) -> None:
        await asyncio.wait_for(self.round(), max(self.interval_s, LOOKUP_TIMEOUT_S))
