"""Audits in one process: re-execution on real llama.cpp shards flags a cheating range and
not an honest one; evidence verifies on its own and is refused when tampered; equivocation."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from nacl.signing import SigningKey

from edge_agent.discovery.identity import Identity
from edge_agent.ledger.audit import TOLERANCE, reexecute
from edge_agent.ledger.encoding import CommitmentBody, chunk_hash
from edge_agent.ledger.evidence import AuditStatement, Evidence
from edge_agent.ledger.fingerprint import distance
from edge_agent.ledger.records import Commitment
from edge_agent.ledger.store import LedgerStore
from edge_agent.runtime.engine import EngineOptions, StepInput
from edge_agent.runtime.llamacpp import LlamaCppEngine

NODE = Identity(SigningKey(bytes(range(32))))
AUDITOR = Identity(SigningKey(bytes(range(32, 64))))
SHAPE = dict(n_layer=5, n_embd=64, n_head=8, n_head_kv=4, n_ff=172, n_vocab=512, seed=14)
OPTS = EngineOptions(n_ctx_per_request=128, max_requests=2, n_threads=1)


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    from edge_agent.runtime.synthetic import make_random_gguf
    from edge_agent.split.testhooks import _requantize

    base = tmp_path_factory.mktemp("audit-models")
    model = make_random_gguf(base / "q8.gguf", ftype="q8_0", **SHAPE)
    _requantize(model, base / "q4.gguf", "q4_0")
    made = {"honest": LlamaCppEngine.from_model(model, 1, 4, OPTS, base), "downgrade": LlamaCppEngine.from_model(
        base / "q4.gguf", 1, 4, OPTS, base), "skip-layer": LlamaCppEngine.from_model(model, 1, 3, OPTS, base)}
    yield made
    for e in made.values():
        e.close()


def _frames(seed=0):
    x = np.random.default_rng(seed).standard_normal((48, 64)).astype(np.float32)
    return [(0, x[:16])] + [(p, x[p:p + 1]) for p in range(16, 48)]


def _commitment(fp: bytes, chunk: int = 0, compute_us: int = 1) -> Commitment:
    body = CommitmentBody(bytes(16), NODE.public_key, 1, 4, b"\xab" * 32, b"\xcd" * 32, chunk, 16, 48, chunk_hash([]),
                          chunk_hash([]), fp, compute_us, bytes(32) if chunk == 0 else b"\x01" * 32)
    return Commitment.sign(NODE, body)


@pytest.mark.parametrize("kind", ["honest", "downgrade", "skip-layer"])
def test_reexecution_flags_cheating_weights_only(engines, kind):
    frames = _frames()
    (reference,) = reexecute(engines["honest"], frames, [(16, 48)])
    (served,) = reexecute(engines[kind], frames, [(16, 48)])
    d = distance(served, reference)
    assert (d > TOLERANCE) == (kind != "honest"), d


def test_batched_honest_output_passes(engines):
    """Batch composition: the node ran our request next to another one."""
    frames, other = _frames(0), _frames(1)
    e = engines["honest"]
    from edge_agent.ledger.fingerprint import Accumulator

    acc = Accumulator()
    for (pos, x), (_, y) in zip(frames, other):
        out = e.forward([StepInput("a", pos, x), StepInput("b", pos, y)])[0].data
        if pos >= 16:
            acc.add(pos, out)
    e.end_request("a"), e.end_request("b")
    assert distance(acc.finish(), reexecute(e, frames, [(16, 48)])[0]) <= TOLERANCE


def test_evidence_verifies_and_refuses_tampering(engines, tmp_path):
    frames = _frames()
    (honest,) = reexecute(engines["honest"], frames, [(16, 48)])
    (cheat,) = reexecute(engines["downgrade"], frames, [(16, 48)])
    c = _commitment(cheat)
    statement = AuditStatement.sign(AUDITOR, c.id, honest, distance(cheat, honest), TOLERANCE, 1)
    ev = Evidence.failed_audit(c, statement)
    assert ev.problem() is None and ev.kind == "failed-audit" and ev.accused == NODE.agent_id
    bad = bytearray(ev.data)
    bad[-100] ^= 1
    assert Evidence(bytes(bad)).problem() is not None
    # an auditor cannot frame an honest node: a "failure" within the tolerance does not verify
    fair = AuditStatement.sign(AUDITOR, _commitment(honest).id, honest, 1.0, TOLERANCE, 1)
    assert "within the tolerance" in Evidence.failed_audit(_commitment(honest), fair).problem()
    store = LedgerStore(tmp_path / "ledger.db")
    try:
        store.add(evidence=[ev]).result(10)
        (row,) = store.evidence()
        assert row["accused"] == NODE.agent_id and Evidence(row["body"]).problem() is None
    finally:
        store.close()


def test_equivocation_is_evidence():
    a, b = _commitment(bytes(256), compute_us=1), _commitment(bytes(256), compute_us=2)
    ev = Evidence.equivocation(a, b)
    assert ev.problem() is None and ev.kind == "equivocation"
    assert Evidence.equivocation(a, a).problem() == "the two commitments are identical"
    other = Commitment.sign(NODE, dataclasses.replace(b.fields, chunk=1, prev=b"\x02" * 32))
    assert Evidence.equivocation(a, other).problem() is not None


def test_fault_options_are_refused_unless_enabled(monkeypatch):
    from edge_agent.split.testhooks import FAULTS_ENV, TestHooks

    monkeypatch.delenv(FAULTS_ENV, raising=False)
    with pytest.raises(ValueError, match=FAULTS_ENV):
        TestHooks(fault="noise").check_enabled()
    monkeypatch.setenv(FAULTS_ENV, "1")
    TestHooks(fault="noise").check_enabled()
    with pytest.raises(ValueError, match="unknown"):
        TestHooks(fault="lazy").check_enabled()


def test_a_fingerprint_that_is_not_of_the_outputs_sent_fails():
    """A node that sends noise but commits the fingerprint of honest outputs is caught
    without any re-execution: the client fingerprints what it received."""
    from edge_agent.ledger.audit import _consistency
    from edge_agent.ledger.fingerprint import fingerprint

    rng = np.random.default_rng(4)
    honest = rng.standard_normal((32, 64)).astype(np.float32)
    sent = honest + rng.standard_normal(honest.shape).astype(np.float32) * 0.2
    frames = [(16 + i, None, sent[i:i + 1]) for i in range(32)]
    c_lie, c_true = _commitment(fingerprint(16, honest)), _commitment(fingerprint(16, sent))
    (failed,) = _consistency("peer", "req", 1, 4, frames, [c_lie])
    assert not failed.passed and "outputs sent" in failed.reason
    assert _consistency("peer", "req", 1, 4, frames, [c_true]) == []
