"""Chain-mode audits in a real swarm: peers are separate `edge-agent join` processes (real
llama.cpp shards, real TLS) that forward activations to each other; the client sees only
hop 0's input and the last hop's output, recomputes every hop from hop 0's inputs and
audits every chunk (rate 1.0).

A faulty middle or last hop (``--test-fault``, allowed by EDGE_AGENT_TEST_FAULTS=1) is caught
and attributed to it alone, with self-verifying evidence; the hops after it are not judged
(their input is the cheater's) and the hops before it pass; an honest chain raises no flag.
With ``verify`` the answer still equals llama.cpp alone: the cheater is banned and the rest
generated on an honest chain."""

from __future__ import annotations

import asyncio
import os
import sqlite3
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import reference_tokens
from edge_agent.ledger.evidence import Evidence
from edge_agent.node import AgentConfig, swarm_client
from edge_agent.runtime.engine import EngineOptions
from edge_agent.runtime.sampling import SamplingParams
from edge_agent.split.client import ClientConfig
from swarm_util import peers, start_peer  # noqa: F401 - peers is a fixture

SHAPE = dict(n_layer=7, n_embd=64, n_head=8, n_head_kv=4, n_ff=172, n_vocab=512, seed=14)  # the audit tests' Q8_0 shape
PEERS = {  # name: (layers, join options); the client runs layers 0 and 6 itself
    "a": ("1:2", ()), "b": ("2:4", ()), "c": ("4:6", ()),
    "b-skip": ("2:4", ("--test-fault", "skip-layer")), "b-down": ("2:4", ("--test-fault", "downgrade")),
    "c-skip": ("4:6", ("--test-fault", "skip-layer")), "bc-skip": ("2:6", ("--test-fault", "skip-layer")),
    "b-fast-cheat": ("2:4", ("--test-fault", "noise", "--test-advertise-ms", "0.001")),  # the planner's first choice
}


@pytest.fixture(scope="module")
def swarm(tmp_path_factory):
    from edge_agent.runtime.synthetic import make_random_gguf

    base = tmp_path_factory.mktemp("audit-chain")
    model = make_random_gguf(base / "q8_0.gguf", ftype="q8_0", **SHAPE)
    os.environ["EDGE_AGENT_TEST_FAULTS"] = "1"  # the peers inherit it; nothing else in this process reads it
    try:
        with ThreadPoolExecutor(4) as pool:
            started = dict(zip(PEERS, pool.map(lambda k: start_peer(model, PEERS[k][0], base / k, *PEERS[k][1]), PEERS)))
    finally:
        os.environ.pop("EDGE_AGENT_TEST_FAULTS", None)
    yield model, started, base
    for p in started.values():
        p.stop()


def _chain(swarm, names: list[str], n: int = 40, verify: bool = False):
    """Generate in chain mode through the peers ``names`` with every chunk audited:
    (prompt, result, auditor outcomes, evidence rows of the client's ledger)."""
    model, peers, base = swarm
    cfg = AgentConfig(base / f"client-{'-'.join(names)}-{verify}", manual_peers=[("127.0.0.1", peers[p].ready["tls_port"])
                                                                                 for p in names], mdns=False, host="127.0.0.1")
    cfg.data_dir.mkdir(exist_ok=True)

    async def go():
        async with swarm_client(cfg, model, ClientConfig(mode="chain", verify=verify),
                                EngineOptions(n_ctx_per_request=512, max_requests=2), discover_s=30.0,
                                audit_rate=1.0) as client:
            prompt = client.tokenizer.encode("Once upon a time")
            res = await client.generate(prompt, SamplingParams(max_tokens=n))
            auditor = client.auditor
        return prompt, res, auditor

    prompt, res, auditor = asyncio.run(go())
    db = sqlite3.connect(cfg.data_dir / "ledger.db")
    try:
        rows = db.execute("SELECT kind, accused, body FROM evidence").fetchall()
    finally:
        db.close()
    return prompt, res, auditor.outcomes, rows


def test_an_honest_chain_raises_no_flag(swarm):
    model, peers, _ = swarm
    prompt, res, outcomes, evidence = _chain(swarm, ["a", "b", "c"])
    assert res.stats["mode"] == "chain" and [h["peer_id"] for h in res.stats["path"]] == [peers[p].agent_id for p in "abc"]
    assert res.token_ids == reference_tokens(model, prompt, 40)
    by_hop = {p: [o for o in outcomes if o.peer_id == peers[p].agent_id] for p in "abc"}
    assert all(len(by_hop[p]) >= 3 for p in "abc"), outcomes  # prefill + two decode chunks of every hop, middle included
    assert all(o.passed and o.distance == 0.0 and o.tier == "same-class" for o in outcomes), outcomes
    assert evidence == []


