"""Ledger sync: range-based set reconciliation of receipt ids, then verified transfer.

Why ranges of hash ids: ids are blake2b hashes, so splitting the id space in 16 equal
ranges per level splits any ledger evenly. The initiator sends (count, fingerprint) for
ranges; the responder answers EQUAL (identical: nothing more is said about it), IDS (its
ids there, when few) or SPLIT (look closer). Identical ledgers cost one 29-byte range and
a 1-byte answer. The fingerprint of a range is blake2b-128(count || XOR of its ids), taken
in O(1) from a prefix-XOR array over the sorted ids.

Then the initiator pulls what it lacks (GET) and pushes what the peer lacks (PUT), both at
once. Every record is verified on ingest (``ingest``): malformed, forged, tampered,
duplicate or conflicting records are refused one by one with a reason; the rest of the
batch is stored. A responder spends a bounded number of verifications per peer per minute.
"""

from __future__ import annotations

import asyncio
import bisect
import concurrent.futures
import hashlib
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Awaitable, Callable

from edge_agent.ledger import wire
from edge_agent.ledger.encoding import RECEIPT, EncodingError, record_id
from edge_agent.ledger.records import Receipt
from edge_agent.ledger.store import LedgerStore
from edge_agent.ledger.signed_sync import (GET_LIMIT, ingest_bonds, ingest_evidence, recent_bonds, recent_evidence,
                                           reconcile_signed, signed_ids, signed_records)
from edge_agent.ledger.wire import Msg, SignedSet, Status

log = logging.getLogger(__name__)
IDS_THRESHOLD = 32  # a range with at most this many ids is answered with the ids
MAX_IDS_PER_REPLY = 16384
SYNC_ROUNDS = wire.MAX_DEPTH + 2
IN_FLIGHT = 2  # GET / PUT batches outstanding per direction
Request = Callable[[bytes], Awaitable[bytes]]  # send one ledger message, get the reply payload
_POOL = concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 2, thread_name_prefix="ledger-verify")


class SyncError(Exception):
    """The peer broke the protocol or refused us; the sync stops, our ledger is unchanged by it."""


class IdSet:
    """Sorted ids with prefix XORs: count and fingerprint of any id range in O(log n)."""

    def __init__(self, ids: list[bytes]) -> None:
        self.ids = ids
        xs = [0] * (len(ids) + 1)
        acc = 0
        for i, rid in enumerate(ids):
            acc ^= int.from_bytes(rid, "big")
            xs[i + 1] = acc
        self._xs = xs

    def bounds(self, depth: int, prefix: int) -> tuple[int, int]:
        if depth == 0:
            return 0, len(self.ids)
        shift = 256 - 4 * depth
        lo = bisect.bisect_left(self.ids, (prefix << shift).to_bytes(32, "big"))
        top = (prefix + 1) << shift
        hi = len(self.ids) if top >> 256 else bisect.bisect_left(self.ids, top.to_bytes(32, "big"), lo)
        return lo, hi

    def summary(self, depth: int, prefix: int) -> tuple[int, bytes]:
        i, j = self.bounds(depth, prefix)
        fp = hashlib.blake2b((j - i).to_bytes(4, "little") + (self._xs[j] ^ self._xs[i]).to_bytes(32, "big"), digest_size=16)
        return j - i, fp.digest()

    def in_range(self, depth: int, prefix: int) -> list[bytes]:
        i, j = self.bounds(depth, prefix)
        return self.ids[i:j]


# -- ingest: the one door for records from elsewhere ----------------------------------------------
@dataclass
class IngestResult:
    accepted: int = 0
    refused: list[tuple[int, str, str]] = field(default_factory=list)  # (index, id hex or "", reason)


def _check(batch: list[tuple[int, bytes]]) -> list[tuple[int, Receipt | None, str | None]]:
    out = []
    for index, raw in batch:
        try:
            rec = Receipt.from_bytes(raw)
            problem = rec.problem()
        except EncodingError as exc:
            out.append((index, None, f"malformed: {exc.reason}"))
            continue
        out.append((index, rec if problem is None else None, problem if problem is None else f"{problem} ({rec.id.hex()[:16]})"))
    return out


