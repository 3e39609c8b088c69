"""The SQLite ledger: append-only rows, migrations, tamper detection, retention, crashes, CLI."""

from __future__ import annotations

import json
import os
import random
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from edge_agent.discovery.identity import Identity
from edge_agent.ledger import store as store_mod
from edge_agent.ledger.store import DB_FILE, LedgerStore
from ledger_util import make_chain, make_receipt

NODE, CLIENT = Identity.generate(), Identity.generate()


def cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    res = subprocess.run([sys.executable, "-m", "edge_agent", "ledger", *args], capture_output=True, text=True, timeout=120)
    if check:
        assert res.returncode == 0, res.stderr
    return res


@pytest.fixture
def filled(tmp_path):
    """A ledger with a 3-chunk chain, its receipt, and a few unrelated receipts."""
    store = LedgerStore.open(tmp_path)
    rid = os.urandom(16)
    chain = make_chain(NODE, rid, 3)
    receipts = [make_receipt(NODE, CLIENT, 0, rid, chain[-1].id, 3)] + [make_receipt(NODE, CLIENT, i) for i in range(1, 5)]
    store.add(receipts=receipts, commitments=chain).result()
    yield store, receipts, chain
    store.close()


def test_rows_are_append_only(filled):
    store, receipts, _ = filled
    db = sqlite3.connect(store.path)
    for sql in ("UPDATE receipts SET steps = 1", "DELETE FROM receipts", "UPDATE commitments SET chunk = 9"):
        with pytest.raises(sqlite3.IntegrityError, match="append-only"):
            db.execute(sql)
    db.close()
    assert store.verify() == []


def test_migrations_bring_an_old_ledger_forward(tmp_path):
    path = tmp_path / DB_FILE
    old = store_mod._connect(path)
    old.execute("PRAGMA journal_mode = WAL")
    store_mod._v1(old)
    old.execute("PRAGMA user_version = 1")
    old["receipts"].insert(store_mod.receipt_row(make_receipt(NODE, CLIENT, 0), 1))
    old.conn.close()
    store = LedgerStore(path)
    try:
        assert store.stats()["schema_version"] == store_mod.SCHEMA_VERSION
        assert {"bonds", "evidence", "reputation"} <= set(store.db.table_names())
        assert store.stats()["receipts"] == 1 and store.verify() == []
    finally:
        store.close()


SIGNED_COLUMNS = {"receipts": ["id", "request_id", "node", "client", "layer_start", "layer_end", "steps", "chain_head",
                               "ended_ms", "body", "node_sig", "client_sig"],
                  "commitments": ["id", "request_id", "node", "layer_start", "layer_end", "chunk", "step_start", "step_end",
                                  "prev", "body", "signature"]}


