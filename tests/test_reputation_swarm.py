"""Consequences in a real swarm (separate `join` processes, real llama.cpp, real TLS): a node
caught cheating by an audit is slashed and its reputation drops to 0, so the client's next
request routes around it, to an honest peer, with output equal to llama.cpp alone."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys

import pytest

from conftest import reference_tokens
from edge_agent.ledger.accounts import SLASH_PER_OFFENCE, UNSTAKED_CAP, Accounts
from edge_agent.ledger.store import LedgerStore
from edge_agent.node import AgentConfig, swarm_client
from edge_agent.runtime.engine import EngineOptions
from edge_agent.runtime.sampling import SamplingParams
from edge_agent.split.client import ClientConfig
from swarm_util import start_peer

SHAPE = dict(n_layer=5, n_embd=64, n_head=8, n_head_kv=4, n_ff=172, n_vocab=512, seed=14)


def _generate(cfg: AgentConfig, model, prompt: str, n: int, **client_config):
    async def go():
        async with swarm_client(cfg, model, ClientConfig(**client_config), EngineOptions(n_ctx_per_request=512, max_requests=2),
                                discover_s=30.0, audit_rate=1.0) as client:
            tokens = client.tokenizer.encode(prompt)
            return tokens, await client.generate(tokens, SamplingParams(max_tokens=n))

    return asyncio.run(go())


@pytest.mark.slow
def test_a_caught_cheater_is_slashed_and_routed_around(tmp_path):
    from edge_agent.runtime.synthetic import make_random_gguf

    model = make_random_gguf(tmp_path / "q8_0.gguf", ftype="q8_0", **SHAPE)
    os.environ["EDGE_AGENT_TEST_FAULTS"] = "1"
    try:  # the cheater advertises itself fastest: the planner's first choice while nothing is known
        cheater = start_peer(model, "1:4", tmp_path / "cheater", "--test-fault", "downgrade", "--test-advertise-ms", "0.001")
    finally:
        os.environ.pop("EDGE_AGENT_TEST_FAULTS", None)
    honest = start_peer(model, "1:4", tmp_path / "honest", "--test-advertise-ms", "5")
    try:
        cfg = AgentConfig(tmp_path / "client", manual_peers=[("127.0.0.1", p.ready["tls_port"]) for p in (cheater, honest)],
                          mdns=False, host="127.0.0.1")
        cfg.data_dir.mkdir()
        _, first = _generate(cfg, model, "Once upon a time", 40)
        assert [h["peer_id"] for h in first.stats["path"]] == [cheater.agent_id]

        store = LedgerStore.open(cfg.data_dir)  # the audits' evidence is in; the accounts follow from it
        try:
            account = Accounts(store).account(cheater.agent_id)
            assert store.evidence(cheater.agent_id) and not store.evidence(honest.agent_id)
        finally:
            store.close()
        assert account.offences == 1 and account.reputation == 0.0 and account.slashed == SLASH_PER_OFFENCE
        assert account.earned > 0 and account.balance == account.earned - SLASH_PER_OFFENCE  # paid, then slashed

        prompt, second = _generate(cfg, model, "The capital of France is", 24)
        assert [h["peer_id"] for h in second.stats["path"]] == [honest.agent_id]
        assert second.token_ids == reference_tokens(model, prompt, 24)

        out = subprocess.run([sys.executable, "-m", "edge_agent", "ledger", "reputation", "--json", "--data-dir",
                              str(cfg.data_dir)], capture_output=True, text=True, timeout=120)
        shown = {r["agent_id"]: r for r in map(json.loads, out.stdout.splitlines())}
        assert shown[cheater.agent_id]["routable"] is False and shown[honest.agent_id]["routable"] is True
        assert 0.0 < shown[honest.agent_id]["reputation"] <= UNSTAKED_CAP  # no offence, no stake yet
    finally:
        cheater.stop()
        honest.stop()


FAULTS = ("downgrade", "skip-layer", "stale", "noise", "garbage")


@pytest.fixture(scope="module")
def honest_swarm(tmp_path_factory):
    from edge_agent.runtime.synthetic import make_random_gguf

    base = tmp_path_factory.mktemp("verified")
    model = make_random_gguf(base / "q8_0.gguf", ftype="q8_0", **SHAPE)
    honest = start_peer(model, "1:4", base / "honest", "--test-advertise-ms", "5")
    yield model, honest, base
    honest.stop()


@pytest.mark.slow
@pytest.mark.parametrize("fault", [*FAULTS, "garbage@37"])
def test_verified_output_is_exact_although_a_cheater_served_first(honest_swarm, fault):
    """``verify``: the client answers only after the audits; the cheater's tokens are thrown
    away from the first position it corrupted and generated again on the honest peer.
    ``garbage@37`` turns at position 37, where its third chunk starts (the prefill is chunk 0,
    then 32 decode positions a chunk): the 33 tokens fed at positions 5..37 are kept, the rest
    generated again."""
    model, honest, base = honest_swarm
    os.environ["EDGE_AGENT_TEST_FAULTS"] = "1"
    try:
        cheater = start_peer(model, "1:4", base / fault, "--test-fault", fault, "--test-advertise-ms", "0.001")
    finally:
        os.environ.pop("EDGE_AGENT_TEST_FAULTS", None)
    try:
        cfg = AgentConfig(base / f"client-{fault}", manual_peers=[("127.0.0.1", p.ready["tls_port"]) for p in (cheater, honest)],
                          mdns=False, host="127.0.0.1")
        cfg.data_dir.mkdir()
        prompt, res = _generate(cfg, model, "Once upon a time", 40, verify=True)
        assert res.token_ids == reference_tokens(model, prompt, 40)
        (rolled,) = res.stats["verified"]["rolled_back"]
        assert rolled["cheater"] == cheater.agent_id and res.stats["verified"]["rounds"] == 2
        assert [h["peer_id"] for h in res.stats["path"]] == [honest.agent_id]  # the last round's path
        if fault == "garbage@37":
            assert (rolled["position"], rolled["kept_tokens"], rolled["discarded_tokens"]) == (37, 33, 7)
        else:
            assert rolled["position"] in (0, 5)  # the prefill's chunk, or the first decode chunk (stale)
    finally:
        cheater.stop()


@pytest.mark.slow
def test_run_verify_on_the_command_line(honest_swarm, tmp_path):
    model, honest, _ = honest_swarm
    base = [sys.executable, "-m", "edge_agent", "run", "--model", str(model), "--no-mdns", "--peer", honest.address,
            "--data-dir", str(tmp_path), "--json", "-n", "8", "--verify"]
    out = subprocess.run([*base, "--audit-rate", "1", "Once upon a time"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout)
    assert res["stats"]["verified"] == {"rounds": 1, "rolled_back": []}
    assert len(res["token_ids"]) == 8 and [h["peer_id"] for h in res["path"]] == [honest.agent_id]
    out = subprocess.run([*base, "--audit-rate", "0", "Once upon a time"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "--verify needs audits" in out.stderr and "Traceback" not in out.stderr
