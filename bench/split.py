"""Split-inference benchmark: llama.cpp alone vs. edge-agent client + 2 peers vs. llama.cpp RPC.

In chain mode the client-to-first-hop link uses the chosen transport; hops forward to
each other over TLS (the direct path).

    .venv/bin/python bench/split.py [--quick] [--tokens N] [--rpc-bin DIR]
    .venv/bin/python bench/split.py --concurrency 1,4,8 [--quick]   # many requests at once
    .venv/bin/python bench/split.py --speculate 8 --netem-ms 0,5,20   # bench/speculate.py

``--concurrency``: client + 2 peers over TLS (star), aggregate decode tokens/s of N
requests at once (different prompts), each checked token for token against the same
request run alone.

All in one run, same random-weight ~0.4B Q4_0 model (1024 dim, 24 layers, GQA 16/4,
ff 4096, vocab 32000), on loopback. Peers are separate OS processes (`edge-agent join`).
llama.cpp's RPC split is the peer baseline when `--rpc-bin` points at a build holding
`ggml-rpc-server` and `llama-bench` (built from the llama.cpp sources vendored in the
llama-cpp-python sdist with -DGGML_RPC=ON; see docs/benchmarks.md for the commands).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

from runtime import CACHE, SHAPE_04B, SHAPE_QUICK, llama_cpp_tok_s  # noqa: E402

from edge_agent.runtime.synthetic import make_random_gguf  # noqa: E402

PROMPT_LONG = [1] + [300 + (i * 13) % 5000 for i in range(255)]


def llama_cpp_ttft_ms(model: Path, threads: int, n_ctx: int) -> float:
    import llama_cpp as lc

    llm = lc.Llama(str(model), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, verbose=False)
    try:
        t0 = time.perf_counter()
        next(iter(llm.generate(PROMPT_LONG, top_k=1, temp=0.0, repeat_penalty=1.0)))
        return (time.perf_counter() - t0) * 1000
    finally:
        llm.close()


async def swarm_numbers(model: Path, peers, transport: str, n_tokens: int, n_ctx: int, mode: str = "star",
                        threads: int = 2) -> dict:
    from edge_agent.node import Agent, AgentConfig, PeerDirectory
    from edge_agent.runtime.engine import EngineOptions
    from edge_agent.runtime.sampling import SamplingParams
    from edge_agent.runtime.shards import inspect_model
    from edge_agent.split.client import ClientConfig, SwarmClient

    info = inspect_model(model)
    with tempfile.TemporaryDirectory() as d:
        cfg = AgentConfig(Path(d), mdns=False, manual_peers=[("127.0.0.1", p.ready["tls_port"]) for p in peers], transport=transport)
        agent = Agent(cfg)
        await agent.start()
        directory = PeerDirectory(agent, info.model_hash)
        ccfg = ClientConfig(target_tbt_ms=10_000, mode=mode)
        await directory.wait_for_coverage(info.n_layer, ccfg.policy, 60)
        client = SwarmClient(model, directory, ccfg, EngineOptions(n_ctx_per_request=n_ctx, max_requests=2, n_threads=threads),
                             CACHE / "shards")
        try:
            await client.generate([1, 2, 3, 4], SamplingParams(max_tokens=4))  # warm-up: connections, page cache
            res = await client.generate([1] + [300 + (i * 7) % 5000 for i in range(31)], SamplingParams(max_tokens=n_tokens + 1))
            ttft = await client.generate(PROMPT_LONG, SamplingParams(max_tokens=1))
            if any(h["peer_id"] == "local" for h in res.stats["hops"]):  # no link: the client ran the layers itself
                return {"tok_s": None, "ttft_256_ms": None, "error": "a hop ran on the client: no link to its peer"}
            return {"tok_s": res.stats["tokens_per_s"], "ttft_256_ms": ttft.stats["ttft_ms"], "hops": res.stats["hops"]}
        finally:
            client.close()
            await directory.close()
            await agent.close()


def batched_ceiling(model: Path, levels: list[int], n_tokens: int, n_ctx: int, threads: int) -> dict:
    """The whole model in one process, N requests decoded in one engine call per step: what
    batching itself gains on this CPU (the engine keeps to its exact-batching row cap)."""
    from edge_agent.runtime.backends import load_engine
    from edge_agent.runtime.engine import EngineOptions, StepInput
    from edge_agent.runtime.shards import inspect_model

    n_layer = inspect_model(model).n_layer
    engine = load_engine("llamacpp", model, 0, n_layer, EngineOptions(n_ctx_per_request=n_ctx, max_requests=max(levels),
                                                                      n_threads=threads), CACHE / "shards")
    try:
        rates = {}
        for n in levels:
            ids = [f"c{n}-{r}" for r in range(n)]
            prompts = [np.array([1] + [300 + (i * 7 + 11 * r) % 5000 for i in range(31)], dtype=np.int32) for r in range(n)]
            last = [int(np.argmax(engine.forward([StepInput(rid, 0, p)])[0].data)) for rid, p in zip(ids, prompts)]
            t0 = time.perf_counter()
            for k in range(n_tokens):
                outs = engine.forward([StepInput(rid, 32 + k, np.array([t], dtype=np.int32)) for rid, t in zip(ids, last)])
                last = [int(np.argmax(o.data)) for o in outs]
            rates[n] = n * n_tokens / (time.perf_counter() - t0)
            for rid in ids:
                engine.end_request(rid)
        return rates
    finally:
        engine.close()


async def concurrency_numbers(model: Path, peers, levels: list[int], n_tokens: int, n_ctx: int, threads: int) -> dict:
    from edge_agent.node import Agent, AgentConfig, PeerDirectory
    from edge_agent.runtime.engine import EngineOptions
    from edge_agent.runtime.sampling import SamplingParams
    from edge_agent.runtime.shards import inspect_model
    from edge_agent.split.client import ClientConfig, SwarmClient

    info = inspect_model(model)
    prompts = [[1] + [300 + (i * 7 + 11 * r) % 5000 for i in range(31)] for r in range(max(levels))]
    with tempfile.TemporaryDirectory() as d:
        agent = Agent(AgentConfig(Path(d), mdns=False, manual_peers=[("127.0.0.1", p.ready["tls_port"]) for p in peers]))
        await agent.start()
        directory = PeerDirectory(agent, info.model_hash)
        ccfg = ClientConfig(target_tbt_ms=10_000)
        await directory.wait_for_coverage(info.n_layer, ccfg.policy, 60)
        client = SwarmClient(model, directory, ccfg, EngineOptions(n_ctx_per_request=n_ctx, max_requests=max(levels),
                                                                   n_threads=threads), CACHE / "shards")
        try:
            params = SamplingParams(max_tokens=n_tokens)
            alone = [(await client.generate(p, params)).token_ids for p in prompts]  # also the warm-up
            rows = {}
            for n in levels:
                calls0, steps0 = client._head_steps.calls, client._head_steps.steps
                t0 = time.perf_counter()
                results = await asyncio.gather(*(client.generate(p, params) for p in prompts[:n]))
                wall = time.perf_counter() - t0
                rows[n] = {"aggregate_tok_s": round(sum(len(r.token_ids) for r in results) / wall, 2),
                           "exact": all(r.token_ids == alone[i] for i, r in enumerate(results)),
                           "mean_head_batch": round((client._head_steps.steps - steps0) / max(1, client._head_steps.calls - calls0), 2)}
            return rows
        finally:
            client.close()
            await directory.close()
            await agent.close()


def rpc_numbers(rpc_bin: Path, model: Path, n_layer: int, threads: int, n_tokens: int) -> dict | None:
    server_bin, bench_bin = rpc_bin / "ggml-rpc-server", rpc_bin / "llama-bench"
    if not (server_bin.exists() and bench_bin.exists()):
        return None
    servers = [subprocess.Popen([str(server_bin), "-H", "127.0.0.1", "-p", str(port), "-t", "1"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for port in (50152, 50153)]
    try:
        time.sleep(2)
        out = subprocess.run([str(bench_bin), "-m", str(model), "--rpc", "127.0.0.1:50152,127.0.0.1:50153",
                              "-ngl", str(n_layer - 2), "-t", str(threads), "-p", "256", "-n", str(n_tokens), "-o", "json"],
                             capture_output=True, text=True, timeout=900)
        rows = json.loads(out.stdout[out.stdout.index("["):]) if "[" in out.stdout else []
        tg = next((r["avg_ts"] for r in rows if r.get("n_gen")), None)
        pp = next((r["avg_ts"] for r in rows if r.get("n_prompt")), None)
        return {"tok_s": tg, "ttft_256_ms": 256 / pp * 1000 if pp else None, "stderr": re.sub(r"\s+", " ", out.stderr[-300:])}
    finally:
        for s in servers:
            s.kill()


def main() -> None:
    from swarm_util import start_peer

    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--ftype", default="q4_0", choices=("q4_0", "q4_k_m", "q8_0"), help="quantization of the random model")
    ap.add_argument("--rpc-bin", type=Path, default=None, help="folder with ggml-rpc-server and llama-bench")
    ap.add_argument("--concurrency", type=lambda v: [int(x) for x in v.split(",")], default=None,
                    help="e.g. 1,4,8: aggregate tok/s of that many requests at once (client + 2 peers, TLS)")
    ap.add_argument("--speculate", type=int, default=0, help="N: speculative decoding over delayed links (bench/speculate.py)")
    ap.add_argument("--netem-ms", default="0,5,20", help="with --speculate: round trips per hop to emulate, ms")
    args = ap.parse_args()
    if args.speculate:
        import speculate

        sys.argv = [sys.argv[0], "--speculate", str(args.speculate), "--rtt-ms", args.netem_ms, "--threads", str(args.threads)]
        return speculate.main()
    shape = SHAPE_QUICK if args.quick else SHAPE_04B
    model = make_random_gguf(CACHE / f"random-{'quick' if args.quick else '04b'}-{args.ftype}.gguf", ftype=args.ftype, **shape)
    quant = args.ftype.upper()
    L = shape["n_layer"]
    if args.concurrency:
        with tempfile.TemporaryDirectory() as d:
            peers = [start_peer(model, r, Path(d) / f"p{i}", "--threads", str(args.threads), "--max-requests",
                                str(max(args.concurrency))) for i, r in enumerate((f"1:{L // 2}", f"{L // 2}:{L - 1}"))]
            try:
                rows = asyncio.run(concurrency_numbers(model, peers, args.concurrency, args.tokens, args.ctx, args.threads))
            finally:
                for p in peers:
                    p.stop()
        ceiling = batched_ceiling(model, args.concurrency, args.tokens, args.ctx, args.threads)
        one, one_alone = rows[min(rows)]["aggregate_tok_s"], ceiling[min(ceiling)]
        print(f"model {shape} {quant}, {args.threads} threads per process, {args.tokens} decode tokens per request, loopback TLS")
        for n, r in rows.items():
            r["whole_model_batched_tok_s"] = round(ceiling[n], 2)
            print(f"{n:3} requests: {r['aggregate_tok_s']:8.2f} tok/s aggregate ({r['aggregate_tok_s'] / one:5.2f}x one), "
                  f"outputs exact: {r['exact']}, mean head batch {r['mean_head_batch']}; whole model in one process, "
                  f"batched: {ceiling[n]:8.2f} tok/s ({ceiling[n] / one_alone:5.2f}x one)")
        print(json.dumps(rows))
        return
    ref = llama_cpp_tok_s(model, args.tokens, args.threads, args.ctx)
    ref_ttft = llama_cpp_ttft_ms(model, args.threads, args.ctx)
    rows = {"llama.cpp alone": {"tok_s": ref, "ttft_256_ms": ref_ttft}}
    with tempfile.TemporaryDirectory() as d:
        half = L // 2
        peers = [start_peer(model, r, Path(d) / f"p{i}", "--threads", str(args.threads))
                 for i, r in enumerate((f"1:{half}", f"{half}:{L - 1}"))]
        try:
            for mode, transport in (("star", "tls"), ("chain", "tls"), ("star", "webrtc"), ("chain", "webrtc")):
                rows[f"edge-agent {mode}, 2 peers, {transport}"] = asyncio.run(
                    swarm_numbers(model, peers, transport, args.tokens, args.ctx, mode, args.threads))
        finally:
            for p in peers:
                p.stop()
    if args.rpc_bin:
        rpc = rpc_numbers(args.rpc_bin, model, L, args.threads, args.tokens)
        if rpc:
            rows["llama.cpp RPC, 2 rpc-servers"] = rpc
    ref2 = llama_cpp_tok_s(model, args.tokens, args.threads, args.ctx)
    rows["llama.cpp alone"]["tok_s"] = (ref + ref2) / 2
    base = rows["llama.cpp alone"]
    rpc_tok = rows.get("llama.cpp RPC, 2 rpc-servers", {}).get("tok_s")
    print(f"model {shape} {quant}, {args.threads} threads per process, {args.tokens} decode tokens, loopback")
    print(f"{'setup':36} {'tok/s':>8} {'vs alone':>9} {'vs RPC':>7} {'TTFT 256':>10} {'vs alone':>9}")
    for name, r in rows.items():
        tok, ttft = r.get("tok_s"), r.get("ttft_256_ms")
        vs_rpc = f"{tok / rpc_tok:7.2f}" if (tok and rpc_tok) else "      -"
        print(f"{name:36} {tok or 0:8.2f} {tok / base['tok_s'] if tok else 0:9.3f} {vs_rpc} "
              f"{ttft or 0:8.1f}ms {ttft / base['ttft_256_ms'] if ttft else 0:9.3f}")
    print(json.dumps(rows, default=str))


if __name__ == "__main__":
    main()
