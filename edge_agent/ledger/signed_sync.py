"""Evidence and stake bonds between agents: each record proves itself, so sync just moves them.

Two ways, both bounded: **gossip** (every sync sends the most recent records each way:
``EVIDENCE``, ``BONDS``) carries news fast, and **reconciliation** (``SIGNED_IDS``: the ids
each side holds; ``SIGNED_GET``: the records one lacks) makes an agent whole with a peer,
however old the records. Every record is verified before it is stored.
"""

from __future__ import annotations

import asyncio

from edge_agent.ledger import wire
from edge_agent.ledger.encoding import EncodingError
from edge_agent.ledger.store import LedgerStore
from edge_agent.ledger.wire import Msg, SignedSet


async def _ingest_signed(store: LedgerStore, table: str, records: list) -> int:
    """Store the records that verify (each is signed by whom it speaks for); returns how many were new."""
    def fresh() -> list:
        good = {x.id: x for x in records if x.problem() is None}
        held = store.existing(table, list(good))
        return [x for i, x in good.items() if i not in held]

    new = await asyncio.to_thread(fresh)
    if new:
        await asyncio.wrap_future(store.add(**{table: new}))
    return len(new)


async def ingest_evidence(store: LedgerStore, raw: list[bytes]) -> int:
    from edge_agent.ledger.evidence import Evidence

    return await _ingest_signed(store, "evidence", [Evidence(x) for x in raw])


def _newest(store: LedgerStore, columns: str, table: str, n: int) -> list[bytes]:
    """The wire bytes of a table's ``n`` newest records, oldest first (only those are read: every sync asks)."""
    rows = store.db.execute(f"SELECT {columns} FROM {table} ORDER BY rowid DESC LIMIT ?", [n]).fetchall()
    return [b"".join(row) for row in reversed(rows)]


def recent_bonds(store: LedgerStore) -> list[bytes]:
    return _newest(store, "body, signature", "bonds", wire.MAX_BONDS)


async def ingest_bonds(store: LedgerStore, raw: list[bytes]) -> int:
    from edge_agent.ledger.stake import Bond

    return await _ingest_signed(store, "bonds", [Bond.from_bytes(x) for x in raw])


_TABLES = {SignedSet.EVIDENCE: "evidence", SignedSet.BONDS: "bonds"}
GET_LIMIT = {SignedSet.EVIDENCE: wire.MAX_EVIDENCE, SignedSet.BONDS: wire.MAX_BONDS}  # records per reply


def signed_ids(store: LedgerStore, which: SignedSet) -> list[bytes]:
    """Ids of a self-verifying set, the newest ``MAX_SIGNED_IDS``."""
    rows = store.db.execute(f"SELECT id FROM {_TABLES[which]} ORDER BY rowid DESC LIMIT ?", [wire.MAX_SIGNED_IDS])
    return [row[0] for row in rows]


def signed_records(store: LedgerStore, which: SignedSet, ids: list[bytes]) -> list[bytes]:
    """The wire bytes of those records (an evidence record; a bond's body + signature)."""
    if not ids:
        return []
    marks = ",".join("?" * len(ids))
    if which == SignedSet.EVIDENCE:
        return [row[0] for row in store.db.execute(f"SELECT body FROM evidence WHERE id IN ({marks})", ids)]
    return [row[0] + row[1] for row in store.db.execute(f"SELECT body, signature FROM bonds WHERE id IN ({marks})", ids)]


async def reconcile_signed(call, store: LedgerStore, which: SignedSet) -> int:
    """Pull every evidence record (or bond) the peer holds and we lack; returns how many were new.
    Gossip pushes the recent ones; this makes an agent whole with a peer, however old."""
    mine = await asyncio.to_thread(signed_ids, store, which)
    r = await call(wire.signed_ids(Msg.SIGNED_IDS, which, mine), Msg.SIGNED_IDS)
    got, theirs = wire.read_signed_ids(r)
    if got != which:
        raise EncodingError(f"peer answered about set {got.name}, asked {which.name}")
    held = set(mine)
    want = [i for i in dict.fromkeys(theirs) if i not in held]
    new, step = 0, GET_LIMIT[which]
    reply = Msg.EVIDENCE if which == SignedSet.EVIDENCE else Msg.BONDS
    for i in range(0, len(want), step):
        r = await call(wire.signed_ids(Msg.SIGNED_GET, which, want[i:i + step]), reply)
        raw = wire.read_evidence(r) if which == SignedSet.EVIDENCE else wire.read_bonds(r)
        new += await (ingest_evidence if which == SignedSet.EVIDENCE else ingest_bonds)(store, raw)
    return new


def recent_evidence(store: LedgerStore) -> list[bytes]:
    return _newest(store, "body", "evidence", wire.MAX_EVIDENCE)
