"""Ledger benchmark: receipts stored per second, 100k-receipt sync, signing cost per token, bytes on the wire.

    .venv/bin/python bench/ledger.py [--quick] [--sync-receipts 100000] [--split [MODEL]]

* store: signed receipts (two Ed25519 signatures each) queued in small batches, as the
  recorder does, until the writer thread has committed them all; and signing + storing.
* sync: a ledger-only agent in its own process (``edge-agent ledger serve``) and this
  process each hold half of N receipts (plus 4% in common); wall time of the first sync
  (reconcile + pull + push, every record verified on ingest) and bytes of a second one.
* per token: the node recorder's observe + commitment signing, and the client's check of a
  chain (signatures, links, hashes), per token at C = 32.
* wire: bytes a hop adds per request and per chunk (ledger messages + frame headers).
* split (``--split``, default model SmolLM2): decode tok/s through client + 2 peer processes
  (``edge-agent join``), ledger on vs off (two peer pairs, one started with
  ``EDGE_AGENT_LEDGER=off``; the client's ``AgentConfig.ledger`` follows), interleaved rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from edge_agent.discovery.identity import Identity, SwarmKey  # noqa: E402
from edge_agent.ledger import wire  # noqa: E402
from edge_agent.ledger.encoding import COMMITMENT_WIRE_SIZE, RECEIPT, SIG_SIZE  # noqa: E402
from edge_agent.ledger.recorder import CHUNK_SIZE, ClientRecorder, NodeRecorder, _check_chain, chunks_of  # noqa: E402
from edge_agent.ledger.service import sync_peer  # noqa: E402
from edge_agent.ledger.store import LedgerStore  # noqa: E402
from edge_agent.split.observe import HopRecord  # noqa: E402
from edge_agent.transport.frames import HEADER_SIZE  # noqa: E402
from ledger_util import make_receipt, start_ledger_agent  # noqa: E402


def bench_store(n: int, tmp: Path) -> dict:
    node, client = Identity.generate(), Identity.generate()
    t0 = time.perf_counter()
    receipts = [make_receipt(node, client, i) for i in range(n)]
    sign_s = time.perf_counter() - t0
    store = LedgerStore.open(tmp / "store")
    t0 = time.perf_counter()
    futures = [store.add(receipts=receipts[i:i + 50]) for i in range(0, n, 50)]
    for f in futures:
        f.result()
    store_s = time.perf_counter() - t0
    store.close()
    return {"receipts": n, "stored_per_s": round(n / store_s), "signed_and_stored_per_s": round(n / (sign_s + store_s)),
            "sign_us_per_receipt": round(sign_s / n * 1e6, 1)}


def bench_sync(n: int, tmp: Path) -> dict:
    node, client = Identity.generate(), Identity.generate()
    receipts = [make_receipt(node, client, i) for i in range(n)]
    half, common = n // 2, n // 25
    theirs, mine = LedgerStore.open(tmp / "a"), LedgerStore.open(tmp / "b")
    theirs.add(receipts=receipts[:half + common // 2]).result()
    mine.add(receipts=receipts[half - common // 2:]).result()
    theirs.close()
    agent = start_ledger_agent(tmp / "a")
    me = Identity.load_or_create(tmp / "b")
    try:
        first = asyncio.run(sync_peer(me, SwarmKey(None), "127.0.0.1", agent.ready["tls_port"], mine))
        mine.flush()
        second = asyncio.run(sync_peer(me, SwarmKey(None), "127.0.0.1", agent.ready["tls_port"], mine))
        total = mine.stats()["receipts"]
    finally:
        mine.close()
        agent.stop()
    assert total == n, (total, n)
    b1, b2 = first.bytes_sent + first.bytes_received, second.bytes_sent + second.bytes_received
    return {"receipts_total": n, "moved": first.pulled + first.pushed, "first_sync_s": round(first.seconds, 2),
            "first_bytes": b1, "second_sync_s": round(second.seconds, 3), "second_bytes": b2,
            "second_over_first": f"{b2 / b1:.2e}", "rounds": first.rounds}


def bench_per_token(tokens: int, tmp: Path) -> dict:
    node_id, client_id = Identity.generate(), Identity.generate()
    store = LedgerStore.open(tmp / "tok")
    node = NodeRecorder(node_id, store, lambda a, b: ("ab" * 32, "cd" * 32))
    client = ClientRecorder(client_id, store, "ab" * 32)
    rid = os.urandom(16).hex()
    recs = [HopRecord("node", rid, node_id.agent_id, 1, 15, p, 1, os.urandom(16), os.urandom(16), 1.0) for p in range(tokens)]
    t0 = time.perf_counter()
    for r in recs:
        node.observe(r)
    node_s = time.perf_counter() - t0
    for r in recs:
        client.observe(HopRecord("client", rid, node_id.agent_id, 1, 15, r.step, 1, r.input_digest, r.output_digest, 1.0, 2.0, 10.0))
    chain = node.chains[(rid, 1, 15)]
    hop = client.hops[(rid, node_id.agent_id, 1, 15)]
    t0 = time.perf_counter()
    problem = _check_chain(chain.signed, chunks_of(hop.steps, CHUNK_SIZE), node_id.public_key, rid, 1, 15, bytes.fromhex("ab" * 32))
    check_s = time.perf_counter() - t0
    assert problem is None, problem
    store.close()
    return {"tokens": tokens, "chunk": CHUNK_SIZE, "node_observe_and_sign_us_per_token": round(node_s / tokens * 1e6, 2),
            "client_check_us_per_token": round(check_s / tokens * 1e6, 2)}


def wire_bytes() -> dict:
    """Bytes one hop adds: COMMITS_GET + COMMITS + RECEIPT_SIGN + RECEIPT_SIGNED, each in a CONTROL frame."""
    fixed = (HEADER_SIZE + len(wire.commits_get(bytes(16), 0, 1))) + (HEADER_SIZE + len(wire.items(wire.Msg.COMMITS, [])))
    fixed += (HEADER_SIZE + len(wire.receipt_sign(bytes(RECEIPT.size), bytes(SIG_SIZE)))) + (HEADER_SIZE + 5 + SIG_SIZE)
    return {"per_chunk_bytes": COMMITMENT_WIRE_SIZE, "per_request_fixed_bytes": fixed,
            "per_token_bytes_at_C32": round(COMMITMENT_WIRE_SIZE / CHUNK_SIZE, 1)}


def bench_split(model: Path | None, tmp: Path, rounds: int, n_tokens: int = 64) -> dict:
    import statistics

    from edge_agent.config import resolve_model
    from edge_agent.node import AgentConfig, run
    from edge_agent.runtime.sampling import SamplingParams
    from edge_agent.runtime.shards import inspect_model
    from edge_agent.split.client import ClientConfig
    from swarm_util import start_peer

    model = model or resolve_model()
    n = inspect_model(model).n_layer
    cut = n // 2
    pairs, started = {}, []
    try:
        for mode in ("on", "off"):
            os.environ["EDGE_AGENT_LEDGER"] = mode  # the peers inherit it
            pairs[mode] = [start_peer(model, f"1:{cut}", tmp / f"{mode}-a"), start_peer(model, f"{cut}:{n - 1}", tmp / f"{mode}-b")]
            started += pairs[mode]
        os.environ.pop("EDGE_AGENT_LEDGER")
        rates: dict[str, list[float]] = {"on": [], "off": []}
        for _ in range(rounds):
            for mode in ("on", "off"):
                cfg = AgentConfig(tmp / f"client-{mode}", manual_peers=[("127.0.0.1", p.ready["tls_port"]) for p in pairs[mode]],
                                  mdns=False, host="127.0.0.1", ledger=mode == "on")
                cfg.data_dir.mkdir(exist_ok=True)
                res = asyncio.run(run(cfg, model, lambda tok: tok.encode("The capital of France is"),
                                      SamplingParams(max_tokens=n_tokens), ClientConfig(), discover_s=30.0, n_ctx=512))
                rates[mode].append(res.stats["tokens_per_s"])
    finally:
        for p in started:
            p.stop()
    on, off = statistics.median(rates["on"]), statistics.median(rates["off"])
    return {"model": Path(model).name, "tokens": n_tokens, "rounds": rounds, "tok_s_on": round(on, 2), "tok_s_off": round(off, 2),
            "on_over_off": round(on / off, 3), "all_on": rates["on"], "all_off": rates["off"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--sync-receipts", type=int, default=100_000)
    ap.add_argument("--split", nargs="?", const="", default=None, help="also split decode tok/s, ledger on vs off (GGUF; default SmolLM2)")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    n_sync = 10_000 if args.quick else args.sync_receipts
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        results = {"store": bench_store(5_000 if args.quick else 50_000, tmp), "per_token": bench_per_token(3200, tmp),
                   "wire": wire_bytes(), "sync": bench_sync(n_sync, tmp)}
        if args.split is not None:
            results["split"] = bench_split(Path(args.split) if args.split else None, tmp, args.rounds)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
