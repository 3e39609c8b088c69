"""Credits, stake, slashing and reputation from a real SQLite ledger of really signed records;
the same records give the same numbers on two agents, also after a real sync between them."""

from __future__ import annotations

import dataclasses
import json
import os
import random
import subprocess
import sys

import pytest

from edge_agent.discovery.identity import Identity
from edge_agent.ledger import accounts as acc
from edge_agent.ledger.accounts import Accounts, receipt_credits
from edge_agent.ledger.encoding import ZERO32, EncodingError, ReceiptBody
from edge_agent.ledger.evidence import Evidence
from edge_agent.ledger.records import Commitment, Receipt
from edge_agent.ledger.stake import Bond
from edge_agent.ledger.store import LedgerStore
from ledger_util import MODEL, make_chain, start_ledger_agent

NODE, HONEST, CLIENT, CLIENT2 = (Identity.generate() for _ in range(4))


def receipt(node: Identity, client: Identity, layers: int, steps: int, met: int, missed: int) -> Receipt:
    body = ReceiptBody(os.urandom(16), node.public_key, client.public_key, 1, 1 + layers, MODEL, steps, 0, ZERO32, met, missed,
                       0, 0, 0, 1_700_000_000_000)
    raw = Receipt.encode_body(body)
    return Receipt(raw, Receipt.node_signature(node, raw), Receipt.client_signature(client, raw))


def equivocation(node: Identity) -> Evidence:
    """Two different signed commitments for one chunk."""
    (a,) = make_chain(node, os.urandom(16), 1)
    return Evidence.equivocation(a, Commitment.sign(node, dataclasses.replace(a.fields, compute_us=999)))


def records():
    """A small economy: NODE and HONEST serve CLIENT and CLIENT2; HONEST bonds enough stake."""
    rs = [receipt(NODE, CLIENT, 10, 100, 90, 10) for _ in range(3)]  # 1000 layer-tokens each
    rs += [receipt(HONEST, CLIENT, 14, 10_000, 3000, 0), receipt(HONEST, CLIENT2, 14, 10_000, 3000, 0)]
    rs += [receipt(CLIENT, CLIENT, 1, 100, 0, 0)]  # the client's own layers: no credits
    bonds = [Bond.sign(HONEST, 100_000, 1), Bond.sign(HONEST, 60_000, 2), Bond.sign(NODE, 5_000, 3)]
    return rs, bonds, [equivocation(NODE)]


def stored(path, rs, bonds, evidence, shuffle_seed=None):
    items = [("r", x) for x in rs] + [("b", x) for x in bonds] + [("e", x) for x in evidence]
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(items)
    store = LedgerStore(path / "ledger.db")
    for kind, x in items:  # one record per write: any arrival order
        store.add(**{{"r": "receipts", "b": "bonds", "e": "evidence"}[kind]: [x]}).result(10)
    return store


def test_credits_stake_slashing_and_reputation_follow_the_documented_rules(tmp_path):
    rs, bonds, evidence = records()
    store = stored(tmp_path, rs, bonds, evidence)
    try:
        a = Accounts(store)
        node, honest, client = a.account(NODE.agent_id), a.account(HONEST.agent_id), a.account(CLIENT.agent_id)
    finally:
        store.close()
    assert receipt_credits(1000, 90, 10) == 1900 and receipt_credits(1000, 0, 0) == 1000
    assert node.earned == 3 * 1900 and node.layer_tokens == 3000
    assert honest.earned == 2 * receipt_credits(140_000, 3000, 0) == 560_000
    assert client.spent == 3 * 1900 + 280_000 and client.earned == 0  # its own layers earn nothing
    # HONEST: bonded 160,000 of 560,000 earned; staked, so its reputation may pass the newcomer's 0.5
    assert (honest.bonded, honest.stake, honest.offences, honest.slashed) == (160_000, 160_000, 0, 0)
    assert honest.stake >= acc.REQUIRED_STAKE and honest.reputation > 0.99
    # ... but each client counts for at most CLIENT_CAP decode steps: 2 x 2000 met
    assert honest.deadlines_met == 2 * acc.CLIENT_CAP
    # NODE equivocated once: its bond is forfeit, it pays SLASH_PER_OFFENCE, reputation 0
    assert (node.offences, node.stake, node.slashed) == (1, 0, 5_000 + acc.SLASH_PER_OFFENCE)
    assert node.balance == 3 * 1900 - 5_000 - acc.SLASH_PER_OFFENCE and node.reputation == 0.0
    assert a.reputation(Identity.generate().agent_id) is None  # never seen: the planner's default


def test_unstaked_nodes_stay_at_a_newcomers_reputation(tmp_path):
    store = LedgerStore(tmp_path / "ledger.db")
    try:
        store.add(receipts=[receipt(NODE, CLIENT, 4, 500, 500, 0)]).result(10)
        a = Accounts(store)
        assert a.account(NODE.agent_id).reputation == acc.UNSTAKED_CAP  # perfect deadlines, no stake
        store.add(receipts=[receipt(HONEST, CLIENT, 4, 200, 0, 200)]).result(10)
        slow = a.account(HONEST.agent_id)  # incremental refresh sees the new receipt
        assert slow.reputation == acc.MIN_REPUTATION  # 5/210 adherence: less preferred, never unroutable
        store.add(bonds=[Bond.sign(NODE, acc.REQUIRED_STAKE, 1)]).result(10)
        assert a.account(NODE.agent_id).stake == 4000 and a.account(NODE.agent_id).reputation == acc.UNSTAKED_CAP  # not earned
    finally:
        store.close()


