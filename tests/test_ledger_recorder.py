"""Recorders over a real TLS channel: node commitments, client checks, one countersigned receipt."""

from __future__ import annotations

import asyncio
import os

import pytest

from edge_agent.discovery.identity import Identity, SwarmKey
from edge_agent.ledger.recorder import ClientRecorder, NodeRecorder, chunks_of, _Step
from edge_agent.ledger.service import ChannelRequester, LedgerService
from edge_agent.ledger.store import LedgerStore
from edge_agent.split.observe import HopRecord
from edge_agent.transport import tls

MODEL, SHARD = "ab" * 32, "cd" * 32


def _steps(n_prompt_chunks: int, n_decode: int) -> list[tuple[int, int]]:
    """(position, n_positions) of a request: prefill pieces of 8, then decode steps."""
    out = [(8 * k, 8) for k in range(n_prompt_chunks)]
    pos = 8 * n_prompt_chunks
    return out + [(pos + k, 1) for k in range(n_decode)]


def _play(node_rec: NodeRecorder, client_rec: ClientRecorder, node: Identity, rid: str, steps, corrupt_at: int | None = None):
    for i, (pos, n) in enumerate(steps):
        x, y = os.urandom(16), os.urandom(16)
        node_rec.observe(HopRecord("node", rid, node.agent_id, 1, 3, pos, n, x, y, 0.5))
        seen = os.urandom(16) if i == corrupt_at else y  # the client received other bytes than the node claims
        client_rec.observe(HopRecord("client", rid, node.agent_id, 1, 3, pos, n, x, seen, 0.5, 3.0, 10.0 if n == 1 else None))


def test_chunking_rule():
    steps = [_Step(p, n, b"", b"", 0.0, False) for p, n in _steps(2, 70)]
    chunks = chunks_of(steps, 32)
    assert [len(c) for c in chunks] == [1, 1, 32, 32, 6]


@pytest.mark.parametrize("corrupt", [False, True])
def test_request_leaves_matching_countersigned_receipts(tmp_path, corrupt):
    node, client = Identity.generate(), Identity.generate()
    node_store, client_store = LedgerStore.open(tmp_path / "node"), LedgerStore.open(tmp_path / "client")
    node_rec = NodeRecorder(node, node_store, lambda a, b: (MODEL, SHARD))
    client_rec = ClientRecorder(client, client_store, MODEL, bytes_per_position=64 * 4)
    rid = os.urandom(16).hex()

    async def main():
        service = LedgerService(node_store, node_rec)
        server = await tls.listen(node, SwarmKey(None), "127.0.0.1", 0, service.serve_channel)
        ch = await tls.connect(client, SwarmKey(None), "127.0.0.1", server.port, expect_peer_id=node.agent_id)
        ask = ChannelRequester(ch)
        try:
            _play(node_rec, client_rec, node, rid, _steps(2, 40), corrupt_at=20 if corrupt else None)
            async def request_for(peer_id):
                return ask if peer_id == node.agent_id else None

            return await client_rec.finalize(rid, request_for, [(node.agent_id, 1, 3)], [(0, 1), (3, 4)], 56)
        finally:
            ask.close()
            await ch.close()
            await server.close()

    receipts = asyncio.run(main())
    node_store.flush()
    client_store.flush()
    try:
        local = [r for r in receipts if r.fields.node == client.public_key]
        assert [(r.fields.layer_start, r.fields.layer_end, r.fields.steps) for r in local] == [(0, 1, 56), (3, 4, 56)]
        if corrupt:
            assert len(receipts) == 2 and "activation hashes differ" in client_rec.failures[0]
            assert node_store.stats()["receipts"] == 0
            return
        remote = next(r for r in receipts if r.fields.node == node.public_key)
        f = remote.fields
        assert (f.steps, f.chunks, f.deadlines_met, f.deadlines_missed, f.bytes_in) == (56, 4, 40, 0, 56 * 256)
        assert remote.problem() is None
        held = node_store.receipts()
        assert len(held) == 1 and held[0]["id"] == remote.id and held[0]["node_sig"] == remote.node_sig
        assert client_store.stats()["receipts"] == 3 and client_store.stats()["commitments"] == 4
        assert node_store.stats()["commitments"] == 4
        assert node_store.verify() == [] and client_store.verify() == []
    finally:
        node_store.close()
        client_store.close()


def test_node_refuses_a_receipt_that_does_not_match_its_chain(tmp_path):
    node, client = Identity.generate(), Identity.generate()
    store = LedgerStore.open(tmp_path)
    node_rec = NodeRecorder(node, store, lambda a, b: (MODEL, SHARD))
    client_rec = ClientRecorder(client, store, MODEL)
    rid = os.urandom(16).hex()
    _play(node_rec, client_rec, node, rid, _steps(1, 5))
    from edge_agent.ledger import wire
    from edge_agent.ledger.encoding import ReceiptBody
    from edge_agent.ledger.records import Receipt

    body = ReceiptBody(bytes.fromhex(rid), node.public_key, client.public_key, 1, 3, bytes.fromhex(MODEL), 999, 0, bytes(32),
                       0, 0, 0, 0, 0, 0)
    raw = Receipt.encode_body(body)
    reply = node_rec._countersign(raw, Receipt.client_signature(client, raw), client.agent_id)
    assert wire.unpack(reply)[0] == wire.Msg.ERROR and b"does not match" in reply
    reply = node_rec._countersign(raw, Receipt.client_signature(client, raw), Identity.generate().agent_id)
    assert b"not signed by the client asking" in reply
    store.close()
