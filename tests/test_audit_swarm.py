"""Audits in a real swarm: peers are separate `edge-agent join` processes (real llama.cpp or
ONNX Runtime shards, real TLS); the client audits every chunk (rate 1.0).

Each cheating node (``--test-fault``, allowed by EDGE_AGENT_TEST_FAULTS=1) is caught within
2 audited chunks, with self-verifying evidence naming it in the client's ledger; honest
variation (another thread count, a batch shared with another request, ONNX Runtime instead
of llama.cpp) raises no flag. The peers advertise their compute class in their capability
records: llama.cpp peers on this machine share the client's and are audited at the tight tier."""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

from edge_agent.ledger.evidence import Evidence
from edge_agent.node import AgentConfig, swarm_client
from edge_agent.runtime.engine import EngineOptions
from edge_agent.runtime.sampling import SamplingParams
from edge_agent.split.client import ClientConfig
from swarm_util import start_peer

SHAPE = dict(n_layer=5, n_embd=64, n_head=8, n_head_kv=4, n_ff=172, n_vocab=512, seed=14)
FAULTS = ("downgrade", "skip-layer", "stale", "noise", "garbage")
HONEST = {"1 thread": ("--threads", "1"), "2 threads": ("--threads", "2"), "onnx": ("--backend", "onnx")}


@pytest.fixture(scope="module")
def swarm(tmp_path_factory):
    from edge_agent.runtime.synthetic import make_random_gguf

    base = tmp_path_factory.mktemp("audit-swarm")
    model = make_random_gguf(base / "q8_0.gguf", ftype="q8_0", **SHAPE)
    os.environ["EDGE_AGENT_TEST_FAULTS"] = "1"  # the peers inherit it; nothing else in this process reads it
    kinds = {**{f: ("--test-fault", f) for f in FAULTS}, **HONEST}
    try:
        with ThreadPoolExecutor(4) as pool:
            started = dict(zip(kinds, pool.map(lambda k: start_peer(model, "1:4", base / k.replace(" ", "-"), *kinds[k]), kinds)))
    finally:
        os.environ.pop("EDGE_AGENT_TEST_FAULTS", None)
    yield model, started, base
    for p in started.values():
        p.stop()


def _audited(base, model, peer, name: str, *, backend="llamacpp", concurrent=1, n=40):
    """Generate through ``peer`` alone with every chunk audited: (auditor outcomes, evidence rows)."""
    cfg = AgentConfig(base / f"client-{name}", manual_peers=[("127.0.0.1", peer.ready["tls_port"])], mdns=False, host="127.0.0.1")
    cfg.data_dir.mkdir(exist_ok=True)

    async def go():
        async with swarm_client(cfg, model, ClientConfig(backend=backend), EngineOptions(n_ctx_per_request=512, max_requests=2),
                                discover_s=30.0, audit_rate=1.0) as client:
            prompts = [client.tokenizer.encode(p) for p in ("Once upon a time", "The capital of France is")[:concurrent]]
            results = await asyncio.gather(*(client.generate(p, SamplingParams(max_tokens=n)) for p in prompts))
            auditor = client.auditor
        return auditor, results

    auditor, results = asyncio.run(go())
    assert all(h["peer_id"] == peer.agent_id for r in results for h in r.stats["path"])
    db = sqlite3.connect(cfg.data_dir / "ledger.db")
    try:
        rows = db.execute("SELECT kind, accused, body FROM evidence").fetchall()
    finally:
        db.close()
    return auditor.outcomes, rows


@pytest.mark.slow
@pytest.mark.parametrize("fault", FAULTS)
def test_each_fault_is_caught_within_two_audited_chunks_and_attributed(swarm, fault):
    model, peers, base = swarm
    outcomes, evidence = _audited(base, model, peers[fault], fault)
    assert len(outcomes) >= 3  # prefill chunk + two decode chunks, all audited
    first_two = sorted(outcomes, key=lambda o: o.chunk)[:2]
    assert any(not o.passed for o in first_two), [(o.chunk, o.distance) for o in outcomes]
    assert all(o.peer_id == peers[fault].agent_id for o in outcomes)
    assert {o.tier for o in outcomes} == {"same-class"}  # its advertised class is the client's: llama.cpp, this build
    assert evidence and {row[1] for row in evidence} == {peers[fault].agent_id}
    assert all(Evidence(row[2]).problem() is None and row[0] == "failed-audit" for row in evidence)
    if fault == "downgrade":  # the command line shows it, re-verified
        out = subprocess.run([sys.executable, "-m", "edge_agent", "ledger", "evidence", "--json", "--data-dir",
                              str(base / f"client-{fault}")], capture_output=True, text=True, timeout=120)
        shown = [json.loads(line) for line in out.stdout.splitlines()]
        assert len(shown) == len(evidence) and all(e["valid"] and e["accused"] == peers[fault].agent_id and
                                                   e["distance"] > e["tolerance"] for e in shown), out.stdout + out.stderr
        # synced: the client's end-of-run sync gave it to the peer; a third agent syncing with that peer gets it
        third = base / "third-agent"
        out = subprocess.run([sys.executable, "-m", "edge_agent", "ledger", "sync", "--peer", peers[fault].address,
                              "--data-dir", str(third)], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0 and json.loads(out.stdout)["evidence"] == len(evidence), out.stdout + out.stderr
        out = subprocess.run([sys.executable, "-m", "edge_agent", "ledger", "evidence", "--json", "--data-dir", str(third)],
                             capture_output=True, text=True, timeout=120)
        assert [json.loads(line)["id"] for line in out.stdout.splitlines()] == [e["id"] for e in shown]


@pytest.mark.slow
@pytest.mark.parametrize("name", list(HONEST))
def test_honest_variation_raises_no_flag(swarm, name):
    model, peers, base = swarm
    backend = "onnx" if name == "onnx" else "llamacpp"  # the auditor re-executes on the path's runtime
    outcomes, evidence = _audited(base, model, peers[name], name, backend=backend, concurrent=2 if name == "1 thread" else 1)
    assert len(outcomes) >= 3 and all(o.passed for o in outcomes), [(o.chunk, o.distance) for o in outcomes]
    assert evidence == []
    # llama.cpp peers share the client's compute class (held to 0.005, and at 0); ONNX is not measured bit-exact
    assert {o.tier for o in outcomes} == {"cross-class" if name == "onnx" else "same-class"}
