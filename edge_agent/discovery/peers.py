"""The live peer table: who is in my swarm right now, what they offer, when last heard.

Why a table separate from mDNS: peers arrive from several sources (the mDNS browser,
manually configured ``--peer HOST:PORT`` addresses for multicast-less networks, and
application traffic that proves a peer alive), and the planner and dashboard want one
consistent view plus change events.  The table does no I/O of its own: manual peers are
probed through an injected async callable, so it has no transport dependency.

Every record is checked here (swarm tag, swarm MAC, Ed25519 signature) whatever its
source, so a buggy or hostile source cannot put an unverified peer in the table.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Literal

from edge_agent.discovery.capabilities import Capabilities
from edge_agent.discovery.periodic import Periodic

log = logging.getLogger(__name__)

EventKind = Literal["joined", "updated", "left"]
Probe = Callable[[str, int], Awaitable[Capabilities]]
MAX_PEERS = 1024  # bound the memory a noisy LAN can make us hold
MAX_ADDRESSES = 8
DEFAULT_STALE_AFTER_S = 7.0


@dataclass
class PeerEntry:
    """One peer as currently known; `last_seen` is on the monotonic clock."""

    caps: Capabilities
    addresses: list[str]
    last_seen: float
    sources: set[str] = field(default_factory=set)

    @property
    def agent_id(self) -> str:
        return self.caps.agent_id

    def to_dict(self, now: float | None = None) -> dict[str, Any]:
        now = time.monotonic() if now is None else now
        d = self.caps.to_dict()
        d.update(addresses=list(self.addresses), sources=sorted(self.sources),
                 age_s=round(max(0.0, now - self.last_seen), 3))
        return d


@dataclass(frozen=True)
class PeerEvent:
    kind: EventKind
    agent_id: str
    entry: PeerEntry
    reason: str = ""


class PeerTable:
    """agent id -> PeerEntry, with expiry of silent peers and change events.

    `stale_after_s` is the liveness bound: a peer not heard from (mDNS answer, manual
    probe or `heartbeat()`) for that long is dropped with a "left" event.
    """

    def __init__(self, swarm_key: Any, *, self_id: str | None = None,
                 stale_after_s: float = DEFAULT_STALE_AFTER_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.swarm_key = swarm_key
        self.self_id = self_id
        self.stale_after_s = stale_after_s
        self._clock = clock
        self._peers: dict[str, PeerEntry] = {}
        self._queues: list[asyncio.Queue[PeerEvent]] = []
        self._callbacks: list[Callable[[PeerEvent], None]] = []
        self._manual: set[tuple[str, int]] = set()
        self._upkeep: Periodic | None = None
        self.rejected = 0  # records dropped for a bad tag/MAC/signature (for `doctor`)

    # -- queries -------------------------------------------------------------------
    def get(self, agent_id: str) -> PeerEntry | None:
        return self._peers.get(agent_id)

    def peers(self) -> list[PeerEntry]:
        return sorted(self._peers.values(), key=lambda e: e.agent_id)

    def __len__(self) -> int:
        return len(self._peers)

    def __contains__(self, agent_id: object) -> bool:
        return agent_id in self._peers

    # -- subscriptions -------------------------------------------------------------
    def subscribe(self, maxsize: int = 256) -> "asyncio.Queue[PeerEvent]":
        """A queue of future events; when full the oldest event is dropped."""
        q: asyncio.Queue[PeerEvent] = asyncio.Queue(maxsize)
        self._queues.append(q)
        return q

    def unsubscribe(self, q: "asyncio.Queue[PeerEvent]") -> None:
        with contextlib.suppress(ValueError):
            self._queues.remove(q)

    def on_event(self, callback: Callable[[PeerEvent], None]) -> Callable[[], None]:
        """Call `callback(event)` synchronously on every change; returns an unsubscriber."""
        self._callbacks.append(callback)
        return lambda: self._callbacks.remove(callback) if callback in self._callbacks else None

    def _emit(self, ev: PeerEvent) -> None:
        for q in list(self._queues):
            if q.full():
                with contextlib.suppress(asyncio.QueueEmpty):
                    q.get_nowait()
            q.put_nowait(ev)
        for cb in list(self._callbacks):
            try:
                cb(ev)
            except Exception:  # a bad subscriber must not break discovery
                log.exception("peer event callback failed")

    # -- mutations -----------------------------------------------------------------
    def upsert(self, caps: Capabilities, addresses: list[str] | tuple[str, ...] = (),
               source: str = "mdns", seen_at: float | None = None) -> PeerEvent | None:
        """Add or refresh a peer from a verified record; returns the event, if any.

        Records from another swarm, with a bad MAC/signature, or our own, are ignored.
        """
        if caps.agent_id == self.self_id or caps.swarm_tag != self.swarm_key.tag():
            return None  # ourselves, or another swarm (normal on a shared LAN)
        if not caps.verify(self.swarm_key):
            self.rejected += 1
            log.debug("rejected record for %s from %s", caps.agent_id[:16], source)
            return None
        now = self._clock()
        seen = now if seen_at is None else min(seen_at, now)
        addrs = list(dict.fromkeys(addresses))[:MAX_ADDRESSES]
        entry = self._peers.get(caps.agent_id)
        if entry is None:
            if len(self._peers) >= MAX_PEERS:
                log.warning("peer table full (%d); ignoring %s", MAX_PEERS, caps.agent_id[:16])
                return None
            if now - seen > self.stale_after_s:
                return None  # already stale: do not flap joined/left
            entry = PeerEntry(caps, addrs, seen, {source})
            self._peers[caps.agent_id] = entry
            ev = PeerEvent("joined", caps.agent_id, entry, source)
            self._emit(ev)
            return ev
        changed = entry.caps != caps or (addrs and addrs != entry.addresses)
        entry.last_seen = max(entry.last_seen, seen)
        entry.sources.add(source)
        if not changed:
            return None
        entry.caps = caps
        if addrs:
            entry.addresses = addrs
        ev = PeerEvent("updated", caps.agent_id, entry, source)
        self._emit(ev)
        return ev

    def heartbeat(self, agent_id: str, seen_at: float | None = None) -> bool:
        """Application liveness hook (e.g. a frame or ping arrived over the transport)."""
        entry = self._peers.get(agent_id)
        if entry is None:
            return False
        now = self._clock()
        entry.last_seen = max(entry.last_seen, now if seen_at is None else min(seen_at, now))
        return True

    def remove(self, agent_id: str, reason: str = "removed") -> PeerEvent | None:
        """Drop a peer now (clean mDNS goodbye, transport saw it die, ...)."""
        entry = self._peers.pop(agent_id, None)
        if entry is None:
            return None
        ev = PeerEvent("left", agent_id, entry, reason)
        self._emit(ev)
        return ev

    def expire(self, now: float | None = None) -> list[PeerEvent]:
        """Drop every peer silent for longer than `stale_after_s`."""
        now = self._clock() if now is None else now
        dead = [a for a, e in self._peers.items() if now - e.last_seen > self.stale_after_s]
        return [ev for a in dead if (ev := self.remove(a, "timeout")) is not None]

    # -- manual peers --------------------------------------------------------------
    def add_manual_peer(self, host: str, port: int) -> None:
        """Remember a ``--peer HOST:PORT`` to probe; see `parse_peer_arg`."""
        if not 0 < int(port) < 65536:
            raise ValueError("port out of range")
        self._manual.add((host, int(port)))

    async def probe_manual_peers(self, probe: Probe, timeout_s: float = 2.0) -> None:
        """Probe every manual peer once, concurrently; a failure just leaves it to expire."""

        async def one(host: str, port: int) -> None:
            try:
                caps = await asyncio.wait_for(probe(host, port), timeout_s)
            except Exception as exc:  # any failure = no news: liveness is the timeout
                log.debug("manual peer %s:%d probe failed: %s", host, port, exc)
                return
            if not isinstance(caps, Capabilities):
                log.debug("manual peer %s:%d probe returned %r", host, port, type(caps))
                return
            self.upsert(caps, [host], "manual")

        await asyncio.gather(*(one(h, p) for h, p in sorted(self._manual)))

    # -- background upkeep ---------------------------------------------------------
    def start(self, probe: Probe | None = None, interval_s: float = 1.0,
              probe_every_s: float = 2.0) -> None:
        """Run expiry (and manual probes, if `probe` is given) in a background task."""
        if self._upkeep is not None:
            return
        next_probe = 0.0

        async def step() -> None:
            nonlocal next_probe
            if probe is not None and self._manual and self._clock() >= next_probe:
                next_probe = self._clock() + probe_every_s
                await self.probe_manual_peers(probe, timeout_s=min(probe_every_s, 5.0))
            self.expire()

        self._upkeep = Periodic(step, lambda: interval_s, log=log, what="peer table upkeep")
        self._upkeep.start()

    async def close(self) -> None:
        upkeep, self._upkeep = self._upkeep, None
        if upkeep is not None:
            await upkeep.close()


def parse_peer_arg(text: str) -> tuple[str, int]:
    """Parse ``HOST:PORT`` or ``[V6]:PORT`` from the command line."""
    text = text.strip()
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
    else:
        host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"expected HOST:PORT, got {text!r}")
    return host, int(port)


def _relay_note(row: dict[str, Any]) -> str:
    """Where a peer nobody can dial is reached: the relays its record names (transport/relay.py)."""
    relays = str((row.get("extra") or {}).get("rl", ""))
    return f"via relay {relays}" if relays else ""


def format_peers(rows: list[dict[str, Any]]) -> str:
    """Human-readable table of `list_peers()` rows for `edge-agent peers` (no --json); a row's
    ``incompatible`` reason (set by the caller) ends its line."""
    if not rows:
        return "no peers found"
    head = ("AGENT", "ROLE", "ADDRESS", "SHARDS", "FREE MB", "MS/LAYER", "BACKEND", "AGE S", "NOTE")
    lines = [head]
    for r in rows:
        addr = (r.get("addresses") or ["?"])[0]
        port = r.get("tls_port") or r.get("signal_port")  # the TLS port is what --peer and `ledger sync --peer` take
        shards = ",".join(f"{s['model'][:8]}:{s['start']}-{s['end']}" for s in r.get("shards", []))
        lines.append((r["agent_id"][:16], r.get("role", ""), f"{addr}:{port}", shards or "-",
                      str(r.get("free_mem_mb", "")), f"{r.get('ms_per_layer', 0):g}",
                      r.get("backend", ""), f"{r.get('age_s', 0):.1f}",
                      f"incompatible: {r['incompatible']}" if r.get("incompatible") else _relay_note(r)))
    widths = [max(len(row[i]) for row in lines) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in lines)
