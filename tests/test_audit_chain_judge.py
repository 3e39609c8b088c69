"""Chain audits in one process (``ledger.chain_audit``): three hops of real llama.cpp shards
recomputed from hop 0's inputs; what each hop is judged against when its input is, or is
not, bit-identical to the auditor's; broken links.

A node of another compute class is the one thing this machine cannot provide (every
llama.cpp engine here rounds alike): it is stood in for by adding noise of a stated relative
RMS to an honest hop's output, which is what a foreign class's rounding looks like to an
auditor (1-4 %, docs/accountability.md)."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from nacl.signing import SigningKey

from edge_agent.discovery.identity import Identity
from edge_agent.ledger.audit import MAX_CARRIED, TIGHT_TOLERANCE, TOLERANCE, Auditor, UnattributableFault
from edge_agent.ledger.chain_audit import ChainHop, boundaries, judge, recompute
from edge_agent.ledger.encoding import CommitmentBody, chunk_hash
from edge_agent.ledger.fingerprint import Accumulator
from edge_agent.ledger.records import Commitment
from edge_agent.runtime.engine import EngineOptions, StepInput
from edge_agent.runtime.llamacpp import LlamaCppEngine
from edge_agent.split.observe import HopRecord, digest
from edge_agent.transport import Flag

SHAPE = dict(n_layer=7, n_embd=64, n_head=8, n_head_kv=4, n_ff=172, n_vocab=512, seed=14)
OPTS = EngineOptions(n_ctx_per_request=128, max_requests=2, n_threads=1)
RANGES = {"a": (1, 2), "b": (2, 4), "c": (4, 6)}
NODES = {name: Identity(SigningKey(bytes([i + 1]) * 32)) for i, name in enumerate(RANGES)}


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    from edge_agent.runtime.synthetic import make_random_gguf

    base = tmp_path_factory.mktemp("chain-judge")
    model = make_random_gguf(base / "q8.gguf", ftype="q8_0", **SHAPE)
    made = {r: LlamaCppEngine.from_model(model, *r, OPTS, base) for r in [*RANGES.values(), (2, 3)]}
    yield made
    for e in made.values():
        e.close()


def _frames(seed=0):
    x = np.random.default_rng(seed).standard_normal((48, 64)).astype(np.float32)
    return [(0, x[:16], 0)] + [(p, x[p:p + 1], 0) for p in range(16, 48)]


def _serve(engine, frames, noise: float = 0.0, seed: int = 1):
    """What a node computes and forwards: [(pos, input rows, output rows)]; ``noise``: relative RMS added."""
    rng, out = np.random.default_rng(seed), []
    for pos, x, _ in frames:
        y = engine.forward([StepInput("node", pos, x)])[0].data
        if noise:
            y = (y + noise * np.sqrt(np.mean(y ** 2)) * rng.standard_normal(y.shape)).astype(np.float32)
        out.append((pos, x, y))
    engine.end_request("node")
    return out


def _commit(name: str, served, tolerance: float, tier: str, inputs_hash: bytes | None = None) -> ChainHop:
    """The hop's signed commitments as a node's recorder makes them: a prefill chunk, a decode chunk."""
    start, end = RANGES[name]
    commitments, prev = [], bytes(32)
    for i, (lo, hi) in enumerate([(0, 16), (16, 48)]):
        rows = [(p, x, y) for p, x, y in served if lo <= p < hi]
        acc = Accumulator()
        for p, _, y in rows:
            acc.add(p, y)
        body = CommitmentBody(bytes(16), NODES[name].public_key, start, end, b"\xab" * 32, b"\xcd" * 32, i, lo, hi,
                              inputs_hash or chunk_hash([digest(x.tobytes()) for _, x, _ in rows]),
                              chunk_hash([digest(y.tobytes()) for _, _, y in rows]), acc.finish(), 1, prev)
        commitments.append(Commitment.sign(NODES[name], body))
        prev = commitments[-1].id
    return ChainHop(NODES[name].public_key.hex(), start, end, commitments, tolerance, tier, {0, 1})


def _chain(engines, *, a_noise=0.0, b_engine=(2, 4), b_inputs_hash=None, a_tier=("same-class", TIGHT_TOLERANCE)):
    """Run the chain a -> b -> c as nodes would, then audit it: {hop name: [verdicts]}, broken links."""
    frames = _frames()
    a = _serve(engines[(1, 2)], frames, a_noise)
    b = _serve(engines[b_engine], [(p, y, 0) for p, _, y in a])
    c = _serve(engines[(4, 6)], [(p, y, 0) for p, _, y in b])
    hops = [_commit("a", a, a_tier[1], a_tier[0]), _commit("b", b, TIGHT_TOLERANCE, "same-class", b_inputs_hash),
            _commit("c", c, TIGHT_TOLERANCE, "same-class")]
    assert boundaries([(h.start, h.end) for h in hops]) == [(1, 2), (2, 4), (4, 6)]
    at = recompute({r: engines[r] for r in RANGES.values()}, frames, 48)
    verdicts, broken = judge(hops, at, 48, TOLERANCE, MAX_CARRIED)
    by = {name: [v for v in verdicts if v.hop is hop] for name, hop in zip("abc", hops)}
    return by, broken


def test_same_class_chain_is_judged_exactly_at_every_hop(engines):
    by, broken = _chain(engines)
    assert not broken
    assert all(len(by[h]) == 2 and all(v.passed and v.distance == 0.0 and v.tier == "same-class" for v in by[h]) for h in "abc")


def test_a_foreign_class_upstream_is_carried_into_a_cumulative_tolerance(engines):
    by, broken = _chain(engines, a_noise=0.015, a_tier=("cross-class", TOLERANCE))
    assert not broken and all(v.passed for h in "abc" for v in by[h]), {h: [v.distance for v in by[h]] for h in "abc"}
    assert all(len(by[h]) == 2 for h in "abc")
    assert {v.tier for v in by["a"]} == {"cross-class"} and {v.tier for h in "bc" for v in by[h]} == {"cumulative"}
    assert all(v.distance > 0 for h in "bc" for v in by[h])  # inexact: it is the bound, not bit equality, that holds


def test_an_upstream_deviation_under_its_tolerance_does_not_blame_an_honest_successor(engines):
    """Hop a deviates by 6 % (passes the cross-class tier, 8 %, but more than an honest class
    carries): the hops after it compute from that input, which the auditor does not know well
    enough to judge them: they are not judged, so never blamed for it."""
    by, _ = _chain(engines, a_noise=0.06, a_tier=("cross-class", TOLERANCE))
    assert all(v.passed and v.distance > MAX_CARRIED for v in by["a"])
    assert by["b"] == [] and by["c"] == []


def test_a_cheating_middle_hop_after_a_foreign_class_is_caught_and_the_next_hop_not_judged(engines):
    by, _ = _chain(engines, a_noise=0.015, a_tier=("cross-class", TOLERANCE), b_engine=(2, 3))  # b skips its last layer
    assert all(v.passed for v in by["a"])
    assert by["b"] and all(not v.passed and v.tier == "cumulative" for v in by["b"]), [v.distance for v in by["b"]]
    assert by["c"] == []  # its input is the cheater's output: unknown to the auditor


def test_a_same_class_cheater_is_judged_from_its_exact_input(engines):
    by, _ = _chain(engines, b_engine=(2, 3))
    assert all(v.passed and v.distance == 0.0 for v in by["a"])
    assert by["b"] and all(not v.passed and v.tier == "same-class" for v in by["b"])
    assert by["c"] == []


def test_a_broken_link_names_no_node_and_stops_judging_downstream(engines):
    """b commits an input that a did not commit as its output: one of them lies, the records
    cannot say which. With a of a foreign class b's input is not exact, so b is not judged."""
    by, broken = _chain(engines, a_noise=0.015, a_tier=("cross-class", TOLERANCE), b_inputs_hash=b"\x07" * 32)
    assert [pos for pos, _ in broken] == [0, 16] and all("layers 2" in what for _, what in broken)
    assert all(v.passed for v in by["a"]) and by["b"] == [] and by["c"] == []


