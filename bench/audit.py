"""Calibrating the audit tolerances: fingerprint distances of honest variation vs faults.

One middle range of a random-weight Q8_0 model (and optionally the packaged SmolLM2) runs
the same inputs (hidden states from the model's own layers before the range) as the auditor would
(llama.cpp, 1 thread, one request at a time) and as:

- honest variants: 2 threads; batched with one or three other requests in every
  llama_decode; inputs perturbed by one float32 ulp (what libm or summation-order
  differences inside one compute class could cause); ONNX Runtime; llama.cpp built without
  AVX-512 (``--avx2-site``, a separate process);
- faults: the range served from a Q4_0 re-quantization of the same weights (downgrade),
  its last layer skipped, the previous frame's output (stale), noise at 10x the honest
  level, garbage.

Each request is chunked as the ledger chunks it: 32-row prefill frames (a chunk each),
then 32 single-row decode steps (one chunk). Per chunk it records the fingerprint distance
and the true relative RMS difference of the activations. It prints a JSON summary: per
variant the count, mean, p99 and max distance, and per tier (``TOLERANCE`` across compute
classes, ``TIGHT_TOLERANCE`` within one llama.cpp CPU class) the chunks flagged and the
detection rate within 1 and 2 audited chunks; the fingerprint's own rounding floor (the same
activations fingerprinted row by row, per frame, and in float64); fingerprint bytes and costs.

    .venv/bin/python bench/audit.py --requests 200 [--avx2-site /tmp/avx2/site] [--smollm [--smollm-requests N]]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from edge_agent.ledger.audit import TIGHT_TOLERANCE, TOLERANCE
from edge_agent.ledger.encoding import FINGERPRINT_SIZE
from edge_agent.ledger.fingerprint import Accumulator, _projection, _signs, distance, encode
from edge_agent.runtime.engine import EngineOptions, StepInput
from edge_agent.split.testhooks import HONEST_LEVEL, OutputFault, _requantize

PREFILL_FRAMES, ROWS, DECODE = 3, 32, 32
SHAPE = dict(n_layer=8, n_embd=256, n_head=8, n_head_kv=4, n_ff=688, n_vocab=2048, seed=14)


def _opts(threads: int) -> EngineOptions:
    return EngineOptions(n_ctx_per_request=PREFILL_FRAMES * ROWS + DECODE + 8, max_requests=4, n_threads=threads)


def make_inputs(model: Path, start: int, requests: int, seed: int = 0) -> np.ndarray:
    """(requests, positions, n_embd) hidden states entering layer ``start`` for random token sequences."""
    from edge_agent.runtime.llamacpp import LlamaCppEngine

    head = LlamaCppEngine.from_model(model, 0, start, _opts(1))
    rng = np.random.default_rng(seed)
    n = PREFILL_FRAMES * ROWS + DECODE
    out = []
    for r in range(requests):
        tokens = rng.integers(3, head.info.n_vocab, n).astype(np.int32)
        out.append(head.forward([StepInput(f"in{r}", 0, tokens)])[0].data)
        head.end_request(f"in{r}")
    head.close()
    return np.stack(out)


def frames_of(x: np.ndarray) -> list[tuple[int, np.ndarray]]:
    """A request's frames as the client sends them: prefill pieces, then one row per step."""
    pre = [(p, x[p:p + ROWS]) for p in range(0, PREFILL_FRAMES * ROWS, ROWS)]
    return pre + [(p, x[p:p + 1]) for p in range(PREFILL_FRAMES * ROWS, len(x))]


def run_engine(engine, inputs: np.ndarray, neighbours: int = 0) -> np.ndarray:
    """Outputs of every request, alone or with ``neighbours`` other requests in every forward call
    (three make decode batches of four rows: llama.cpp's multi-row kernels rather than its one-row ones)."""
    outs = np.zeros_like(inputs)
    for r, x in enumerate(inputs):
        for pos, rows in frames_of(x):
            steps = [StepInput(f"r{r}", pos, rows)]
            for k in range(1, neighbours + 1):  # neighbours with other content share each llama_decode
                steps.append(StepInput(f"n{r}.{k}", pos, inputs[(r + k) % len(inputs)][pos:pos + len(rows)]))
            outs[r, pos:pos + len(rows)] = engine.forward(steps)[0].data
        for rid in [f"r{r}", *(f"n{r}.{k}" for k in range(1, neighbours + 1))]:
            engine.end_request(rid)
    return outs