def _flip_one_bit(value, rng: random.Random):
    if isinstance(value, bytes):
        b = bytearray(value)
        i = rng.randrange(len(b) * 8)
        b[i // 8] ^= 1 << (i % 8)
        return bytes(b)
    if isinstance(value, int):
        return value ^ (1 << rng.randrange(8))
    chars = list(value)  # hex text: change one digit's lowest bit
    i = rng.randrange(len(chars))
    chars[i] = format(int(chars[i], 16) ^ 1, "x")
    return "".join(chars)


@pytest.mark.parametrize("table", ["receipts", "commitments"])
def test_any_one_bit_change_of_a_signed_column_is_caught(tmp_path, filled, table):
    """An attacker with the file (triggers dropped) flips one bit: `ledger verify` names the row."""
    store, _, _ = filled
    store.close()
    rng = random.Random(7)
    for col in SIGNED_COLUMNS[table]:
        path = tmp_path / col / DB_FILE
        path.parent.mkdir()
        src = sqlite3.connect(store.path)
        dst = sqlite3.connect(path)
        src.backup(dst)
        src.close()
        for (name,) in dst.execute("SELECT name FROM sqlite_master WHERE type = 'trigger'").fetchall():
            dst.execute(f"DROP TRIGGER {name}")
        rowid, value = dst.execute(f"SELECT rowid, {col} FROM {table} ORDER BY rowid LIMIT 1 OFFSET 1").fetchone()
        dst.execute(f"UPDATE {table} SET {col} = ? WHERE rowid = ?", (_flip_one_bit(value, rng), rowid))
        dst.commit()
        dst.close()
        res = cli("verify", "--data-dir", str(path.parent), check=False)
        assert res.returncode == 1, (col, res.stdout)
        assert res.stdout.startswith(table), res.stdout
        assert len(res.stdout.strip().splitlines()) >= 1 and ": " in res.stdout


def test_retention_prunes_old_commitments_but_keeps_receipts_and_heads(tmp_path):
    store = LedgerStore.open(tmp_path, max_mb=0.5)
    try:
        heads, receipts = [], []
        for i in range(60):
            rid = os.urandom(16)
            chain = make_chain(NODE, rid, 40)
            heads.append(chain[-1].id)
            if i % 2 == 0:  # half the requests have a receipt naming their head
                receipts.append(make_receipt(NODE, CLIENT, i, rid, chain[-1].id, 40))
            store.add(commitments=chain, receipts=receipts[-1:] if i % 2 == 0 else []).result()
            store._last_prune_check = 0.0  # check the bound after every batch here
        store.flush()
        s = store.stats()
        assert store.pruned > 0 and s["used_bytes"] <= 0.5 * 2**20
        assert s["receipts"] == len(receipts)
        assert store.existing("commitments", heads) == set(heads)
        assert store.verify() == []
    finally:
        store.close()
    again = LedgerStore.open(tmp_path)  # the bound is remembered: `join` and `run` keep it
    assert again.max_bytes == int(0.5 * 2**20)
    again.close()


def test_kill_minus_9_during_heavy_writes_loses_nothing_acknowledged(tmp_path):
    """20 times: SIGKILL the writer at a random moment; the database is intact and every
    receipt it reported as stored is there."""
    rng = random.Random(1)
    acked: list[str] = []
    helper = Path(__file__).with_name("ledger_util.py")
    for _ in range(20):
        proc = subprocess.Popen([sys.executable, str(helper), str(tmp_path)], stdout=subprocess.PIPE, text=True,
                                env={**os.environ, "PYTHONPATH": str(helper.parent.parent)})
        lines: list[str] = []
        reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
        reader.start()
        deadline = time.monotonic() + 30
        while not lines and time.monotonic() < deadline:  # wait until it is writing, then a random moment more
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 0.4))
        proc.kill()
        proc.wait()
        reader.join(10)
        acked += [x.strip() for x in lines if len(x.strip()) == 64]  # a torn last line was never acknowledged
        db = sqlite3.connect(tmp_path / DB_FILE)
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        have = {r[0].hex() for r in db.execute("SELECT id FROM receipts")}
        db.close()
        missing = [x for x in acked if x not in have]
        assert not missing, f"{len(missing)} acknowledged receipts lost"
    assert len(acked) > 1000
    assert cli("verify", "--data-dir", str(tmp_path)).stdout.strip() == "ok"


def test_cli_show_stats_export_import(tmp_path, filled):
    store, receipts, chain = filled
    store.close()
    d = str(store.path.parent)
    rows = [json.loads(x) for x in cli("show", "--json", "--data-dir", d).stdout.splitlines()]
    assert {r["id"] for r in rows} == {r.id.hex() for r in receipts}
    one = cli("show", "--json", "--data-dir", d, "--request", receipts[0].fields.request_id.hex()[:10]).stdout.splitlines()
    assert len(one) == 1 and json.loads(one[0])["chunks"] == 3
    assert len(cli("show", "--data-dir", d, "--peer", NODE.agent_id[:12]).stdout.splitlines()) == 5
    assert cli("show", "--data-dir", d, "--peer", "ffff" * 4).stdout == ""
    stats = json.loads(cli("stats", "--json", "--data-dir", d).stdout)
    assert (stats["receipts"], stats["commitments"], stats["chain_heads"], stats["journal_mode"]) == (5, 3, 1, "wal")
    exported = tmp_path / "all.jsonl"
    cli("export", "--data-dir", d, "-o", str(exported))
    other = tmp_path / "other"
    assert "imported 5 receipts, refused 0" in cli("import", str(exported), "--data-dir", str(other)).stdout
    again = cli("import", str(exported), "--data-dir", str(other))  # duplicates only: refused, but not an error
    assert "refused 5" in again.stdout and "duplicate" in again.stdout
    # a tampered line and a junk line are refused with their reasons; the good line still goes in
    lines = exported.read_text().splitlines()
    rec = json.loads(lines[0])
    raw = bytearray.fromhex(rec["record"])
    raw[130] ^= 4
    rec["record"] = raw.hex()
    fresh = make_receipt(NODE, CLIENT, 99)
    good = json.dumps({"type": "receipt", "record": fresh.to_bytes().hex()})
    bad_file = tmp_path / "bad.jsonl"
    bad_file.write_text("\n".join([json.dumps(rec), "{not json", good]) + "\n")
    res = cli("import", str(bad_file), "--data-dir", str(other), check=False)
    assert res.returncode == 1
    assert "line 1: refused" in res.stdout and "line 2: refused" in res.stdout and "imported 1 receipts" in res.stdout
    assert cli("verify", "--data-dir", str(other)).stdout.strip() == "ok"
    assert cli("import", str(tmp_path / "nope.jsonl"), "--data-dir", str(other), check=False).returncode == 2
    missing = cli("verify", "--data-dir", str(tmp_path / "nowhere"), check=False)
    assert missing.returncode == 2 and "no ledger at" in missing.stderr and "Traceback" not in missing.stderr
