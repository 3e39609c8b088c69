"""Newcomer trials in the agent (docs/discovery.md, "Rule for newcomers and Sybils", rule 6):
a peer with stake and no history yet is tried on batch requests, never on purpose on an
interactive one; a peer without stake is never tried (with no history either it is on
probation: tests/test_probation.py). Real `join` processes, real llama.cpp, real TLS, the
client's real SQLite ledger; outputs are llama.cpp's."""

from __future__ import annotations

import asyncio
import os

import pytest

from conftest import reference_tokens
from edge_agent.directory import HISTORY_STEPS, STRANGER, planner_reputation
from edge_agent.discovery.identity import Identity
from edge_agent.ledger.accounts import Account
from edge_agent.ledger.encoding import ZERO32, ReceiptBody
from edge_agent.ledger.records import Receipt
from edge_agent.ledger.stake import Bond
from edge_agent.ledger.store import LedgerStore
from edge_agent.node import AgentConfig, swarm_client
from edge_agent.runtime.engine import EngineOptions
from edge_agent.runtime.sampling import SamplingParams
from edge_agent.split.client import ClientConfig
from ledger_util import make_receipt
from swarm_util import peers  # noqa: F401 - a fixture


def _account(stake: int = 0, met: float = 0.0, missed: float = 0.0, reputation: float = 0.5, offences: int = 0) -> Account:
    return Account("ab" * 32, 0, 0, stake, offences, 0, 0, stake, 0, met, missed, reputation)


def test_what_the_planner_is_told_of_a_peer():
    assert planner_reputation(None) == STRANGER == 0.5  # never seen: planned on its merits, never tried on purpose
    assert planner_reputation(_account(stake=10)) is None  # stake, no history: a newcomer
    assert planner_reputation(_account(stake=10, met=HISTORY_STEPS - 1)) is None
    assert planner_reputation(_account(stake=10, met=HISTORY_STEPS, reputation=0.8)) == 0.8  # established
    assert planner_reputation(_account(met=3, reputation=0.45)) == 0.45  # no stake: its record, no trials
    assert planner_reputation(_account(offences=1, reputation=0.0)) == 0.0


def _stake(store: LedgerStore, newcomer: Identity) -> None:
    """Give ``newcomer`` stake and no decode history: it earned credits on a prefill (no decode
    deadline) for another client, and bonded them."""
    other = Identity.generate()
    body = ReceiptBody(os.urandom(16), newcomer.public_key, other.public_key, 1, 4, bytes(32), 64, 0, ZERO32, 0, 0,
                       64 * 256, 64 * 256, 1000, 1_700_000_000_000)
    raw = Receipt.encode_body(body)
    receipt = Receipt(raw, Receipt.node_signature(newcomer, raw), Receipt.client_signature(other, raw))
    store.add(receipts=[receipt], bonds=[Bond.sign(newcomer, 100, 1)]).result(30)


@pytest.mark.parametrize("batch", [False, True])
def test_a_staked_newcomer_is_tried_on_batch_requests_only(tmp_path, peers, tiny_model, batch):
    established = peers(tiny_model, "1:4", "--test-advertise-ms", "1")  # history, no stake
    newcomer = peers(tiny_model, "1:4", "--test-advertise-ms", "3")  # slower: never chosen on its merits
    stranger = peers(tiny_model, "1:4", "--test-advertise-ms", "2")  # neither: no trials (and on probation)
    cfg = AgentConfig(tmp_path / "client", manual_peers=[("127.0.0.1", p.ready["tls_port"]) for p in
                                                         (established, newcomer, stranger)], mdns=False, host="127.0.0.1")
    cfg.data_dir.mkdir()
    store = LedgerStore.open(cfg.data_dir)
    try:
        _stake(store, Identity.load_or_create(newcomer.log.parent))  # its key, from its data dir
        other = Identity.generate()  # 80 decode deadlines on record: established
        store.add(receipts=[make_receipt(Identity.load_or_create(established.log.parent), other, i) for i in range(2)]).result(30)
    finally:
        store.close()

    async def go():
        async with swarm_client(cfg, tiny_model, ClientConfig(), EngineOptions(n_ctx_per_request=512, max_requests=2),
                                discover_s=30.0, audit_rate=0.0) as client:
            tokens = client.tokenizer.encode("Once upon a time")
            return tokens, await client.generate(tokens, SamplingParams(max_tokens=16), batch=batch)

    prompt, res = asyncio.run(go())
    assert res.token_ids == reference_tokens(tiny_model, prompt, 16)
    assert [h["peer_id"] for h in res.stats["path"]] == [newcomer.agent_id if batch else established.agent_id]