def chunk_fingerprints(outputs: np.ndarray) -> list[list[bytes]]:
    """Per request, the fingerprint of each chunk (the node recorder's chunking)."""
    result = []
    for y in outputs:
        fps = [Accumulator() for _ in range(PREFILL_FRAMES + 1)]
        for pos, rows in frames_of(y):
            fps[min(pos // ROWS, PREFILL_FRAMES)].add(pos, rows)
        result.append([a.finish() for a in fps])
    return result


def chunk_rel_rms(a: np.ndarray, ref: np.ndarray) -> list[float]:
    out = []
    for y, r in zip(a, ref):
        for c in range(PREFILL_FRAMES + 1):
            s = slice(c * ROWS, (c + 1) * ROWS)
            with np.errstate(all="ignore"):
                out.append(float(np.linalg.norm(y[s] - r[s]) / np.linalg.norm(r[s])))
    return out


def stale(ref: np.ndarray) -> np.ndarray:
    """Each frame answered with the request's previous frame's output (same shape: decode rows)."""
    out = ref.copy()
    fault = OutputFault("stale")
    for r, y in enumerate(ref):
        for pos, rows in frames_of(y):
            out[r, pos:pos + len(rows)] = fault.apply(f"r{r}", rows)
    return out


def fingerprint_floor(outputs: np.ndarray) -> float:
    """The largest distance between fingerprints of the *same* activations computed three ways
    (row by row, one block per frame, the projection in float64): float and fp16 rounding
    alone, the floor under any tolerance."""
    worst = 0.0
    for y in outputs:
        for c in range(PREFILL_FRAMES):
            rows = y[c * ROWS:(c + 1) * ROWS]
            block, by_row = Accumulator(), Accumulator()
            block.add(c * ROWS, rows)
            for i, row in enumerate(rows):
                by_row.add(c * ROWS + i, row[None, :])
            signs = _signs(np.arange(c * ROWS, (c + 1) * ROWS)).astype(np.float64)
            exact = encode(np.sum(signs * (rows.astype(np.float64) @ _projection(rows.shape[1]).astype(np.float64)), axis=0)
                           / np.sqrt(ROWS))
            fps = (block.finish(), by_row.finish(), exact)
            worst = max(worst, *(distance(a, b) for a in fps for b in fps))
    return round(worst, 6)


def _detection(flagged: np.ndarray, requests: int) -> dict:
    per_request = flagged.reshape(requests, -1)
    return {"flagged": int(flagged.sum()), "detected_within_1": round(float(per_request[:, :1].any(axis=1).mean()), 4),
            "detected_within_2": round(float(per_request[:, :2].any(axis=1).mean()), 4)}


def summarize(name: str, fps, ref_fps, rel: list[float]) -> dict:
    d = np.array([distance(f, g) for fr, gr in zip(fps, ref_fps) for f, g in zip(fr, gr)])
    finite = d[np.isfinite(d)]
    return {"variant": name, "chunks": int(d.size), "cross_class": _detection(d > TOLERANCE, len(fps)),
            "same_class": _detection(d > TIGHT_TOLERANCE, len(fps)),
            "distance_mean": round(float(finite.mean()), 5) if finite.size else None,
            "distance_p01": round(float(np.quantile(finite, 0.01)), 5) if finite.size else None,
            "distance_p99": round(float(np.quantile(finite, 0.99)), 5) if finite.size else None,
            "distance_max": round(float(d.max()), 5), "distance_min": round(float(d.min()), 5),
            "rel_rms_mean": round(float(np.nanmean(rel)), 5), "rel_rms_max": round(float(np.nanmax(rel)), 5)}


def avx2_outputs(model: Path, start: int, end: int, inputs: np.ndarray, site: str, work: Path) -> np.ndarray:
    np.save(work / "inputs.npy", inputs)
    env = dict(os.environ, PYTHONPATH=site + os.pathsep + os.environ.get("PYTHONPATH", ""))
    subprocess.run([sys.executable, __file__, "--worker", str(model), str(start), str(end), str(work)], env=env, check=True)
    return np.load(work / "outputs.npy")


def measure(model: Path, start: int, end: int, requests: int, work: Path, avx2_site: str | None) -> list[dict]:
    from edge_agent.runtime.llamacpp import LlamaCppEngine
    from edge_agent.runtime.onnx import OnnxEngine

    inputs = make_inputs(model, start, requests)
    auditor = LlamaCppEngine.from_model(model, start, end, _opts(1), work)
    ref = run_engine(auditor, inputs)
    t0 = time.perf_counter()
    ref_fps = chunk_fingerprints(ref)
    fp_us = (time.perf_counter() - t0) * 1e6 / (inputs.shape[0] * inputs.shape[1])
    rows = []

    def add(name: str, outputs: np.ndarray) -> None:
        rows.append(summarize(name, chunk_fingerprints(outputs), ref_fps, chunk_rel_rms(outputs, ref)))
        print(json.dumps(rows[-1]), file=sys.stderr)

    add("honest: same engine (repeat)", run_engine(auditor, inputs))
    add("honest: batched with another request", run_engine(auditor, inputs, neighbours=1))
    add("honest: batched with three other requests", run_engine(auditor, inputs, neighbours=3))
    ulp = np.random.default_rng(2).choice(np.float32([-1, 1]), inputs.shape) * np.finfo(np.float32).eps
    add("honest: inputs perturbed by 1 ulp", run_engine(auditor, (inputs * (1 + ulp)).astype(np.float32)))
    two = LlamaCppEngine.from_model(model, start, end, _opts(2), work)
    add("honest: 2 threads", run_engine(two, inputs))
    two.close()
    onnx = OnnxEngine.from_model(model, start, end, _opts(1), work)
    add("honest: ONNX Runtime", run_engine(onnx, inputs))
    onnx.close()
    if avx2_site:
        add("honest: llama.cpp without AVX-512", avx2_outputs(model, start, end, inputs, avx2_site, work))
    q4 = work / "downgraded.q4_0.gguf"
    _requantize(model, q4, "q4_0")
    down = LlamaCppEngine.from_model(q4, start, end, _opts(1), work)
    add("fault: downgrade to Q4_0", run_engine(down, inputs))
    down.close()
    skip = LlamaCppEngine.from_model(model, start, end - 1, _opts(1), work)
    add("fault: skip-layer", run_engine(skip, inputs))
    skip.close()
    add("fault: stale", stale(ref))
    rng = np.random.default_rng(1)
    rms = np.sqrt(np.mean(np.square(ref), axis=-1, keepdims=True))
    add("fault: noise 10x honest", (ref + rng.standard_normal(ref.shape) * 10 * HONEST_LEVEL * rms).astype(np.float32))
    add("fault: garbage", (rng.standard_normal(ref.shape) * rms).astype(np.float32))
    auditor.close()
    rows.append({"fingerprint_bytes": FINGERPRINT_SIZE, "fingerprint_us_per_row": round(fp_us, 2),
                 "fingerprint_rounding_floor": fingerprint_floor(ref), "tolerance": TOLERANCE,
                 "tight_tolerance": TIGHT_TOLERANCE, "model": model.name, "layers": f"{start}:{end}"})
    return rows


def node_overhead(model: Path, start: int, end: int, work: Path, steps: int = 64) -> dict:
    """The node's extra work per decode token (fingerprinting the output row, done after the
    reply) against the shard's own compute per token, both timed here (median of ``steps``)."""
    from edge_agent.runtime.llamacpp import LlamaCppEngine

    engine = LlamaCppEngine.from_model(model, start, end, _opts(1), work)
    x = np.random.default_rng(0).standard_normal((steps + 1, engine.info.n_embd)).astype(np.float32) * 0.1
    acc, compute, fingerprint = Accumulator(), [], []
    engine.forward([StepInput("t", 0, x[:1])])
    for p in range(1, steps + 1):
        t0 = time.perf_counter()
        out = engine.forward([StepInput("t", p, x[p:p + 1])])[0].data
        t1 = time.perf_counter()
        acc.add(p, out)
        compute.append(t1 - t0)
        fingerprint.append(time.perf_counter() - t1)
    engine.close()
    c, f = float(np.median(compute)) * 1e3, float(np.median(fingerprint)) * 1e3
    return {"model": model.name, "layers": f"{start}:{end}", "compute_ms_per_token": round(c, 3),
            "fingerprint_ms_per_token": round(f, 4), "overhead_pct": round(100 * f / c, 2)}


def _worker(model: str, start: int, end: int, work: str) -> None:
    """In the AVX2-only build's process: the reference engine's outputs for the saved inputs."""
    from edge_agent.runtime.llamacpp import LlamaCppEngine

    engine = LlamaCppEngine.from_model(model, start, end, _opts(1), work)
    np.save(Path(work) / "outputs.npy", run_engine(engine, np.load(Path(work) / "inputs.npy")))
    engine.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=200, help="requests per variant (4 chunks each)")
    ap.add_argument("--avx2-site", help="site-packages of a llama_cpp built without AVX-512")
    ap.add_argument("--smollm", action="store_true", help="also the packaged SmolLM2 (Q4_1 -> Q4_0), layers 4:26")
    ap.add_argument("--smollm-requests", type=int, help="requests per variant on SmolLM2 (default: --requests / 10, at least 10)")
    ap.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        _worker(args.worker[0], int(args.worker[1]), int(args.worker[2]), args.worker[3])
        return
    from edge_agent.runtime.synthetic import make_random_gguf

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = make_random_gguf(work / "rand-q8_0.gguf", ftype="q8_0", **SHAPE)
        result = {"random_q8_0": measure(model, 1, 7, args.requests, work, args.avx2_site)}
        if args.smollm:
            from edge_agent.config import packaged_model

            n = args.smollm_requests or max(10, args.requests // 10)
            result["smollm2_q4_1"] = measure(packaged_model(), 4, 26, n, work, args.avx2_site)
            result["node_overhead"] = [node_overhead(packaged_model(), 4, 26, work)]
        result.setdefault("node_overhead", []).insert(0, node_overhead(model, 1, 7, work))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
