"""Helpers for the ledger tests: signed receipts in bulk, a ledger-only agent in its own process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from edge_agent.discovery.identity import Identity
from edge_agent.ledger.encoding import ZERO32, CommitmentBody, ReceiptBody, chunk_hash
from edge_agent.ledger.records import Commitment, Receipt
from swarm_util import Peer

MODEL = bytes.fromhex("ab" * 32)


def make_receipt(node: Identity, client: Identity, i: int, request_id: bytes | None = None, chain_head: bytes = ZERO32,
                 chunks: int = 0) -> Receipt:
    body = ReceiptBody(request_id or os.urandom(16), node.public_key, client.public_key, 1, 15, MODEL, 40 + i % 7, chunks,
                       chain_head, 38, 2, 40 * 2304, 40 * 2304, 1234 + i, 1_700_000_000_000 + i)
    raw = Receipt.encode_body(body)
    return Receipt(raw, Receipt.node_signature(node, raw), Receipt.client_signature(client, raw))


def make_chain(node: Identity, request_id: bytes, n_chunks: int, start: int = 1, end: int = 15) -> list[Commitment]:
    out, prev = [], ZERO32
    for k in range(n_chunks):
        body = CommitmentBody(request_id, node.public_key, start, end, MODEL, bytes.fromhex("cd" * 32), k, 32 * k, 32 * k + 32,
                              chunk_hash([bytes([k]) * 16]), chunk_hash([bytes([k + 1]) * 16]), compute_us=100, prev=prev)
        c = Commitment.sign(node, body)
        out.append(c)
        prev = c.id
    return out


def start_ledger_agent(data_dir: Path, *extra: str) -> Peer:
    """`edge-agent ledger serve` in its own process: a real agent with a real SQLite ledger."""
    data_dir.mkdir(parents=True, exist_ok=True)
    log = data_dir / "serve.log"
    proc = subprocess.Popen([sys.executable, "-m", "edge_agent", "ledger", "serve", "--data-dir", str(data_dir), *extra],
                            stdout=subprocess.PIPE, stderr=open(log, "w"), text=True)
    line = proc.stdout.readline()
    if not line.startswith('{"ready"'):
        proc.kill()
        raise RuntimeError(f"ledger agent did not start: {log.read_text()[-2000:]}")
    return Peer(proc, json.loads(line)["ready"], log)


def write_forever(data_dir: Path) -> None:
    """Crash-test writer: store signed receipts in batches, print each id once it is acknowledged."""
    from edge_agent.ledger.store import LedgerStore

    store = LedgerStore.open(data_dir)
    node, client = Identity.generate(), Identity.generate()
    i = 0
    while True:
        batch = [make_receipt(node, client, i + k) for k in range(100)]
        futures = [store.add(receipts=batch[k:k + 10]) for k in range(0, 100, 10)]  # several queued writes per commit
        for k, fut in enumerate(futures):
            fut.result()
            sys.stdout.write("".join(r.id.hex() + "\n" for r in batch[10 * k:10 * k + 10]))
        sys.stdout.flush()
        i += 100


if __name__ == "__main__":
    write_forever(Path(sys.argv[1]))
