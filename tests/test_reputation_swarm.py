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


def _generate(cfg: AgentConfig, model, prompt: str, n: int):
    async def go():
        async with swarm_client(cfg, model, ClientConfig(), EngineOptions(n_ctx_per_request=512, max_requests=2),
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
