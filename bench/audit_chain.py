"""Chain-mode audits: what an honest hop does with a deviation it is fed, and the cumulative tier.

Three consecutive hops a -> b -> c of one model run as the auditor runs them (llama.cpp, 1
thread), fed the model's own hidden states (``bench/audit.py``'s requests: 3 prefill frames
of 32 rows + 32 decode steps = 4 ledger chunks). Hop a's output is then perturbed by noise
of a relative RMS ``delta`` per row, standing in for a node of another compute class (this
machine has one), and b and c compute from it honestly; or b cheats (skip-layer, downgrade)
after a perturbed a. For each chunk pair (upstream, downstream) it records the upstream's
fingerprint distance ``carried`` and the downstream's ``d``, both against the auditor's
recomputation from the honest a, and prints per variant: chunks, carried max, the chunks
flagged by ``ledger.chain_audit``'s rule (judged when carried <= ``MAX_CARRIED``, failed when
``d > sqrt(TOLERANCE^2 + carried^2)``), those flagged by the rule without the cap, and the
worst margin ``d - tolerance`` of each (docs/accountability.md, "Chain mode").

    .venv/bin/python bench/audit_chain.py --requests 20 [--smollm-requests 8]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np

from audit import DECODE, PREFILL_FRAMES, ROWS, SHAPE, _opts, frames_of, make_inputs
from edge_agent.ledger.audit import MAX_CARRIED, TOLERANCE
from edge_agent.ledger.fingerprint import Accumulator, distance
from edge_agent.runtime.engine import StepInput
from edge_agent.runtime.llamacpp import LlamaCppEngine
from edge_agent.split.testhooks import _requantize

DELTAS = (0.01, 0.02, 0.03, 0.04, 0.06, 0.08)
CHUNKS = [(i * ROWS, (i + 1) * ROWS) for i in range(PREFILL_FRAMES)] + [(PREFILL_FRAMES * ROWS, PREFILL_FRAMES * ROWS + DECODE)]


def run(engine, frames) -> list[tuple[int, np.ndarray]]:
    out = [(pos, engine.forward([StepInput("r", pos, x)])[0].data) for pos, x in frames]
    engine.end_request("r")
    return out


def fingerprints(outs) -> list[bytes]:
    fps = []
    for lo, hi in CHUNKS:
        acc = Accumulator()
        for pos, y in outs:
            if lo <= pos < hi:
                acc.add(pos, y)
        fps.append(acc.finish())
    return fps


def perturb(outs, delta: float, rng) -> list[tuple[int, np.ndarray]]:
    return [(p, (y + delta * np.sqrt(np.mean(y ** 2, axis=1, keepdims=True)) * rng.standard_normal(y.shape)).astype(np.float32))
            for p, y in outs]


def summarize(pairs: list[tuple[float, float]]) -> dict:
    p = np.array(pairs)
    margin = p[:, 1] - np.hypot(TOLERANCE, p[:, 0])
    judged = p[:, 0] <= MAX_CARRIED
    return {"chunks": len(p), "carried_max": round(float(p[:, 0].max()), 4),
            "flagged": int((margin[judged] > 0).sum()), "judged": int(judged.sum()),
            "worst_margin": round(float(margin[judged].max()), 4) if judged.any() else None,
            "flagged_without_cap": int((margin > 0).sum()), "worst_margin_without_cap": round(float(margin.max()), 4)}


def measure(model: Path, ranges: list[tuple[int, int]], requests: int, work: Path) -> dict:
    a, b, c = ranges
    engines = {r: LlamaCppEngine.from_model(model, *r, _opts(1), work) for r in ranges}
    engines["skip-layer"] = LlamaCppEngine.from_model(model, b[0], b[1] - 1, _opts(1), work)
    _requantize(model, work / "q4_0.gguf", "q4_0")
    engines["downgrade"] = LlamaCppEngine.from_model(work / "q4_0.gguf", *b, _opts(1), work)
    pairs: dict[str, list[tuple[float, float]]] = {}
    rng = np.random.default_rng(7)
    for x in make_inputs(model, a[0], requests):
        honest_a = run(engines[a], frames_of(x))
        honest_b = run(engines[b], honest_a)
        ref = [fingerprints(honest_a), fingerprints(honest_b), fingerprints(run(engines[c], honest_b))]
        for delta in DELTAS:
            fed_a = perturb(honest_a, delta, rng)
            fed_b = run(engines[b], fed_a)
            d = [[distance(f, r) for f, r in zip(fingerprints(outs), want)] for outs, want in
                 zip((fed_a, fed_b, run(engines[c], fed_b)), ref)]
            pairs.setdefault(f"honest, upstream +{delta}", []).extend([*zip(d[0], d[1]), *zip(d[1], d[2])])
            if delta == 0.02:
                for fault in ("skip-layer", "downgrade"):
                    cheat = [distance(f, r) for f, r in zip(fingerprints(run(engines[fault], fed_a)), ref[1])]
                    pairs.setdefault(f"{fault} at b, upstream +{delta}", []).extend(zip(d[0], cheat))
    for e in engines.values():
        e.close()
    return {name: summarize(p) for name, p in pairs.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=20, help="requests on the random-weight Q8_0 model")
    ap.add_argument("--smollm-requests", type=int, default=0, help="requests on the packaged SmolLM2 (0: skip)")
    args = ap.parse_args()
    from edge_agent.runtime.synthetic import make_random_gguf

    out = {"max_carried": MAX_CARRIED, "tolerance": TOLERANCE}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = make_random_gguf(work / "q8_0.gguf", ftype="q8_0", **SHAPE)
        out["random_q8_0"] = measure(model, [(1, 3), (3, 5), (5, 7)], args.requests, work)
        if args.smollm_requests:
            from edge_agent.config import packaged_model

            (work / "smollm").mkdir()
            out["smollm2"] = measure(packaged_model(), [(1, 10), (10, 20), (20, 29)], args.smollm_requests, work / "smollm")
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
