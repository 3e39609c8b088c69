"""Ledger sync between real agents (separate processes, real TLS, real SQLite)."""

from __future__ import annotations

import asyncio
import os
import sqlite3

import pytest

from edge_agent.discovery.identity import Identity, SwarmKey
from edge_agent.ledger import wire
from edge_agent.ledger.service import ChannelRequester, sync_peer
from edge_agent.ledger.store import DB_FILE, LedgerStore
from edge_agent.ledger.sync import Budget, IdSet
from edge_agent.transport import tls
from ledger_util import make_receipt, start_ledger_agent

NODE, CLIENT = Identity.generate(), Identity.generate()


@pytest.fixture
def agents():
    started = []

    def start(data_dir, *extra):
        started.append(start_ledger_agent(data_dir, *extra))
        return started[-1]

    yield start
    for a in started:
        a.stop()


def _sync(me_dir, store, port):
    return asyncio.run(sync_peer(Identity.load_or_create(me_dir), SwarmKey(None), "127.0.0.1", port, store))


def _ids(path) -> set[bytes]:
    db = sqlite3.connect(path / DB_FILE)
    try:
        return {r[0] for r in db.execute("SELECT id FROM receipts")}
    finally:
        db.close()


@pytest.mark.slow
def test_100k_receipts_both_ways_then_a_second_sync_moves_almost_nothing(tmp_path, agents):
    receipts = [make_receipt(NODE, CLIENT, i) for i in range(100_000)]
    theirs, mine = LedgerStore.open(tmp_path / "a"), LedgerStore.open(tmp_path / "b")
    theirs.add(receipts=receipts[:52_000]).result()  # 4k in common, 48k on each side only
    mine.add(receipts=receipts[48_000:]).result()
    theirs.close()
    agent = agents(tmp_path / "a")
    try:
        first = _sync(tmp_path / "b", mine, agent.ready["tls_port"])
        assert (first.pulled, first.pushed, first.refused_by_us, first.refused_by_peer) == (48_000, 48_000, [], [])
        second = _sync(tmp_path / "b", mine, agent.ready["tls_port"])
        assert (second.pulled, second.pushed) == (0, 0)
        moved = lambda r: r.bytes_sent + r.bytes_received  # noqa: E731
        assert moved(second) < 0.01 * moved(first), (moved(first), moved(second))
        mine.flush()
    finally:
        mine.close()
        agent.stop()
    assert _ids(tmp_path / "a") == _ids(tmp_path / "b") == {r.id for r in receipts}


def _ledger_with(path, n: int) -> list:
    receipts = [make_receipt(NODE, CLIENT, i) for i in range(n)]
    store = LedgerStore.open(path)
    store.add(receipts=receipts).result()
    store.close()
    return receipts


def _plant_bad_rows(path):
    """Rows an attacker wrote into their own ledger file: tampered, forged, malformed."""
    db = sqlite3.connect(path / DB_FILE)
    for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'trigger'").fetchall():
        db.execute(f"DROP TRIGGER {name}")
    rows = db.execute("SELECT rowid, node_sig, client_sig, body FROM receipts ORDER BY rowid DESC LIMIT 3").fetchall()
    tampered = bytearray(rows[0][1])
    tampered[5] ^= 1
    db.execute("UPDATE receipts SET node_sig = ? WHERE rowid = ?", (bytes(tampered), rows[0][0]))
    forger = Identity.generate()  # claims NODE did the work, signs with its own key
    db.execute("UPDATE receipts SET node_sig = ? WHERE rowid = ?", (forger.sign(b"edge-agent receipt/node\n" + rows[1][3]), rows[1][0]))
    db.execute("UPDATE receipts SET body = ? WHERE rowid = ?", (rows[2][3][:100], rows[2][0]))
    db.commit()
    db.close()