def check_receipts(raw: list[bytes]) -> list[tuple[int, Receipt | None, str | None]]:
    """Decode and verify signatures in parallel (libsodium releases the GIL)."""
    items = list(enumerate(raw))
    step = max(64, len(items) // (2 * (os.cpu_count() or 2)) + 1)
    parts = [items[i:i + step] for i in range(0, len(items), step)]
    return [r for part in _POOL.map(_check, parts) for r in part]


def ingest(store: LedgerStore, raw: list[bytes]) -> tuple[IngestResult, "concurrent.futures.Future"]:
    """Verify receipts from an untrusted source; queue the good ones. Blocking: run in a thread."""
    result = IngestResult()
    good: list[tuple[int, Receipt]] = []
    for index, rec, reason in check_receipts(raw):
        if rec is None:
            result.refused.append((index, "", reason or "invalid"))
        else:
            good.append((index, rec))
    held = store.existing("receipts", [r.id for _, r in good])
    seen: set[bytes] = set()
    fresh: list[tuple[int, Receipt]] = []
    for index, rec in good:
        if rec.id in held or rec.id in seen:
            result.refused.append((index, rec.id.hex(), "duplicate: already held"))
        else:
            seen.add(rec.id)
            fresh.append((index, rec))
    taken = store.receipt_keys([r for _, r in fresh])
    keys: set[tuple] = set()
    accepted = []
    for index, rec in fresh:
        f = rec.fields
        key = (f.request_id, f.node, f.layer_start, f.layer_end)
        if key in taken or key in keys:
            result.refused.append((index, rec.id.hex(), "conflict: another receipt for this request, node and layers"))
            continue
        keys.add(key)
        accepted.append(rec)
    result.accepted = len(accepted)
    result.refused.sort()
    return result, store.add(receipts=accepted)


async def ingest_async(store: LedgerStore, raw: list[bytes]) -> IngestResult:
    result, stored = await asyncio.to_thread(ingest, store, raw)
    await asyncio.wrap_future(stored)
    return result


# -- responder ---------------------------------------------------------------------------------
class Budget:
    """Records a peer may make us verify per minute (a token bucket): junk costs us a bounded amount."""

    def __init__(self, per_minute: int = 400_000) -> None:
        self.per_minute = per_minute
        self._buckets: dict[str, tuple[float, float]] = {}

    def take(self, peer: str, n: int) -> bool:
        now = time.monotonic()
        tokens, last = self._buckets.get(peer, (float(self.per_minute), now))
        tokens = min(float(self.per_minute), tokens + (now - last) * self.per_minute / 60.0)
        ok = tokens >= n
        self._buckets[peer] = (tokens - n if ok else tokens, now)
        if len(self._buckets) > 4096:
            self._buckets.pop(next(iter(self._buckets)))
        return ok


class SyncResponder:
    def __init__(self, store: LedgerStore, budget: Budget | None = None) -> None:
        self.store = store
        self.budget = budget or Budget()
        self._ids: tuple[int, IdSet] | None = None

    def id_set(self) -> IdSet:
        version = self.store.version
        if self._ids is None or self._ids[0] != version:
            self._ids = (version, IdSet(self.store.receipt_ids()))
        return self._ids[1]

    async def handle(self, kind: Msg, r: wire.Reader, peer: str) -> bytes:
        if kind == Msg.SUMMARY:
            ranges = wire.read_summary(r)
            if not self.budget.take(peer, len(ranges)):
                return wire.error("busy: sync budget for this peer is spent, retry later")
            return await asyncio.to_thread(self._answer, ranges)
        if kind == Msg.GET:
            ids = wire.read_ids(r)
            if not self.budget.take(peer, len(ids)):
                return wire.error("busy: sync budget for this peer is spent, retry later")
            records = await asyncio.to_thread(self.store.get_receipts, ids)
            return wire.items(Msg.RECORDS, [x.to_bytes() for x in records])
        if kind == Msg.SIGNED_IDS:  # reconciliation of evidence and bonds: our ids, they pull what they lack
            which, theirs = wire.read_signed_ids(r)
            if not self.budget.take(peer, 1 + len(theirs) // 64):
                return wire.error("busy: sync budget for this peer is spent, retry later")
            return wire.signed_ids(Msg.SIGNED_IDS, which, await asyncio.to_thread(signed_ids, self.store, which))
        if kind == Msg.SIGNED_GET:
            which, ids = wire.read_signed_ids(r, max(GET_LIMIT.values()))
            if len(ids) > GET_LIMIT[which]:
                return wire.error(f"at most {GET_LIMIT[which]} {which.name.lower()} records per SIGNED_GET")
            if not self.budget.take(peer, len(ids)):
                return wire.error("busy: sync budget for this peer is spent, retry later")
            records = await asyncio.to_thread(signed_records, self.store, which, ids)
            return wire.evidence(records) if which == SignedSet.EVIDENCE else wire.bonds(records)
        if kind == Msg.PUT:
            raw = wire.read_receipts(r)
            if not self.budget.take(peer, len(raw)):
                return wire.error("busy: sync budget for this peer is spent, retry later")
            result = await ingest_async(self.store, raw)
            return wire.put_reply(result.accepted, [(i, reason) for i, _, reason in result.refused])
        return wire.error(f"unexpected message {kind.name}")

    def _answer(self, ranges) -> bytes:
        mine = self.id_set()
        statuses = []
        sent = 0
        for depth, prefix, count, fp in ranges:
            n, my_fp = mine.summary(depth, prefix)
            if (n, my_fp) == (count, fp):
                statuses.append((Status.EQUAL, []))
            elif (n <= IDS_THRESHOLD or depth == wire.MAX_DEPTH or (count == 0 and n <= wire.MAX_IDS)) and sent + n <= MAX_IDS_PER_REPLY:
                statuses.append((Status.IDS, mine.in_range(depth, prefix)))
                sent += n
            else:
                statuses.append((Status.SPLIT, []))
        return wire.summary_reply(statuses)


async def _window(coros: list, width: int = IN_FLIGHT) -> None:
    """Run ``coros`` with at most ``width`` at a time, in order of start."""
    gate = asyncio.Semaphore(width)

    async def gated(coro) -> None:
        async with gate:
            await coro

    await asyncio.gather(*(gated(c) for c in coros))


def _within(rid: bytes, depth: int, prefix: int) -> bool:
    return depth == 0 or int.from_bytes(rid, "big") >> (256 - 4 * depth) == prefix


# -- initiator ---------------------------------------------------------------------------------
@dataclass
class SyncReport:
    pulled: int = 0
    pushed: int = 0
    refused_by_us: list[tuple[str, str]] = field(default_factory=list)  # (id hex, reason)
    refused_by_peer: list[str] = field(default_factory=list)
    rounds: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    seconds: float = 0.0
    evidence: int = 0  # evidence records received that verified and were new here
    bonds: int = 0  # bonds likewise

    def to_dict(self) -> dict:
        return {"pulled": self.pulled, "pushed": self.pushed, "refused_by_us": len(self.refused_by_us),
                "refused_by_peer": len(self.refused_by_peer), "rounds": self.rounds, "bytes_sent": self.bytes_sent,
                "bytes_received": self.bytes_received, "seconds": round(self.seconds, 3), "evidence": self.evidence,
                "bonds": self.bonds,
                "reasons": sorted({r for _, r in self.refused_by_us} | set(self.refused_by_peer))[:10]}


async def sync_with(request: Request, store: LedgerStore) -> SyncReport:
    """Reconcile our receipts with a peer's, pull what we lack and push what it lacks."""
    report = SyncReport()
    t0 = time.perf_counter()

    async def call(payload: bytes, expect: Msg) -> wire.Reader:
        report.bytes_sent += len(payload)
        reply = await request(payload)
        report.bytes_received += len(reply)
        try:
            kind, r = wire.unpack(reply)
        except EncodingError as exc:
            raise SyncError(f"peer sent a malformed reply: {exc.reason}") from None
        if kind == Msg.ERROR:
            raise SyncError(f"peer refused: {r.take(len(r.data)).decode('utf-8', 'replace')}")
        if kind != expect:
            raise SyncError(f"peer answered {kind.name}, expected {expect.name}")
        return r

    try:  # evidence is gossiped, not reconciled: each side sends its most recent (docs/accountability.md)
        r = await call(wire.evidence(await asyncio.to_thread(recent_evidence, store)), Msg.EVIDENCE)
        report.evidence = await ingest_evidence(store, wire.read_evidence(r))
    except (SyncError, EncodingError) as exc:  # an agent from before evidence, or junk: receipts still count
        log.info("no evidence exchanged: %s", getattr(exc, "reason", exc))
    try:  # bonds too: gossiped, each self-verifying
        r = await call(wire.bonds(await asyncio.to_thread(recent_bonds, store)), Msg.BONDS)
        report.bonds = await ingest_bonds(store, wire.read_bonds(r))
    except (SyncError, EncodingError) as exc:
        log.info("no bonds exchanged: %s", getattr(exc, "reason", exc))
    for which in SignedSet:  # then whatever older ones the peer holds and we lack
        try:
            n = await reconcile_signed(call, store, which)
        except (SyncError, EncodingError) as exc:
            log.info("no %s reconciled: %s", which.name.lower(), getattr(exc, "reason", exc))
            continue
        if which == SignedSet.EVIDENCE:
            report.evidence += n
        else:
            report.bonds += n
    mine = await asyncio.to_thread(IdSet, store.receipt_ids())
    need: list[bytes] = []
    have: list[bytes] = []
    pending = [(0, 0)]
    while pending:
        report.rounds += 1
        if report.rounds > SYNC_ROUNDS * 64:
            raise SyncError("reconciliation does not converge")
        batch, pending = pending[:wire.MAX_RANGES], pending[wire.MAX_RANGES:]
        ranges = [(d, p, *mine.summary(d, p)) for d, p in batch]
        r = await call(wire.summary(ranges), Msg.SUMMARY_REPLY)
        try:
            statuses = wire.read_summary_reply(r, len(ranges))
        except EncodingError as exc:
            raise SyncError(f"peer sent a malformed summary reply: {exc.reason}") from None
        for (depth, prefix), (status, ids) in zip(batch, statuses):
            if status == Status.IDS:
                ours = mine.in_range(depth, prefix)
                theirs, known = set(ids), set(ours)
                need += [i for i in theirs if i not in known and _within(i, depth, prefix)]
                have += [i for i in ours if i not in theirs]
            elif status == Status.SPLIT:
                if depth >= wire.MAX_DEPTH:
                    raise SyncError("peer asked to split a range past the maximum depth")
                pending += [(depth + 1, (prefix << 4) | k) for k in range(16)]

    async def pull(i: int) -> None:
        want = set(need[i:i + wire.MAX_RECORDS])
        r = await call(wire.pack(Msg.GET, len(want).to_bytes(4, "little") + b"".join(sorted(want))), Msg.RECORDS)
        try:
            raw = wire.read_receipts(r)
        except EncodingError as exc:
            raise SyncError(f"peer sent malformed records: {exc.reason}") from None
        ids = [record_id(x[:RECEIPT.size]) for x in raw]
        asked = [x for x, rid in zip(raw, ids) if rid in want]
        report.refused_by_us += [(rid.hex(), "not requested") for rid in ids if rid not in want]
        report.refused_by_us += [(rid.hex(), "requested but not sent") for rid in want.difference(ids)]
        result = await ingest_async(store, asked)
        report.pulled += result.accepted
        report.refused_by_us += [(rid, reason) for _, rid, reason in result.refused]

    async def push(i: int) -> None:
        records = await asyncio.to_thread(store.get_receipts, have[i:i + wire.MAX_RECORDS])
        r = await call(wire.items(Msg.PUT, [x.to_bytes() for x in records]), Msg.PUT_REPLY)
        try:
            accepted, refused = wire.read_put_reply(r)
        except EncodingError as exc:
            raise SyncError(f"peer sent a malformed put reply: {exc.reason}") from None
        report.pushed += accepted
        report.refused_by_peer += [reason for _, reason in refused]

    # two batches in flight each way: one transfers while the other is verified
    await asyncio.gather(_window([pull(i) for i in range(0, len(need), wire.MAX_RECORDS)]),
                         _window([push(i) for i in range(0, len(have), wire.MAX_RECORDS)]))
    report.seconds = time.perf_counter() - t0
    return report
