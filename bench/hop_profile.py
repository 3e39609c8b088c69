"""Where a middle shard's step time goes: the graph-eval capture, the GIL, and one hop.

    .venv/bin/python bench/hop_profile.py [--quick] [--rounds R] [--steps N] [--tokens T] [--skip-peer]

1. Callback census: graph-eval callback calls per decode step, and the time spent inside
   the Python callback (a timing wrapper; the C callback's own time is not measurable
   from Python and is a strcmp per node).
2. In-process step time of the middle shard (layers 1:L-1, 1 thread), C capture vs
   Python capture, each alone / next to a busy pure-Python thread (holds the GIL) /
   next to a busy thread of equal CPU that releases the GIL (sha256 of 8 MiB buffers).
   Interleaved, R rounds, medians: the GIL's share is (GIL-holding - GIL-releasing).
3. The same shard in an `edge-agent join` peer process (its own event loop running
   alongside: heartbeats, frame parsing), driven by a client over loopback TLS holding
   the head (0:1) and tail (L-1:L); per decode token: the peer's reported compute_us,
   and the hop's overhead = client wall time of the hop - that compute (p50, p99).
   Peers with the C and the Python capture alternate, R rounds.

The model is bench/runtime.py's random-weight 0.4B-shape Q4_0 (``--quick``: small shape).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

import numpy as np  # noqa: E402
from runtime import CACHE, SHAPE_04B, SHAPE_QUICK  # noqa: E402

from edge_agent.runtime import capture  # noqa: E402
from edge_agent.runtime.backends import load_engine  # noqa: E402
from edge_agent.runtime.engine import EngineOptions, StepInput  # noqa: E402
from edge_agent.runtime.synthetic import make_random_gguf  # noqa: E402

OPTS = EngineOptions(n_ctx_per_request=512, max_requests=2, n_threads=1)
KINDS = ("c", "python")


def load_middle(model: Path, n_layer: int, kind: str):
    os.environ[capture.CAPTURE_ENV] = kind
    try:
        eng = load_engine("llamacpp", model, 1, n_layer - 1, OPTS, CACHE / "shards")
    finally:
        os.environ.pop(capture.CAPTURE_ENV, None)
    if eng.capture.kind != kind:
        raise SystemExit(f"asked for the {kind} capture, got {eng.capture.kind} (no C compiler?)")
    return eng


def census(model: Path, n_layer: int, x: np.ndarray, steps: int) -> dict:
    """Calls per decode step for both callbacks; time inside the Python one (wrapped)."""
    inside = [0.0]
    plain = capture.PythonCapture._on_graph_node

    def timed(self, tensor, ask, user_data):
        t0 = time.perf_counter()
        try:
            return plain(self, tensor, ask, user_data)
        finally:
            inside[0] += time.perf_counter() - t0

    out = {}
    for kind in KINDS:
        capture.PythonCapture._on_graph_node = timed  # bound when the engine builds its capture
        try:
            eng = load_middle(model, n_layer, kind)
        finally:
            capture.PythonCapture._on_graph_node = plain
        eng.forward([StepInput("w", 0, x[:16])])  # prefill, then decode steps only
        calls0, inside[0] = eng.capture.calls, 0.0
        for p in range(steps):
            eng.forward([StepInput("w", 16 + p, x[16 + p : 17 + p])])
        out[kind] = {"calls_per_step": (eng.capture.calls - calls0) / steps,
                     "ms_inside_python_callback_per_step": round(inside[0] / steps * 1000, 3) if kind == "python" else None}
        eng.close()
    return out


class BusyThread:
    """One core's worth of CPU in this process: either holding the GIL or releasing it."""

    def __init__(self, holds_gil: bool):
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._spin if holds_gil else self._hash, daemon=True)

    def _spin(self) -> None:
        n = 0
        while not self._stop.is_set():
            n += 1  # pure bytecode: wants the GIL all the time, like a busy event loop

    def _hash(self) -> None:
        blob = b"x" * (8 << 20)
        while not self._stop.is_set():
            hashlib.sha256(blob).digest()  # hashlib releases the GIL for large buffers

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def step_ms(eng, x: np.ndarray, steps: int, rid: str) -> float:
    times = []
    for p in range(steps):
        t0 = time.perf_counter()
        eng.forward([StepInput(rid, p, x[p : p + 1])])
        times.append((time.perf_counter() - t0) * 1000)
    eng.end_request(rid)
    return statistics.median(times)


def in_process(model: Path, n_layer: int, x: np.ndarray, rounds: int, steps: int) -> dict:
    engines = {kind: load_middle(model, n_layer, kind) for kind in KINDS}
    loads = {"alone": None, "gil-holding thread": True, "gil-releasing thread": False}
    cells = [(k, load) for k in KINDS for load in loads]
    samples: dict[tuple[str, str], list[float]] = {c: [] for c in cells}
    try:
        for r in range(rounds):
            for kind, load in cells[r % len(cells):] + cells[: r % len(cells)]:  # rotate the order per round
                holds = loads[load]
                if holds is None:
                    samples[(kind, load)].append(step_ms(engines[kind], x, steps, f"r{r}"))
                else:
                    with BusyThread(holds):
                        samples[(kind, load)].append(step_ms(engines[kind], x, steps, f"r{r}"))
    finally:
        for eng in engines.values():
            eng.close()
    return {f"{kind} capture, {load}": {"median": round(statistics.median(v), 2), "min": round(min(v), 2),
                                        "max": round(max(v), 2)} for (kind, load), v in samples.items()}