def test_bad_records_are_refused_with_reasons_and_the_rest_goes_through(tmp_path, agents):
    _ledger_with(tmp_path / "a", 300)
    _plant_bad_rows(tmp_path / "a")
    agent = agents(tmp_path / "a")
    mine = LedgerStore.open(tmp_path / "b")
    try:
        report = _sync(tmp_path / "b", mine, agent.ready["tls_port"])
        reasons = sorted(reason for _, reason in report.refused_by_us)
        assert report.pulled == 297 and len(reasons) == 3, reasons
        assert sum("bad node signature" in r for r in reasons) == 2
        assert sum("requested but not sent" in r for r in reasons) == 1  # too damaged to send at all
        assert mine.verify() == []
        # push direction: our own tampered rows are refused by the peer, one by one
        extra = [make_receipt(NODE, CLIENT, 1000 + i) for i in range(20)]
        mine.add(receipts=extra).result()
        mine.close()
        _plant_bad_rows(tmp_path / "b")
        mine = LedgerStore.open(tmp_path / "b")
        report = _sync(tmp_path / "b", mine, agent.ready["tls_port"])
        assert report.pushed == 17 and len(report.refused_by_peer) == 2, report.to_dict()  # the damaged row is not sent
    finally:
        mine.close()


def test_a_junk_peer_gets_errors_and_the_agent_keeps_serving(tmp_path, agents):
    good = _ledger_with(tmp_path / "a", 50)
    agent = agents(tmp_path / "a")
    port = agent.ready["tls_port"]

    async def attack() -> list[bytes]:
        ch = await tls.connect(Identity.generate(), SwarmKey(None), "127.0.0.1", port)
        ask = ChannelRequester(ch, timeout_s=20)
        replies = []
        for payload in [os.urandom(64), wire.MAGIC + b"\xff", wire.pack(wire.Msg.PUT, (10**9).to_bytes(4, "little")),
                        wire.pack(wire.Msg.GET, (3).to_bytes(4, "little") + os.urandom(10)),
                        wire.pack(wire.Msg.SUMMARY, b"\x01\x00" + bytes([17]) + bytes(28)),
                        wire.items(wire.Msg.PUT, [os.urandom(332) for _ in range(500)]),
                        wire.items(wire.Msg.PUT, [good[0].to_bytes()])]:
            replies.append(await ask(payload))
        ask.close()
        await ch.close()
        return replies

    replies = asyncio.run(attack())
    kinds = [wire.unpack(r)[0] for r in replies]
    assert kinds[:5] == [wire.Msg.ERROR] * 5
    accepted, refused = wire.read_put_reply(wire.unpack(replies[5])[1])
    assert accepted == 0 and len(refused) == 500 and all("bad magic" in r for _, r in refused)
    accepted, refused = wire.read_put_reply(wire.unpack(replies[6])[1])
    assert accepted == 0 and refused == [(0, "duplicate: already held")]
    mine = LedgerStore.open(tmp_path / "b")
    try:
        assert _sync(tmp_path / "b", mine, port).pulled == 50  # still serving, ledger unharmed
    finally:
        mine.close()
    assert agent.proc.poll() is None


def test_budget_bounds_work_per_peer_and_refills():
    budget = Budget(per_minute=600)
    assert budget.take("a", 500) and not budget.take("a", 200) and budget.take("b", 600)


def test_id_ranges_split_evenly_and_fingerprints_agree():
    ids = sorted(os.urandom(32) for _ in range(1000))
    s = IdSet(ids)
    assert sum(s.bounds(1, k)[1] - s.bounds(1, k)[0] for k in range(16)) == 1000
    assert s.summary(0, 0) == IdSet(list(ids)).summary(0, 0) != IdSet(ids[1:]).summary(0, 0)
    assert s.in_range(2, 0x3a) == [i for i in ids if i[0] == 0x3a]


def test_background_sync_reaches_the_peers_it_is_given(tmp_path, agents):
    from edge_agent.ledger.background import Ledger

    good = _ledger_with(tmp_path / "a", 120)
    agent = agents(tmp_path / "a")
    peer = (agent.agent_id, "127.0.0.1", agent.ready["tls_port"])

    async def main() -> int:
        ledger = Ledger.open(tmp_path / "b", Identity.load_or_create(tmp_path / "b"), SwarmKey(None))
        ledger.start_sync(lambda: [peer, ("f" * 64, "127.0.0.1", 1)], interval_s=0.1)  # a dead peer is only logged
        try:
            for _ in range(600):  # 30 s at most: a loaded machine's first sync can take seconds
                await asyncio.sleep(0.05)
                if ledger.store.stats()["receipts"] == len(good):
                    break
            return ledger.syncs
        finally:
            await ledger.close()

    assert asyncio.run(main()) >= 1
    assert _ids(tmp_path / "b") == {r.id for r in good}
