"""ONNX Runtime vs llama.cpp: ms per layer per token of a middle shard, measured in one run.

``onnx_rows(model_path, threads)`` times the same middle shard on both backends (one
request: a 32-row prefill, then 32 single-row decode steps; the median decode step divided
by the shard's layers; three rounds alternating the backends, best round kept, since the
machine may be shared) and returns one row per backend. bench/runtime.py adds these rows to
its table; ``python bench/runtime_onnx.py`` builds random-weight Q4_0, Q8_0 and F16 models of
a ~0.4B layer shape and prints the table on its own.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from edge_agent.runtime.engine import EngineOptions, StepInput
from edge_agent.runtime.shards import inspect_model

PREFILL = 32
DECODE = 32
ROUNDS = 3


def _time_engine(engine, n_embd: int, seed: int = 0) -> tuple[float, float]:
    """(median decode ms per token, prefill ms per row) for one request on ``engine``."""
    rng = np.random.default_rng(seed)
    h = rng.standard_normal((PREFILL + DECODE + 2, n_embd)).astype(np.float32)
    t0 = time.perf_counter()
    engine.forward([StepInput("bench", 0, h[:PREFILL])])
    prefill_ms = (time.perf_counter() - t0) * 1000.0 / PREFILL
    steps = []
    for i in range(PREFILL, PREFILL + DECODE):
        t0 = time.perf_counter()
        engine.forward([StepInput("bench", i, h[i : i + 1])])
        steps.append((time.perf_counter() - t0) * 1000.0)
    engine.end_request("bench")
    return statistics.median(steps[2:]), prefill_ms


def _quant_label(info) -> str:
    """The ggml types of the decoder layers' matrices (what the timed shard runs)."""
    return "+".join(sorted({t.type for t in info.tensors if t.name.startswith("blk.") and len(t.shape) == 2})) or "?"


def onnx_rows(model_path: Path | str, threads: int, start: int | None = None, end: int | None = None, cache_dir=None) -> list[dict]:
    """Time layers [start, end) (default: all but the first and last) on llama.cpp and ONNX Runtime."""
    from edge_agent.runtime.llamacpp import LlamaCppEngine
    from edge_agent.runtime.onnx import OnnxEngine

    info = inspect_model(model_path)
    start = 1 if start is None else start
    end = info.n_layer - 1 if end is None else end
    opts = EngineOptions(n_ctx_per_request=PREFILL + DECODE + 8, max_requests=1, n_threads=threads)
    n = end - start
    with tempfile.TemporaryDirectory(prefix="bench-onnx-") as tmp:
        cache = Path(cache_dir or tmp)
        engines, load_s = {}, {}
        try:
            for backend, cls in (("llamacpp", LlamaCppEngine), ("onnx", OnnxEngine)):
                t0 = time.perf_counter()
                engines[backend] = cls.from_model(model_path, start, end, opts, cache)
                load_s[backend] = time.perf_counter() - t0
                _time_engine(engines[backend], info.n_embd, seed=1)  # warm-up (ORT plans, page-in)
            # alternate the backends and keep each one's best round: the machine may be shared
            best: dict[str, tuple[float, float]] = {}
            for _ in range(ROUNDS):
                for backend, engine in engines.items():
                    decode_ms, prefill_ms = _time_engine(engine, info.n_embd)
                    old = best.get(backend)
                    best[backend] = (min(decode_ms, old[0]), min(prefill_ms, old[1])) if old else (decode_ms, prefill_ms)
        finally:
            for engine in engines.values():
                engine.close()
    rows = [
        {
            "backend": backend, "model": Path(model_path).name, "quant": _quant_label(info), "layers": f"{start}:{end}",
            "threads": threads, "ms_per_layer_token": round(best[backend][0] / n, 4),
            "prefill_ms_per_layer_row": round(best[backend][1] / n, 4), "load_s": round(load_s[backend], 2),
        }  # fmt: skip
        for backend in engines
    ]
    base = rows[0]["ms_per_layer_token"]
    for r in rows:
        r["vs_llamacpp"] = round(r["ms_per_layer_token"] / base, 2) if base else None
    return rows


def print_table(rows: list[dict]) -> None:
    cols = ["model", "quant", "layers", "backend", "ms_per_layer_token", "vs_llamacpp", "prefill_ms_per_layer_row", "load_s"]
    widths = [max(len(c), *(len(str(r.get(c))) for r in rows)) for c in cols]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
    for r in rows:
        print("  ".join(str(r.get(c)).ljust(w) for c, w in zip(cols, widths)))


def main() -> None:
    from edge_agent.runtime.synthetic import make_random_gguf

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dir", default=None, help="where to keep the random models (default: a temp dir)")
    ap.add_argument("--layers", type=int, default=10, help="model depth; the timed shard is 1:layers-1")
    ap.add_argument("--small", action="store_true", help="256-dim models instead of the ~0.4B layer shape")
    ap.add_argument("--ftypes", default="q4_0,q8_0,f16")
    args = ap.parse_args()
    shape = dict(n_embd=1024, n_head=16, n_head_kv=4, n_ff=4096, n_vocab=32000)
    if args.small:
        shape = dict(n_embd=256, n_head=4, n_head_kv=2, n_ff=512, n_vocab=1024)
    with tempfile.TemporaryDirectory(prefix="bench-models-") as tmp:
        base = Path(args.dir or tmp)
        rows = []
        for ftype in args.ftypes.split(","):
            tag = "-".join(str(v) for v in shape.values())
            model = make_random_gguf(base / f"rand-{ftype}-{args.layers}x{tag}.gguf", n_layer=args.layers, ftype=ftype, **shape)
            rows += onnx_rows(model, args.threads)
            print_table(rows[-2:])
        print()
        print_table(rows)


if __name__ == "__main__":
    main()
