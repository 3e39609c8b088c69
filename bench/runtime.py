"""Runtime benchmark: llama.cpp alone vs. the one-process shard pipeline, same model, same run.

    .venv/bin/python bench/runtime.py [--quick] [--tokens N] [--threads T]

Prints, per quant type: llama.cpp full-model decode tok/s, pipeline tok/s (head -> middle
shard(s) -> tail), their ratio, and a middle shard's RSS against its file size + KV cache.
The model is a random-weight ~0.4B llama shape (1024 dim, 24 layers, GQA 16/4, ff 4096,
vocab 32000): timing does not depend on the weights. ``--quick`` uses a small shape.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from edge_agent.runtime.engine import EngineOptions  # noqa: E402
from edge_agent.runtime.pipeline import LocalPipeline  # noqa: E402
from edge_agent.runtime.sampling import SamplingParams  # noqa: E402
from edge_agent.runtime.synthetic import make_random_gguf  # noqa: E402

CACHE = Path.home() / ".cache" / "edge-agent-bench"
SHAPE_04B = dict(n_layer=24, n_embd=1024, n_head=16, n_head_kv=4, n_ff=4096, n_vocab=32000)
SHAPE_QUICK = dict(n_layer=8, n_embd=512, n_head=8, n_head_kv=2, n_ff=1536, n_vocab=8000)
PROMPT = [1] + [300 + (i * 7) % 5000 for i in range(31)]


def llama_cpp_tok_s(model: Path, n_tokens: int, threads: int, n_ctx: int) -> float:
    import llama_cpp as lc

    llm = lc.Llama(str(model), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, verbose=False)
    try:
        llm.eval(PROMPT)
        t0 = time.perf_counter()
        n = 0
        for tok in llm.generate(PROMPT, top_k=1, temp=0.0, repeat_penalty=1.0, reset=False):
            n += 1
            if n == 1:
                t0 = time.perf_counter()  # decode rate: from the first generated token on
            if n > n_tokens:
                break
        return n_tokens / (time.perf_counter() - t0)
    finally:
        llm.close()


def pipeline_tok_s(model: Path, n_tokens: int, threads: int, n_ctx: int, shards=None) -> tuple[float, dict]:
    opts = EngineOptions(n_ctx_per_request=n_ctx, max_requests=1, n_threads=threads)
    pipe = LocalPipeline(model, (1, 1), shards, opts, cache_dir=CACHE / "shards")
    try:
        res = pipe.stream(PROMPT, SamplingParams(max_tokens=n_tokens + 1))
        return res.stats["tokens_per_s"], res.stats
    finally:
        pipe.close()


RSS_CHILD = r"""
import json, sys, numpy as np, psutil
from edge_agent.runtime.engine import EngineOptions, StepInput
from edge_agent.runtime.llamacpp import LlamaCppEngine
model, start, end, n_ctx, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
base = psutil.Process().memory_info().rss
eng = LlamaCppEngine.from_model(model, start, end, EngineOptions(n_ctx_per_request=n_ctx, max_requests=1, n_threads=threads), cache_dir=sys.argv[6])
x = np.random.default_rng(0).standard_normal((32, eng.info.n_embd)).astype(np.float32)
eng.forward([StepInput("r", 0, x)])
for p in range(32, 48):
    eng.forward([StepInput("r", p, x[:1])])
print(json.dumps({"rss": psutil.Process().memory_info().rss - base, "path": str(eng.path)}))
"""


def shard_rss(model: Path, start: int, end: int, n_ctx: int, threads: int, n_kv_bytes_per_pos: int) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", RSS_CHILD, str(model), str(start), str(end), str(n_ctx), str(threads), str(CACHE / "shards")],
        capture_output=True, text=True, check=True, cwd=ROOT,
    )
    d = json.loads(out.stdout.strip().splitlines()[-1])
    file_size = Path(d["path"]).stat().st_size
    kv = n_kv_bytes_per_pos * (end - start) * n_ctx
    budget = 1.2 * (file_size + kv) + 100e6
    return {"rss_mb": d["rss"] / 1e6, "file_mb": file_size / 1e6, "kv_mb": kv / 1e6, "budget_mb": budget / 1e6, "ok": d["rss"] <= budget}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="small model shape (fast smoke run)")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--quants", default="q4_0,q4_k_m")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--onnx", action="store_true", help="add ONNX Runtime rows (bench/runtime_onnx.py)")
    args = ap.parse_args()
    shape = SHAPE_QUICK if args.quick else SHAPE_04B
    tag = "quick" if args.quick else "04b"
    head_dim = shape["n_embd"] // shape["n_head"]
    kv_per_pos_layer = 2 * shape["n_head_kv"] * head_dim * 2  # K and V, f16
    L = shape["n_layer"]
    rows = []
    for q in args.quants.split(","):
        model = make_random_gguf(CACHE / f"random-{tag}-{q}.gguf", ftype=q, **shape)
        third = L // 3
        refs, ones, threes = [], [], []
        for _ in range(args.rounds):  # interleaved rounds, medians: this VM's speed drifts
            refs.append(llama_cpp_tok_s(model, args.tokens, args.threads, args.ctx))
            ones.append(pipeline_tok_s(model, args.tokens, args.threads, args.ctx)[0])
            threes.append(pipeline_tok_s(model, args.tokens, args.threads, args.ctx,
                                         [(1, third), (third, 2 * third), (2 * third, L - 1)])[0])
        ref_avg, one, three = statistics.median(refs), statistics.median(ones), statistics.median(threes)
        rss = shard_rss(model, 1, L - 1, args.ctx, args.threads, kv_per_pos_layer)
        rows.append({"quant": q, "llama_cpp_tok_s": ref_avg, "pipeline_1mid_tok_s": one, "pipeline_3mid_tok_s": three,
                     "ratio_1mid": one / ref_avg, "ratio_3mid": three / ref_avg, **rss})
    print(f"model shape {shape}, {args.threads} threads, {args.tokens} decode tokens, ctx {args.ctx}, median of {args.rounds} rounds")
    print(f"{'quant':8} {'llama.cpp':>10} {'pipe 1 mid':>11} {'ratio':>6} {'pipe 3 mid':>11} {'ratio':>6} | {'shard RSS':>10} {'file':>8} {'KV':>7} {'budget':>8}")
    for r in rows:
        print(f"{r['quant']:8} {r['llama_cpp_tok_s']:10.2f} {r['pipeline_1mid_tok_s']:11.2f} {r['ratio_1mid']:6.3f} "
              f"{r['pipeline_3mid_tok_s']:11.2f} {r['ratio_3mid']:6.3f} | {r['rss_mb']:8.1f}MB {r['file_mb']:6.1f}MB "
              f"{r['kv_mb']:5.1f}MB {r['budget_mb']:6.1f}MB {'ok' if r['ok'] else 'OVER'}")
    if args.onnx:  # ms/layer/token of the same middle shard on llama.cpp and ONNX Runtime
        sys.path.insert(0, str(ROOT / "bench"))
        from runtime_onnx import onnx_rows  # noqa: E402

        for q in args.quants.split(","):
            for r in onnx_rows(CACHE / f"random-{tag}-{q}.gguf", args.threads):
                print(q, r)
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
