"""The ledger database: sqlite-utils on SQLite in WAL mode, one file per agent.

Why a writer thread: the event loop never waits for the disk. ``add()`` queues rows and
returns a future; one thread commits whatever has queued up in a single transaction (so
thousands of receipts cost one fsync-free WAL append), then resolves the futures: a
resolved future means *stored* (it survives a kill -9 of the process). Readers use their
own connections (WAL lets them run beside the writer).

Signed rows are append-only (triggers refuse UPDATE, and DELETE of receipts); the schema
is versioned by ``PRAGMA user_version`` with forward-only migrations. Retention keeps the
database under ``max_bytes`` by pruning the oldest commitments that are neither a chain
head nor referenced by a receipt (unsampled ones before the ones sampled for audit).
"""

from __future__ import annotations

import concurrent.futures
import queue
import sqlite3
import threading
import time
from pathlib import Path
from typing import Iterable, Iterator

import sqlite_utils

from edge_agent.ledger.encoding import RECEIPT_WIRE_SIZE, EncodingError
from edge_agent.ledger.records import Commitment, Receipt

DB_FILE = "ledger.db"
MAX_BATCH_ROWS = 20000
PRUNE_CHECK_S = 1.0
AUDIT_SAMPLE = 16  # one commitment in 16 (by id) is kept for audits until last


def _v1(db: sqlite_utils.Database) -> None:
    db["identities"].create({"agent_id": str, "first_seen_ms": int}, pk="agent_id")
    db["receipts"].create({"id": bytes, "request_id": str, "node": str, "client": str, "layer_start": int,
                           "layer_end": int, "steps": int, "chain_head": bytes, "ended_ms": int, "body": bytes,
                           "node_sig": bytes, "client_sig": bytes, "stored_ms": int}, pk="id")
    db["receipts"].create_index(["request_id", "node", "layer_start", "layer_end"], unique=True)
    db["receipts"].create_index(["node"])
    db["receipts"].create_index(["client"])
    db["receipts"].create_index(["chain_head"])
    db["commitments"].create({"id": bytes, "request_id": str, "node": str, "layer_start": int, "layer_end": int,
                              "chunk": int, "step_start": int, "step_end": int, "prev": bytes, "audit": int,
                              "body": bytes, "signature": bytes, "stored_ms": int}, pk="id")
    db["commitments"].create_index(["request_id", "node"])
    db["commitments"].create_index(["prev"])
    db["commitments"].create_index(["audit", "stored_ms"])
    for table, ops in (("receipts", ("UPDATE", "DELETE")), ("commitments", ("UPDATE",))):
        for op in ops:
            db.execute(f"CREATE TRIGGER {table}_no_{op.lower()} BEFORE {op} ON {table} "
                       f"BEGIN SELECT RAISE(ABORT, '{table} are append-only'); END")


def _v2(db: sqlite_utils.Database) -> None:
    """Room for the verification issue: stake bonds, evidence and reputation."""
    db["bonds"].create({"id": bytes, "agent_id": str, "amount": int, "body": bytes, "signature": bytes,
                        "stored_ms": int}, pk="id")
    db["evidence"].create({"id": bytes, "kind": str, "accused": str, "body": bytes, "stored_ms": int}, pk="id")
    db["reputation"].create({"agent_id": str, "score": float, "updated_ms": int}, pk="agent_id")


def _v3(db: sqlite_utils.Database) -> None:
    """Settings that outlive a command line: ``max_mb`` from ``--ledger-max-mb``."""
    db["settings"].create({"key": str, "value": str}, pk="key")


MIGRATIONS = (_v1, _v2, _v3)
SCHEMA_VERSION = len(MIGRATIONS)