def test_same_records_give_the_same_numbers_in_any_order(tmp_path):
    rs, bonds, evidence = records()
    views = []
    for seed in (1, 2, 3):
        (tmp_path / str(seed)).mkdir()
        store = stored(tmp_path / str(seed), rs, bonds, evidence, shuffle_seed=seed)
        try:
            views.append({k: v.to_dict() for k, v in Accounts(store).accounts().items()})
        finally:
            store.close()
    assert views[0] == views[1] == views[2] and len(views[0]) == 4


def test_bonds_refuse_tampering_and_bad_amounts():
    b = Bond.sign(NODE, 42, 7)
    assert b.problem() is None and Bond.from_bytes(b.to_bytes()) == b and b.fields == (NODE.public_key, 42, 7)
    raw = bytearray(b.to_bytes())
    raw[36] ^= 1  # the amount
    assert Bond.from_bytes(bytes(raw)).problem() == "bad bond signature"
    with pytest.raises(EncodingError, match="116 bytes"):
        Bond.from_bytes(b.to_bytes()[:-1])
    for bad in (0, -1, True, 10**16):
        with pytest.raises(ValueError, match="whole number of credits"):
            Bond.sign(NODE, bad, 1)


def test_balances_agree_after_a_real_sync_and_the_cli_shows_them(tmp_path):
    """Agent A holds the receipts and the evidence, B holds the bonds: after `ledger sync`
    (real TLS) both compute the same accounts; `ledger balance`/`reputation` print them."""
    rs, bonds, evidence = records()
    for name, kw in (("a", dict(receipts=rs, evidence=evidence)), ("b", dict(bonds=bonds))):
        s = LedgerStore((tmp_path / name) / "ledger.db")
        s.add(**kw).result(10)
        s.close()
    agent = start_ledger_agent(tmp_path / "a")
    try:
        cli = lambda *args: subprocess.run([sys.executable, "-m", "edge_agent", "ledger", *args], capture_output=True,  # noqa: E731
                                           text=True, timeout=120)
        out = cli("sync", "--peer", agent.address, "--data-dir", str(tmp_path / "b"))
        assert out.returncode == 0, out.stderr
        report = json.loads(out.stdout)
        assert report["pulled"] == len(rs) and report["evidence"] == 1 and report["bonds"] == 0
    finally:
        agent.stop()
    views = {}
    for name in ("a", "b"):
        out = cli("reputation", "--json", "--data-dir", str(tmp_path / name))
        assert out.returncode == 0, out.stderr
        views[name] = [json.loads(line) for line in out.stdout.splitlines()]
    assert views["a"] == views["b"]
    by_id = {v["agent_id"]: v for v in views["a"]}
    assert by_id[NODE.agent_id]["routable"] is False and by_id[HONEST.agent_id]["routable"] is True
    out = cli("balance", NODE.agent_id[:12], "--json", "--data-dir", str(tmp_path / "b"))
    assert json.loads(out.stdout)["slashed"] == 5_000 + acc.SLASH_PER_OFFENCE
    out = cli("balance", "zz", "--data-dir", str(tmp_path / "b"))
    assert out.returncode == 2 and "no agents in this ledger match" in out.stderr and "Traceback" not in out.stderr


def test_bond_command_signs_stores_and_explains_unbacked_stake(tmp_path):
    out = subprocess.run([sys.executable, "-m", "edge_agent", "ledger", "bond", "500", "--data-dir", str(tmp_path)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    shown = json.loads(out.stdout)
    assert (shown["amount"], shown["bonded"], shown["stake"]) == (500, 500, 0)
    assert "only 0 of 500 bonded counts as stake" in out.stderr
    store = LedgerStore(tmp_path / "ledger.db")
    try:
        (row,) = store.bonds()
        assert Bond(row["body"], row["signature"]).problem() is None and store.verify() == []
    finally:
        store.close()
    out = subprocess.run([sys.executable, "-m", "edge_agent", "ledger", "bond", "0", "--data-dir", str(tmp_path)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "whole number of credits" in out.stderr and "Traceback" not in out.stderr


def test_sync_makes_evidence_and_bonds_whole_beyond_the_gossiped_recent_ones(tmp_path):
    """Gossip carries the 64 newest evidence records and 256 newest bonds; reconciliation by id
    (SIGNED_IDS / SIGNED_GET) brings the rest, each verified; a forged record is never stored."""
    from edge_agent.ledger import wire

    evidence = [equivocation(Identity.generate()) for _ in range(wire.MAX_EVIDENCE + 36)]
    bonds = [Bond.sign(Identity.generate(), 1 + i, i) for i in range(wire.MAX_BONDS + 44)]
    s = LedgerStore((tmp_path / "a") / "ledger.db")
    s.add(evidence=evidence, bonds=bonds).result(30)
    s.close()
    agent = start_ledger_agent(tmp_path / "a")
    try:
        out = subprocess.run([sys.executable, "-m", "edge_agent", "ledger", "sync", "--peer", agent.address, "--data-dir",
                              str(tmp_path / "b")], capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr
        report = json.loads(out.stdout)
        assert (report["evidence"], report["bonds"]) == (len(evidence), len(bonds))
        again = subprocess.run([sys.executable, "-m", "edge_agent", "ledger", "sync", "--peer", agent.address, "--data-dir",
                                str(tmp_path / "b")], capture_output=True, text=True, timeout=300)
        assert json.loads(again.stdout)["evidence"] == 0 and json.loads(again.stdout)["bonds"] == 0
    finally:
        agent.stop()
    b = LedgerStore((tmp_path / "b") / "ledger.db")
    try:
        assert {r["id"] for r in b.evidence()} == {e.id for e in evidence}
        assert {r["id"] for r in b.bonds()} == {x.id for x in bonds} and b.verify() == []
    finally:
        b.close()