@pytest.mark.parametrize("case", ["skip-layer at b", "broken link into b"])
def test_the_auditor_names_the_cheater_or_refuses_to_name_anyone(engines, case):
    """The Auditor's wiring: CHAIN-flagged client records (hop 0's input, the last hop's
    output), each hop's verified commitments, then ``on_settled``; ``fault`` answers the
    cheater and the first position it corrupted, or raises for a link that names no node."""
    frames = _frames()
    a = _serve(engines[(1, 2)], frames)
    b = _serve(engines[(2, 3) if case == "skip-layer at b" else (2, 4)], [(p, y, 0) for p, _, y in a])
    c = _serve(engines[(4, 6)], [(p, y, 0) for p, _, y in b])
    hops = [_commit("a", a, TOLERANCE, ""), _commit("b", b, TOLERANCE, "", b"\x07" * 32 if "link" in case else None),
            _commit("c", c, TOLERANCE, "")]
    rid = bytes(16).hex()
    auditor = Auditor(NODES["a"], None, lambda s, e: engines[(s, e)], rate=1.0, seed=1)

    async def audit():
        for (pos, x, _), (_, _, y) in zip(frames, c):
            for name, hop in zip("abc", hops):
                first, last = name == "a", name == "c"
                auditor.observe(HopRecord("client", rid, hop.peer_id, hop.start, hop.end, pos, x.shape[0],
                                          digest(x.tobytes()) if first else b"", digest(y.tobytes()) if last else b"", 0.0,
                                          flags=int(Flag.CHAIN), input=x if first else None, output=y if last else None))
        for hop in hops:
            auditor.on_commitments(rid, hop.peer_id, hop.start, hop.end, hop.commitments)
        auditor.on_settled(rid)
        return await auditor.fault(rid)

    if case == "skip-layer at b":
        assert asyncio.run(audit()) == (hops[1].peer_id, 0)
        failed = [o for o in auditor.outcomes if not o.passed]
        assert {o.peer_id for o in failed} == {hops[1].peer_id} and all(o.evidence_id for o in failed)
        assert {o.peer_id for o in auditor.outcomes if o.passed} == {hops[0].peer_id}  # c: after the cheater, not judged
    else:
        with pytest.raises(UnattributableFault, match="broken chain link"):
            asyncio.run(audit())
        assert all(o.passed for o in auditor.outcomes if o.peer_id)  # a passed (exact); b and c: not judged, not blamed