def _connect(path: Path) -> sqlite_utils.Database:
    conn = sqlite3.connect(str(path), timeout=30.0, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA busy_timeout = 30000")
    db = sqlite_utils.Database(conn)
    return db


def migrate(db: sqlite_utils.Database) -> int:
    """Bring the schema to SCHEMA_VERSION, one transaction per step; returns the version found."""
    found = db.execute("PRAGMA user_version").fetchone()[0]
    if found > SCHEMA_VERSION:
        raise RuntimeError(f"ledger schema v{found} is newer than this edge-agent (v{SCHEMA_VERSION})")
    if found == 0:
        db.execute("PRAGMA auto_vacuum = INCREMENTAL")  # must precede the first table
    db.execute("PRAGMA journal_mode = WAL")
    for version in range(found, SCHEMA_VERSION):
        with db.conn:
            db.execute("BEGIN IMMEDIATE")
            if db.execute("PRAGMA user_version").fetchone()[0] == version:  # another process may have done it
                MIGRATIONS[version](db)
                db.execute(f"PRAGMA user_version = {version + 1}")
    return found


def receipt_row(r: Receipt, now_ms: int) -> dict:
    f = r.fields
    return {"id": r.id, "request_id": f.request_id.hex(), "node": f.node.hex(), "client": f.client.hex(),
            "layer_start": f.layer_start, "layer_end": f.layer_end, "steps": f.steps, "chain_head": f.chain_head,
            "ended_ms": f.ended_ms, "body": r.body, "node_sig": r.node_sig, "client_sig": r.client_sig, "stored_ms": now_ms}


def commitment_row(c: Commitment, now_ms: int) -> dict:
    f = c.fields
    return {"id": c.id, "request_id": f.request_id.hex(), "node": f.node.hex(), "layer_start": f.layer_start,
            "layer_end": f.layer_end, "chunk": f.chunk, "step_start": f.step_start, "step_end": f.step_end,
            "prev": f.prev, "audit": int(c.id[0] < 256 // AUDIT_SAMPLE), "body": c.body, "signature": c.signature,
            "stored_ms": now_ms}


def receipt_from_row(row: dict) -> Receipt:
    return Receipt(row["body"], row["node_sig"], row["client_sig"])


def commitment_from_row(row: dict) -> Commitment:
    return Commitment(row["body"], row["signature"])


class LedgerStore:
    """The Python API the CLI mirrors. Thread-safe; ``add`` never blocks on disk."""

    def __init__(self, path: Path, max_bytes: int | None = None) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        setup = _connect(self.path)
        try:
            migrate(setup)
            if max_bytes is not None:  # remembered: `join` and `run` keep the bound a ledger command set
                setup["settings"].upsert({"key": "max_bytes", "value": str(max_bytes)}, pk="key")
            else:
                row = setup.execute("SELECT value FROM settings WHERE key = 'max_bytes'").fetchone()
                self.max_bytes = int(row[0]) if row else None
        finally:
            setup.conn.close()
        self._local = threading.local()
        self._queue: "queue.Queue[tuple[list[dict], list[dict], concurrent.futures.Future] | None]" = queue.Queue()
        self._last_prune_check = 0.0
        self.pruned = 0
        self.version = 0  # bumped after each commit: readers cache derived views by it
        self._writer = threading.Thread(target=self._write_loop, name="ledger-writer", daemon=True)
        self._writer.start()

    @classmethod
    def open(cls, data_dir: Path, max_mb: float | None = None) -> "LedgerStore":
        return cls(Path(data_dir) / DB_FILE, None if max_mb is None else int(max_mb * 2**20))

    # -- writing ----------------------------------------------------------------------------
    def add(self, receipts: Iterable[Receipt] = (), commitments: Iterable[Commitment] = (),
            evidence: Iterable = (), bonds: Iterable = ()) -> concurrent.futures.Future:
        """Queue records (already verified by the caller; ``evidence``: ``ledger.evidence.Evidence``,
        ``bonds``: ``ledger.stake.Bond``); the future resolves once committed."""
        now = int(time.time() * 1000)
        fut: concurrent.futures.Future = concurrent.futures.Future()
        if not self._writer.is_alive():
            fut.set_exception(RuntimeError("ledger is closed"))
            return fut
        self._queue.put(([receipt_row(r, now) for r in receipts], [commitment_row(c, now) for c in commitments], fut,
                         [e.row(now) for e in evidence], [b.row(now) for b in bonds]))
        return fut

    def _write_loop(self) -> None:
        db = _connect(self.path)
        db.execute("PRAGMA synchronous = NORMAL")  # WAL: a kill -9 loses nothing committed
        try:
            while True:
                item = self._queue.get()
                if item is None:
                    return
                batch = [item]
                n = len(item[0]) + len(item[1])
                while n < MAX_BATCH_ROWS:
                    try:
                        nxt = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if nxt is None:
                        self._queue.put(None)  # stop after this batch
                        break
                    batch.append(nxt)
                    n += len(nxt[0]) + len(nxt[1])
                self._commit(db, batch)
        finally:
            db.conn.close()

    def _commit(self, db: sqlite_utils.Database, batch) -> None:
        receipts = [r for rs, *_ in batch for r in rs]
        commitments = [c for _, cs, *_ in batch for c in cs]
        evidence = [e for item in batch for e in item[3]]
        bonds = [b for item in batch for b in item[4]]
        try:
            with db.conn:
                db.execute("BEGIN IMMEDIATE")
                if receipts:
                    db["receipts"].insert_all(receipts, ignore=True, batch_size=500)
                    now = receipts[0]["stored_ms"]
                    agents = {r["node"] for r in receipts} | {r["client"] for r in receipts}
                    db["identities"].insert_all(({"agent_id": a, "first_seen_ms": now} for a in agents), ignore=True)
                if commitments:
                    db["commitments"].insert_all(commitments, ignore=True, batch_size=500)
                if evidence:
                    db["evidence"].insert_all(evidence, ignore=True)
                if bonds:
                    db["bonds"].insert_all(bonds, ignore=True)
        except Exception as exc:  # noqa: BLE001 - every waiter must hear about it
            for item in batch:
                item[2].set_exception(exc)
            return
        self.version += 1
        for item in batch:
            item[2].set_result(None)
        if self.max_bytes is not None and time.monotonic() - self._last_prune_check > PRUNE_CHECK_S:
            self._last_prune_check = time.monotonic()
            self._prune(db)

    def _prune(self, db: sqlite_utils.Database) -> None:
        """Drop old commitments (never a chain head or a receipt's head) until under the bound."""
        if self._used_bytes(db) <= self.max_bytes:
            return
        target = int(self.max_bytes * 0.9)  # some headroom, so we do not prune on every batch
        while self._used_bytes(db) > target:
            with db.conn:
                cur = db.execute(
                    "DELETE FROM commitments WHERE id IN (SELECT id FROM commitments WHERE id IN (SELECT prev FROM commitments) "
                    "AND id NOT IN (SELECT chain_head FROM receipts) ORDER BY audit, stored_ms LIMIT 2000)")
            if cur.rowcount <= 0:
                break
            self.pruned += cur.rowcount
        db.execute("PRAGMA incremental_vacuum")

    @staticmethod
    def _used_bytes(db: sqlite_utils.Database) -> int:
        page = db.execute("PRAGMA page_size").fetchone()[0]
        pages = db.execute("PRAGMA page_count").fetchone()[0] - db.execute("PRAGMA freelist_count").fetchone()[0]
        return page * pages

    def flush(self, timeout: float | None = 30.0) -> None:
        """Wait until everything queued so far is committed."""
        self.add().result(timeout)

    def close(self) -> None:
        if self._writer.is_alive():
            self._queue.put(None)
            self._writer.join(30.0)
        db = getattr(self._local, "db", None)
        if db is not None:
            db.conn.close()
            self._local.db = None

    # -- reading ----------------------------------------------------------------------------
    @property
    def db(self) -> sqlite_utils.Database:
        """This thread's read connection."""
        db = getattr(self._local, "db", None)
        if db is None:
            db = self._local.db = _connect(self.path)
        return db

    def receipts(self, peer: str | None = None, request: str | None = None, limit: int | None = None) -> list[dict]:
        where, args = [], []
        if peer:
            where.append("(node LIKE ? OR client LIKE ?)")
            args += [peer + "%", peer + "%"]
        if request:
            where.append("request_id LIKE ?")
            args.append(request + "%")
        return list(self.db["receipts"].rows_where(" AND ".join(where) or None, args, order_by="ended_ms, id", limit=limit))

    def commitments(self, request: str | None = None, node: str | None = None) -> list[dict]:
        where, args = [], []
        for col, value in (("request_id", request), ("node", node)):
            if value:
                where.append(f"{col} = ?")
                args.append(value)
        return list(self.db["commitments"].rows_where(" AND ".join(where) or None, args, order_by="request_id, node, layer_start, chunk"))

    def evidence(self, accused: str | None = None) -> list[dict]:
        """Stored evidence rows (id, kind, accused, body, stored_ms), oldest first."""
        return list(self.db["evidence"].rows_where("accused = ?" if accused else None, [accused] if accused else [],
                                                   order_by="stored_ms, id"))

    def bonds(self, agent: str | None = None) -> list[dict]:
        """Stored bond rows (id, agent_id, amount, body, signature, stored_ms), oldest first."""
        return list(self.db["bonds"].rows_where("agent_id = ?" if agent else None, [agent] if agent else [],
                                                order_by="stored_ms, id"))

    def receipt_ids(self) -> list[bytes]:
        """Every receipt id, sorted (the set that sync reconciles)."""
        return [row[0] for row in self.db.execute("SELECT id FROM receipts ORDER BY id")]

    def get_receipts(self, ids: list[bytes]) -> list[Receipt]:
        """Receipts by id; a row too damaged to send (wrong sizes) is left out."""
        out = []
        for i in range(0, len(ids), 500):
            part = ids[i:i + 500]
            sql = f"SELECT body, node_sig, client_sig FROM receipts WHERE id IN ({','.join('?' * len(part))})"
            out += [Receipt(*row) for row in self.db.execute(sql, part) if len(b"".join(row)) == RECEIPT_WIRE_SIZE]
        return out

    def existing(self, table: str, ids: list[bytes]) -> set[bytes]:
        found: set[bytes] = set()
        for i in range(0, len(ids), 500):
            part = ids[i:i + 500]
            found.update(r[0] for r in self.db.execute(f"SELECT id FROM {table} WHERE id IN ({','.join('?' * len(part))})", part))
        return found

    def receipt_keys(self, receipts: list[Receipt]) -> set[tuple]:
        """(request, node, start, end) keys already held: a second receipt for one is a conflict."""
        held = set()
        for r in receipts:
            f = r.fields
            row = self.db.execute("SELECT 1 FROM receipts WHERE request_id = ? AND node = ? AND layer_start = ? AND layer_end = ?",
                                  [f.request_id.hex(), f.node.hex(), f.layer_start, f.layer_end]).fetchone()
            if row:
                held.add((f.request_id, f.node, f.layer_start, f.layer_end))
        return held

    def stats(self) -> dict:
        db = self.db
        count = {t: db[t].count for t in ("receipts", "commitments", "identities")}
        heads = db.execute("SELECT COUNT(*) FROM commitments WHERE id NOT IN (SELECT prev FROM commitments)").fetchone()[0]
        return {"path": str(self.path), "schema_version": db.execute("PRAGMA user_version").fetchone()[0],
                "bytes": self.path.stat().st_size, "used_bytes": self._used_bytes(db), "max_bytes": self.max_bytes,
                **count, "chain_heads": heads,
                "journal_mode": db.execute("PRAGMA journal_mode").fetchone()[0]}

    def iter_rows(self, table: str) -> Iterator[dict]:
        yield from self.db[table].rows_where(order_by="stored_ms, id")

    def verify(self) -> list[tuple[str, str, str]]:
        """Re-check every signature, every denormalized column and every chain link.

        Returns (table, id hex, reason) for each bad row; empty means the ledger is sound.
        """
        from edge_agent.ledger.encoding import record_id

        bad: list[tuple[str, str, str]] = []
        by_id: dict[bytes, dict] = {}
        for row in self.iter_rows("commitments"):
            reason = _row_problem(row, commitment_from_row, commitment_row, record_id)
            if reason:
                bad.append(("commitments", row["id"].hex(), reason))
            else:
                by_id[row["id"]] = row
        for cid, row in by_id.items():
            f = commitment_from_row(row).fields
            prev = by_id.get(f.prev)
            if prev is not None:
                if _breaks_chain(commitment_from_row(prev).fields, f, f.chunk):
                    bad.append(("commitments", cid.hex(), "chain link points at another chain or chunk"))
        for row in self.iter_rows("receipts"):
            reason = _row_problem(row, receipt_from_row, receipt_row, record_id)
            if reason is None:
                f = receipt_from_row(row).fields
                head = by_id.get(f.chain_head)
                if head is not None:
                    if _breaks_chain(commitment_from_row(head).fields, f, f.chunks):
                        reason = "chain head is not this receipt's last commitment"
            if reason:
                bad.append(("receipts", row["id"].hex(), reason))
        bad += _signed_rows_problems(self)
        return bad


def _signed_rows_problems(store: LedgerStore) -> list[tuple[str, str, str]]:
    """Evidence and bonds: each proves itself; its columns must be what its bytes say."""
    from edge_agent.ledger.evidence import Evidence
    from edge_agent.ledger.stake import Bond

    bad = []
    for row in store.iter_rows("evidence"):
        ev = Evidence(row["body"])
        reason = ev.problem() or ("columns differ from the record" if (ev.id, ev.accused) != (row["id"], row["accused"]) else None)
        if reason:
            bad.append(("evidence", row["id"].hex(), reason))
    for row in store.iter_rows("bonds"):
        bond = Bond(row["body"], row["signature"])
        reason = bond.problem() or ("columns differ from the record"
                                    if (bond.id, bond.agent_id, bond.fields[1]) != (row["id"], row["agent_id"], row["amount"]) else None)
        if reason:
            bad.append(("bonds", row["id"].hex(), reason))
    return bad


def _breaks_chain(before, after, position: int) -> bool:
    """False when ``before`` (a commitment) is not chunk ``position - 1`` of ``after``'s chain."""
    key = lambda x: (x.request_id, x.node, x.layer_start, x.layer_end)  # noqa: E731
    return key(before) != key(after) or before.chunk + 1 != position


def _row_problem(row: dict, from_row, to_row, record_id) -> str | None:
    try:
        rec = from_row(row)
        problem = rec.problem()
    except (EncodingError, TypeError) as exc:
        return f"malformed: {exc}"
    if problem:
        return problem
    if record_id(rec.body) != row["id"]:
        return "id is not the hash of the body"
    expected = to_row(rec, row["stored_ms"])
    for col, value in expected.items():
        if row.get(col) != value:
            return f"column {col} does not match the signed body"
    return None