@pytest.mark.parametrize("path,cheater", [(["a", "b-skip", "c"], "b-skip"), (["a", "b-down", "c"], "b-down"),
                                          (["a", "b", "c-skip"], "c-skip"), (["a", "bc-skip"], "bc-skip")])
def test_a_faulty_hop_is_caught_and_only_it_is_blamed(swarm, path, cheater):
    _, peers, _ = swarm
    _, res, outcomes, evidence = _chain(swarm, path)
    assert res.stats["mode"] == "chain"
    culprit = peers[cheater].agent_id
    failed = [o for o in outcomes if not o.passed]
    assert failed and {o.peer_id for o in failed} == {culprit}, [(o.peer_id[:8], o.chunk, o.distance, o.reason) for o in failed]
    assert min(o.chunk for o in failed) <= 1  # within two audited chunks
    assert all(o.passed for o in outcomes if o.peer_id != culprit)
    first = path[0]
    assert any(o.peer_id == peers[first].agent_id and o.passed for o in outcomes)  # hop 0 was judged, and passed
    assert {o.tier for o in failed} == {"same-class"}  # judged from its exact committed input
    _assert_evidence_only_against(culprit, failed, evidence)


def test_verified_chain_answer_equals_llama_cpp_after_a_cheating_middle_hop(swarm):
    model, peers, _ = swarm
    prompt, res, outcomes, evidence = _chain(swarm, ["a", "b-fast-cheat", "b", "c"], n=30, verify=True)
    assert res.token_ids == reference_tokens(model, prompt, 30)
    rounds = res.stats["verified"]["rolled_back"]
    assert [r["cheater"] for r in rounds] == [peers["b-fast-cheat"].agent_id]
    assert res.stats["mode"] == "chain" and peers["b-fast-cheat"].agent_id not in [h["peer_id"] for h in res.stats["path"]]
    _assert_evidence_only_against(peers["b-fast-cheat"].agent_id, [o for o in outcomes if not o.passed], evidence)


def _assert_evidence_only_against(culprit: str, failed, rows) -> None:
    """This client's failed audits are stored as valid evidence naming the culprit. (The
    ledger also holds what earlier tests' clients synced to the shared honest peers.)"""
    mine = {o.evidence_id for o in failed}
    stored = {bytes(Evidence(row[2]).id): row for row in rows}
    assert mine and mine <= set(stored)
    assert all(stored[i][0] == "failed-audit" and stored[i][1] == culprit and Evidence(stored[i][2]).problem() is None
               for i in mine)


def test_audits_after_a_chain_rebuild_raise_no_flag(tmp_path, peers):
    """The chain's last hop dies mid-generation: every hop is rebuilt from hop 0's inputs
    (star replays, a star step), then the chain resumes. The audits of the new chain see the
    same hop 0 inputs and pass; nothing is blamed on an honest hop."""
    from edge_agent.runtime.synthetic import make_random_gguf

    model = make_random_gguf(tmp_path / "q8_0.gguf", ftype="q8_0", **SHAPE)
    a = peers(model, "1:2")
    doomed = peers(model, "2:6", "--test-advertise-ms", "0.001")  # the planner's first choice for 2:6
    spare = peers(model, "2:6", "--test-advertise-ms", "5")
    cfg = AgentConfig(tmp_path / "client", manual_peers=[("127.0.0.1", p.ready["tls_port"]) for p in (a, doomed, spare)],
                      mdns=False, host="127.0.0.1")
    cfg.data_dir.mkdir()
    seen = []

    def on_token(tok, _text):
        seen.append(tok)
        if len(seen) == 12:
            doomed.kill()

    async def go():
        async with swarm_client(cfg, model, ClientConfig(mode="chain"), EngineOptions(n_ctx_per_request=512, max_requests=2),
                                discover_s=30.0, audit_rate=1.0) as client:
            prompt = client.tokenizer.encode("Once upon a time")
            res = await client.generate(prompt, SamplingParams(max_tokens=40), on_token)
            return prompt, res, client.auditor

    prompt, res, auditor = asyncio.run(go())
    assert res.token_ids == reference_tokens(model, prompt, 40)
    assert res.stats["mode"] == "chain" and [r["from"] for r in res.stats["reroutes"]] == [doomed.agent_id]
    assert all(o.passed for o in auditor.outcomes)
    assert {o.peer_id for o in auditor.outcomes} >= {a.agent_id, spare.agent_id}