async def drive_peer(model: Path, peer, n_tokens: int) -> dict:
    from edge_agent.node import Agent, AgentConfig, PeerDirectory
    from edge_agent.runtime.sampling import SamplingParams
    from edge_agent.runtime.shards import inspect_model
    from edge_agent.split.client import ClientConfig, SwarmClient

    info = inspect_model(model)
    records = []
    with tempfile.TemporaryDirectory() as d:
        agent = Agent(AgentConfig(Path(d), mdns=False, manual_peers=[("127.0.0.1", peer.ready["tls_port"])]))
        await agent.start()
        directory = PeerDirectory(agent, info.model_hash)
        ccfg = ClientConfig(target_tbt_ms=10_000)
        await directory.wait_for_coverage(info.n_layer, ccfg.policy, 60)
        client = SwarmClient(model, directory, ccfg, OPTS, CACHE / "shards")
        try:
            await client.generate([1, 2, 3, 4], SamplingParams(max_tokens=4))  # warm-up: connection, page cache
            client.observers.add(lambda rec: records.append(rec) if rec.n_positions == 1 and not rec.replay else None)
            res = await client.generate([1] + [300 + (i * 7) % 5000 for i in range(31)], SamplingParams(max_tokens=n_tokens + 1))
        finally:
            client.close()
            await directory.close()
            await agent.close()
    compute = [r.compute_ms for r in records]
    overhead = [r.wall_ms - r.compute_ms for r in records]
    return {"tok_s": res.stats["tokens_per_s"], "peer_compute_ms": statistics.median(compute),
            "overhead_p50_ms": float(np.percentile(overhead, 50)), "overhead_p99_ms": float(np.percentile(overhead, 99)),
            "wall_p50_ms": statistics.median(r.wall_ms for r in records), "n": len(records)}


def peer_process(model: Path, n_layer: int, rounds: int, n_tokens: int) -> dict:
    from swarm_util import start_peer

    samples: dict[str, list[dict]] = {k: [] for k in KINDS}
    for r in range(rounds):
        for kind in KINDS if r % 2 == 0 else KINDS[::-1]:
            os.environ[capture.CAPTURE_ENV] = kind  # the peer process inherits it
            try:
                with tempfile.TemporaryDirectory() as d:
                    peer = start_peer(model, f"1:{n_layer - 1}", Path(d) / "peer")
                    try:
                        samples[kind].append(asyncio.run(drive_peer(model, peer, n_tokens)))
                    finally:
                        peer.stop()
            finally:
                os.environ.pop(capture.CAPTURE_ENV, None)
            print(f"  peer round {r} {kind}: {json.dumps({k: round(v, 3) for k, v in samples[kind][-1].items()})}", flush=True)
    return {kind: {key: round(statistics.median(s[key] for s in runs), 3) for key in runs[0]} for kind, runs in samples.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=30, help="decode steps per in-process sample")
    ap.add_argument("--tokens", type=int, default=48, help="decode tokens per peer run")
    ap.add_argument("--skip-peer", action="store_true")
    args = ap.parse_args()
    shape = SHAPE_QUICK if args.quick else SHAPE_04B
    model = make_random_gguf(CACHE / f"random-{'quick' if args.quick else '04b'}-q4_0.gguf", ftype="q4_0", **shape)
    n_layer = shape["n_layer"]
    x = np.random.default_rng(0).standard_normal((16 + max(args.steps, 20), shape["n_embd"])).astype(np.float32)
    print(f"model {shape} Q4_0, middle shard 1:{n_layer - 1}, 1 thread; load avg {os.getloadavg()[0]:.2f} at start")
    print("callback census:", json.dumps(census(model, n_layer, x, 20)), flush=True)
    print(f"in-process ms per decode step (median over {args.rounds} rounds of each round's median of {args.steps} steps):")
    for cell, v in in_process(model, n_layer, x, args.rounds, args.steps).items():
        print(f"  {cell:40} {v['median']:7.2f}   (rounds {v['min']:.2f}-{v['max']:.2f})", flush=True)
    if not args.skip_peer:
        rounds = max(2, args.rounds // 2)
        print(f"join peer over loopback TLS, {args.tokens} decode tokens per run, medians over {rounds} runs:")
        for kind, v in peer_process(model, n_layer, rounds, args.tokens).items():
            print(f"  peer with {kind} capture: {json.dumps(v)}")
    print(f"load avg {os.getloadavg()[0]:.2f} at end")


if __name__ == "__main__":
    main()
