"""The dashboard's Accounts panel against a real `edge-agent serve` whose real SQLite ledger holds
really signed receipts, a bond and evidence: GET /v1/ledger/accounts gives what `edge-agent ledger
balance|reputation|evidence --json` print for the same data dir, and headless Debian chromium shows
it; an agent without a ledger says so in one line."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

from api_util import API_KEY, start_server
from edge_agent.discovery.identity import Identity
from edge_agent.ledger.evidence import AuditStatement, Evidence
from edge_agent.ledger.fingerprint import distance, fingerprint
from edge_agent.ledger.records import Commitment
from edge_agent.ledger.stake import Bond
from edge_agent.ledger.store import LedgerStore
from ledger_util import make_chain, make_receipt
from test_dashboard import CHROMIUM, CHROMIUM_ARGS
from test_ledger_accounts import equivocation

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Debian chromium not installed (.ci/run installs it)")
SERVING, CLIENT, CHEAT = Identity.generate(), Identity.generate(), Identity.generate()
FAST_START = ("--discover", "1", "--ctx", "64")  # no peers: this device runs every layer


def failed_audit(auditor: Identity, node: Identity) -> Evidence:
    """A commitment whose fingerprint is far from the auditor's re-execution, and the auditor's signed verdict."""
    rng = np.random.default_rng(14)
    served, recomputed = (fingerprint(32, rng.standard_normal((32, 64)).astype(np.float32)) for _ in range(2))
    (c,) = make_chain(node, os.urandom(16), 1)
    c = Commitment.sign(node, dataclasses.replace(c.fields, fingerprint=served))
    d = distance(served, recomputed)
    return Evidence.failed_audit(c, AuditStatement.sign(auditor, c.id, recomputed, d, 0.005, 1_700_000_000_000))


def fill_ledger(data_dir) -> Identity:
    """This agent served CLIENT and was served by SERVING (receipts both ways), bonded 500 credits, audited SERVING
    (it failed) and holds CHEAT's equivocation."""
    me = Identity.load_or_create(data_dir)
    store = LedgerStore.open(data_dir)
    try:
        store.add(receipts=[make_receipt(me, CLIENT, i) for i in range(3)] + [make_receipt(SERVING, me, 10)],
                  bonds=[Bond.sign(me, 500, 1)]).result(30)
        store.add(evidence=[failed_audit(me, SERVING)]).result(30)
        time.sleep(0.01)  # a later stored_ms
        store.add(evidence=[equivocation(CHEAT)]).result(30)  # stored last: listed first
    finally:
        store.close()
    return me


def get(url: str, key: str | None = API_KEY) -> dict:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"} if key else {})
    with urllib.request.urlopen(req, timeout=30) as res:
        return json.loads(res.read())


