"""The ledger wired into the swarm: client + 2 peers as real processes, real TLS, real SQLite."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import subprocess
import sys
import time

import pytest

from conftest import reference_tokens
from edge_agent.discovery.identity import Identity, SwarmKey
from edge_agent.ledger import wire
from edge_agent.ledger.service import ChannelRequester
from edge_agent.node import AgentConfig, run
from edge_agent.runtime.sampling import SamplingParams
from edge_agent.split.client import ClientConfig
from edge_agent.transport import tls
from swarm_util import start_peer


@pytest.fixture
def peers(tmp_path):
    started = []

    def start(model, layers):
        started.append(start_peer(model, layers, tmp_path / f"peer{len(started)}"))
        return started[-1]

    yield start
    for p in started:
        p.stop()


def _receipts(data_dir) -> dict[bytes, tuple]:
    db = sqlite3.connect(data_dir / "ledger.db")
    try:
        return {r[0]: r[1:] for r in db.execute("SELECT id, body, node_sig, client_sig, node, client, steps FROM receipts")}
    finally:
        db.close()


def _generate(tmp_path, model, peer_list, mode: str, n: int = 40):
    cfg = AgentConfig(tmp_path / "client", manual_peers=[("127.0.0.1", p.ready["tls_port"]) for p in peer_list], mdns=False,
                      host="127.0.0.1")
    cfg.data_dir.mkdir(exist_ok=True)
    box = {}

    def tokens(tok):
        box["prompt"] = tok.encode("Once upon a time")
        return box["prompt"]

    res = asyncio.run(run(cfg, model, tokens, SamplingParams(max_tokens=n), ClientConfig(mode=mode), discover_s=30.0, n_ctx=512))
    return box["prompt"], res


@pytest.mark.parametrize("mode", ["star", "chain"])
def test_a_generation_leaves_matching_signed_receipts_in_all_three_ledgers(tmp_path, peers, tiny_model, mode):
    a, b = peers(tiny_model, "1:3"), peers(tiny_model, "3:4")
    prompt, res = _generate(tmp_path, tiny_model, [a, b], mode)
    assert res.token_ids == reference_tokens(tiny_model, prompt, 40)  # the ledger changes nothing on the token path
    client = _receipts(tmp_path / "client")
    # one receipt per (request, node): two countersigned by the peers, two for the client's own layers
    nodes = sorted(v[3] for v in client.values())
    assert len(client) == 4 and sorted({a.agent_id, b.agent_id}) == sorted(n for n in nodes if n != client_id(client))
    positions = len(prompt) + len(res.token_ids) - 1
    assert all(v[5] == positions for v in client.values())
    deadline = time.monotonic() + 10  # the client pushed its receipts to both peers before `run` returned
    while time.monotonic() < deadline and not all(_receipts(p.log.parent) == client for p in (a, b)):
        time.sleep(0.2)
    for p in (a, b):
        assert _receipts(p.log.parent) == client  # the same bytes, signatures included, in all three ledgers
        out = subprocess.run([sys.executable, "-m", "edge_agent", "ledger", "verify", "--data-dir", str(p.log.parent)],
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0 and out.stdout.strip() == "ok", out.stdout
    shown = subprocess.run([sys.executable, "-m", "edge_agent", "ledger", "show", "--json", "--data-dir", str(tmp_path / "client"),
                            "--peer", a.agent_id[:16]], capture_output=True, text=True, timeout=120)
    row = json.loads(shown.stdout.splitlines()[0])
    assert row["node"] == a.agent_id and row["chunks"] >= 2 and row["deadlines_met"] + row["deadlines_missed"] == (
        39 if mode == "star" else 0)
    if mode == "star":
        _hop_listener_answers_the_ledger(tmp_path, a, client)


def _hop_listener_answers_the_ledger(tmp_path, peer, expected):
    """The node's hop listener refuses junk ledger messages with a reason, then serves a sync."""
    async def junk() -> list:
        ch = await tls.connect(Identity.generate(), SwarmKey(None), "127.0.0.1", peer.ready["tls_port"])
        ask = ChannelRequester(ch, timeout_s=20)
        body = next(iter(expected.values()))[0]
        try:
            return [wire.unpack(await ask(p))[0] for p in (
                wire.commits_get(bytes(16), 1, 3), wire.receipt_sign(body, bytes(64)), wire.MAGIC + b"\x63",
                wire.items(wire.Msg.PUT, [bytes(332)]))]
        finally:
            ask.close()
            await ch.close()

    assert asyncio.run(junk()) == [wire.Msg.ERROR, wire.Msg.ERROR, wire.Msg.ERROR, wire.Msg.PUT_REPLY]
    fresh = tmp_path / "auditor"
    out = subprocess.run([sys.executable, "-m", "edge_agent", "ledger", "sync", "--peer", f"127.0.0.1:{peer.ready['tls_port']}",
                          "--data-dir", str(fresh)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and json.loads(out.stdout)["pulled"] == 4, out.stdout + out.stderr
    assert _receipts(fresh) == expected


def client_id(receipts: dict) -> str:
    """The client is the agent named as client in every receipt."""
    (cid,) = {v[4] for v in receipts.values()}
    return cid