def ledger_cli(*args: str) -> list[dict]:
    out = subprocess.run([sys.executable, "-m", "edge_agent", "ledger", *args, "--json"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    return [json.loads(line) for line in out.stdout.splitlines()]


@pytest.fixture(scope="module")
def agents(tiny_model, tmp_path_factory):
    """Two `serve` agents: one with the filled ledger (behind an API key), one with EDGE_AGENT_LEDGER=off."""
    base = tmp_path_factory.mktemp("accounts")
    me = fill_ledger(base / "api")
    with_ledger = start_server(tiny_model, [], base / "api", *FAST_START, "--api-key", API_KEY)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("EDGE_AGENT_LEDGER", "off")
            without = start_server(tiny_model, [], base / "no-ledger", *FAST_START)
    except Exception:
        with_ledger.stop()
        raise
    yield me, base / "api", with_ledger, without
    with_ledger.stop()
    without.stop()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        ctx = pw.chromium.launch_persistent_context(str(tmp_path_factory.mktemp("chromium-profile")), executable_path=CHROMIUM,
                                                    headless=True, args=CHROMIUM_ARGS, viewport={"width": 1280, "height": 1000})
        yield ctx
        ctx.close()


def test_endpoint_gives_what_the_ledger_commands_print(agents):
    me, data_dir, server, _ = agents
    with pytest.raises(urllib.error.HTTPError) as refused:  # the same key as every other read of the API
        get(server.url + "/v1/ledger/accounts", key=None)
    assert refused.value.code == 401
    panel = get(server.url + "/v1/ledger/accounts")
    assert panel["ledger"] is True and panel["agent_id"] == me.agent_id
    rows = {a["agent_id"]: a for a in panel["accounts"]}
    assert panel["accounts"][0]["agent_id"] == me.agent_id and panel["accounts"][0]["this_device"]
    assert set(rows) == {me.agent_id, CLIENT.agent_id, SERVING.agent_id, CHEAT.agent_id} and panel["accounts_total"] == 4

    (mine,) = ledger_cli("balance", "--data-dir", str(data_dir))
    (served_me,) = ledger_cli("balance", SERVING.agent_id[:12], "--data-dir", str(data_dir))
    for account in (mine, served_me):
        assert {k: rows[account["agent_id"]][k] for k in account} == account
    assert mine["earned"] > 0 and mine["spent"] > 0 and mine["bonded"] == 500  # receipts both ways, the bond
    assert served_me["offences"] == 1 and served_me["slashed"] > 0  # its failed audit
    for listed in ledger_cli("reputation", "--data-dir", str(data_dir)):
        assert {k: rows[listed["agent_id"]][k] for k in listed} == listed  # routable and its reason included
    assert rows[SERVING.agent_id]["routable"] is False and "1 offence" in rows[SERVING.agent_id]["not_routable_because"]

    evidence = ledger_cli("evidence", "--data-dir", str(data_dir))
    assert panel["evidence"] == evidence[::-1] and panel["evidence_total"] == 2  # newest first
    cheat, audit = panel["evidence"]
    assert (cheat["kind"], cheat["accused"], cheat["valid"]) == ("equivocation", CHEAT.agent_id, True)
    assert (audit["kind"], audit["accused"], audit["valid"], audit["chunk"]) == ("failed-audit", SERVING.agent_id, True, 0)
    assert audit["distance"] > audit["tolerance"] == 0.005


def test_page_shows_the_accounts_and_the_evidence(agents, browser):
    me, _, server, _ = agents
    panel = get(server.url + "/v1/ledger/accounts")
    page = browser.new_page()
    try:
        page.goto(server.url + "/")
        page.fill("#api-key", API_KEY)  # the page retries its live feed with the key typed in
        page.wait_for_selector("#accounts tbody tr[data-agent]", timeout=30_000)
        shown = page.eval_on_selector_all("#accounts tbody tr", "rs => rs.map(r => [r.dataset.agent, ...[...r.cells].map(c => c.textContent)])")
        assert [row[0] for row in shown] == [a["agent_id"] for a in panel["accounts"]]  # this device first
        for row, a in zip(shown, panel["accounts"]):
            numbers = [int(cell.replace(",", "")) for cell in row[2:7]] + [int(row[9])]
            assert numbers == [a["balance"], a["earned"], a["spent"], a["bonded"], a["stake"], a["offences"]]
            assert row[7].startswith(f"{a['reputation']:.3f}")
            assert row[8] == ("yes" if a["routable"] else "no: " + a["not_routable_because"])
        assert shown[0][1].startswith("this device")
        evidence = page.eval_on_selector_all("#evidence tbody tr", "rs => rs.map(r => [...r.cells].map(c => c.textContent))")
        assert [(e[1], e[6]) for e in evidence] == [("equivocation", "yes"), ("failed audit", "yes")]
        audit = panel["evidence"][1]
        assert evidence[1][2] == audit["accused"][:10] and evidence[1][4] == "0"
        assert evidence[1][5] == f"{audit['distance']:.3f} > 0.005"
        assert page.is_hidden("#accounts-note")
    finally:
        page.close()


def test_without_a_ledger_the_panel_says_so_in_one_line(agents, browser):
    without = agents[3]
    assert get(without.url + "/v1/ledger/accounts", key=None)["ledger"] is False
    page = browser.new_page()
    try:
        page.goto(without.url + "/")
        page.wait_for_selector("#accounts-note:not([hidden])", timeout=30_000)
        assert "keeps no ledger" in page.text_content("#accounts-note")
        assert page.is_hidden("#accounts-tables")
    finally:
        page.close()


def test_a_record_stored_later_reaches_the_endpoint_and_the_open_page(agents, browser):
    """Records arrive while the agent runs (syncs, audits): the cached panel picks them up, and the open page is
    updated by the live feed without a reload."""
    me, data_dir, server, _ = agents
    page = browser.new_page()
    try:
        page.goto(server.url + "/")
        page.fill("#api-key", API_KEY)
        bonded = f"#accounts tbody tr[data-agent='{me.agent_id}'] td:nth-child(5)"
        page.wait_for_selector(bonded, timeout=30_000)
        assert page.text_content(bonded) == "500"
        store = LedgerStore.open(data_dir)
        try:
            store.add(bonds=[Bond.sign(me, 100, 2)]).result(30)
        finally:
            store.close()
        page.wait_for_function(f"document.querySelector(\"{bonded}\").textContent === '600'", timeout=30_000)
    finally:
        page.close()
    (mine,) = ledger_cli("balance", "--data-dir", str(data_dir))
    assert mine["bonded"] == 600 and get(server.url + "/v1/ledger/accounts")["accounts"][0]["bonded"] == 600
