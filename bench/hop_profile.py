"""Where a middle shard's step time goes: the graph-eval capture, the GIL, and one hop.

    .venv/bin/python bench/hop_profile.py [--quick] [--rounds R] [--steps N] [--tokens T] [--skip-peer]
    .venv/bin/python bench/hop_profile.py --breakdown [--quick] [--split 2] [--rounds R] [--tokens T] [--pin]

1. Callback census: graph-eval callback calls per decode step, and the time spent inside
   the Python callback (a timing wrapper; the C callback's own time is not measurable
   from Python and is a strcmp per node). Then the step time difference Python - C with
   nothing else running: paired, alternating, in both engine load orders.
2. In-process step time of the middle shard (layers 1:L-1, 1 thread), C capture vs
   Python capture, each alone / next to a thread that holds the GIL (bytecode) / next
   to a thread of equal CPU that releases it (sha256), busy all the time or 25% of it
   (event-loop-like bursts). Interleaved, R rounds, medians: the GIL's share is
   (GIL-holding - GIL-releasing) at the same duty.
3. The same shard in `edge-agent join` peer processes (their own event loops running
   alongside: heartbeats, frame parsing), one with each capture, each driven by its own
   client over loopback TLS holding the head (0:1) and tail (L-1:L); the two alternate,
   R runs each. Per decode token: the peer's reported compute_us, and the hop's
   overhead = client wall time of the hop - that compute (p50, p99).

``--breakdown`` (only this): where one hop of one decode token goes, stage by stage, on a
client + ``--split`` `join` peers star path over loopback TLS. Every process stamps the
hop's stages (edge_agent/transport/hoptrace.py, on through EDGE_AGENT_HOP_TRACE; the peers
write their stamps when they exit); CLOCK_MONOTONIC is one clock for all processes, so
the client's and the peers' stamps of a hop line up. p50/p99 per stage over every decode
hop, and the overhead (client wall time of the hop - the peer's compute_us). ``--pin``: the
client on the first CPU, the peers on the others (``taskset``), as on separate devices
where no process wakes on a core another one just ran on.

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


def load_middle(model: Path, span: tuple[int, int], kind: str):
    os.environ[capture.CAPTURE_ENV] = kind
    try:
        eng = load_engine("llamacpp", model, *span, OPTS, CACHE / "shards")
    finally:
        os.environ.pop(capture.CAPTURE_ENV, None)
    if eng.capture.kind != kind:
        raise SystemExit(f"asked for the {kind} capture, got {eng.capture.kind} (no C compiler?)")
    return eng


def census(model: Path, span: tuple[int, int], x: np.ndarray, steps: int) -> dict:
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
            eng = load_middle(model, span, kind)
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


def alone_ab(model: Path, span: tuple[int, int], x: np.ndarray, rounds: int) -> dict:
    """Paired C-vs-Python step time with nothing else running, in both load orders.

    The engine loaded first in a process ran ~1 ms/step slower or faster here whatever its
    capture (memory placement), so each order gives (Python - C) +- that bias and their
    mean cancels it.
    """
    out = {}
    for order in (KINDS, KINDS[::-1]):
        engines = {kind: [load_middle(model, span, kind)] for kind in order}
        diffs = []
        try:
            for r in range(rounds):
                ms = {kind: step_ms(engines[kind], x, 10, f"ab{r}") for kind in (order if r % 2 == 0 else order[::-1])}
                diffs.append(ms["python"] - ms["c"])
        finally:
            for (eng,) in engines.values():
                eng.close()
        out[f"python - c, {order[0]} loaded first"] = round(statistics.median(diffs), 3)
    out["python - c, order bias cancelled"] = round(sum(out.values()) / 2, 3)
    return out


class BusyThread:
    """CPU in this process, either holding the GIL (bytecode) or releasing it (sha256 of
    64 KiB chunks), for ``duty`` of the time: 1.0 spins; less works in 0.5 ms bursts with
    sleeps between, like an event loop handling frames and heartbeats."""

    BURST_S = 0.0005

    def __init__(self, holds_gil: bool, duty: float):
        self._stop = threading.Event()
        self._holds_gil, self._duty = holds_gil, duty
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        chunk = b"x" * (64 << 10)
        pause = self.BURST_S * (1 - self._duty) / self._duty
        while not self._stop.is_set():
            end = time.perf_counter() + self.BURST_S
            if self._holds_gil:
                while time.perf_counter() < end:
                    pass  # pure bytecode: wants the GIL all the time
            else:
                while time.perf_counter() < end:
                    hashlib.sha256(chunk).digest()  # hashlib releases the GIL for buffers over 2 KiB
            if pause:
                time.sleep(pause)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def step_ms(engines: list, x: np.ndarray, steps: int, rid: str) -> float:
    """Median time of one decode step through ``engines`` in turn (the spans of one token)."""
    times = []
    for p in range(steps):
        t0 = time.perf_counter()
        for eng in engines:
            eng.forward([StepInput(rid, p, x[p : p + 1])])
        times.append((time.perf_counter() - t0) * 1000)
    for eng in engines:
        eng.end_request(rid)
    return statistics.median(times)


def in_process(model: Path, spans: list[tuple[int, int]], x: np.ndarray, rounds: int, steps: int) -> dict:
    engines = {kind: [load_middle(model, span, kind) for span in spans] for kind in KINDS}
    loads = {"alone": None} | {f"gil-{'holding' if holds else 'releasing'} thread {duty:.0%} busy": (holds, duty)
                               for duty in (1.0, 0.25) for holds in (True, False)}
    cells = [(k, load) for k in KINDS for load in loads]
    samples: dict[tuple[str, str], list[float]] = {c: [] for c in cells}
    try:
        for r in range(rounds):
            for kind, load in cells[r % len(cells):] + cells[: r % len(cells)]:  # rotate the order per round
                if loads[load] is None:
                    samples[(kind, load)].append(step_ms(engines[kind], x, steps, f"r{r}"))
                else:
                    with BusyThread(*loads[load]):
                        samples[(kind, load)].append(step_ms(engines[kind], x, steps, f"r{r}"))
    finally:
        for engs in engines.values():
            for eng in engs:
                eng.close()
    return {f"{kind} capture, {load}": {"median": round(statistics.median(v), 2), "min": round(min(v), 2),
                                        "max": round(max(v), 2)} for (kind, load), v in samples.items()}


async def open_client(stack, model: Path, peers: list):
    """A SwarmClient that knows only ``peers`` (closed with ``stack``), warmed up: connections, page cache."""
    from edge_agent.node import Agent, AgentConfig, PeerDirectory
    from edge_agent.runtime.sampling import SamplingParams
    from edge_agent.runtime.shards import inspect_model
    from edge_agent.split.client import ClientConfig, SwarmClient

    d = stack.enter_context(tempfile.TemporaryDirectory())
    agent = Agent(AgentConfig(Path(d), mdns=False, manual_peers=[("127.0.0.1", p.ready["tls_port"]) for p in peers]))
    await agent.start()
    stack.push_async_callback(agent.close)
    directory = PeerDirectory(agent, inspect_model(model).model_hash)
    stack.push_async_callback(directory.close)
    ccfg = ClientConfig(target_tbt_ms=10_000)
    await directory.wait_for_coverage(inspect_model(model).n_layer, ccfg.policy, 60)
    client = SwarmClient(model, directory, ccfg, OPTS, CACHE / "shards")
    stack.callback(client.close)
    await client.generate([1, 2, 3, 4], SamplingParams(max_tokens=8))
    return client


async def drive_peers(model: Path, peers: dict, rounds: int, n_tokens: int) -> dict:
    """One client per capture kind, knowing only that kind's peers; the two alternate, ``rounds`` times."""
    from contextlib import AsyncExitStack

    from edge_agent.runtime.sampling import SamplingParams

    records: dict[str, list] = {kind: [] for kind in peers}
    per_round: dict[str, list[dict]] = {kind: [] for kind in peers}
    async with AsyncExitStack() as stack:
        clients = {}
        for kind, kind_peers in peers.items():
            clients[kind] = client = await open_client(stack, model, kind_peers)
            client.observers.add(lambda rec, k=kind: records[k].append(rec) if rec.n_positions == 1 and not rec.replay else None)
        prompt = [1] + [300 + (i * 7) % 5000 for i in range(31)]
        for r in range(rounds):
            for kind in list(peers) if r % 2 == 0 else list(peers)[::-1]:
                n0 = len(records[kind])
                res = await clients[kind].generate(prompt, SamplingParams(max_tokens=n_tokens + 1))
                per_token: dict[tuple, float] = {}  # every hop's compute of one token, summed
                for x in records[kind][n0:]:
                    per_token[(x.request_id, x.step)] = per_token.get((x.request_id, x.step), 0.0) + x.compute_ms
                per_round[kind].append({"tok_s": res.stats["tokens_per_s"], "peer_compute_ms": statistics.median(per_token.values())})
    out = {}
    for kind, recs in records.items():
        if not {x.peer_id for x in recs} <= {p.agent_id for p in peers[kind]}:
            raise SystemExit(f"the {kind} client routed through another kind's peer: the comparison is void")
        overhead = [x.wall_ms - x.compute_ms for x in recs]
        rows = per_round[kind]
        out[kind] = {"tok_s": round(statistics.median(x["tok_s"] for x in rows), 2),
                     "peer_compute_ms": round(statistics.median(x["peer_compute_ms"] for x in rows), 2),
                     "peer_compute_ms_rounds": [round(x["peer_compute_ms"], 1) for x in rows],
                     "hop_wall_p50_ms": round(float(np.percentile([x.wall_ms for x in recs], 50)), 2),
                     "overhead_p50_ms": round(float(np.percentile(overhead, 50)), 3),
                     "overhead_p99_ms": round(float(np.percentile(overhead, 99)), 3), "hops": len(recs)}
    return out


def peer_process(model: Path, spans: list[tuple[int, int]], rounds: int, n_tokens: int) -> dict:
    """One `join` peer per span and capture kind (the capture is chosen at load time)."""
    from swarm_util import start_peer

    peers: dict[str, list] = {kind: [] for kind in KINDS}
    with tempfile.TemporaryDirectory() as d:
        try:
            for kind in KINDS:
                os.environ[capture.CAPTURE_ENV] = kind  # the peer process inherits it
                for a, b in spans:
                    peers[kind].append(start_peer(model, f"{a}:{b}", Path(d) / f"{kind}-{a}"))
            os.environ.pop(capture.CAPTURE_ENV, None)
            return asyncio.run(drive_peers(model, peers, rounds, n_tokens))
        finally:
            os.environ.pop(capture.CAPTURE_ENV, None)
            for peer in (p for ps in peers.values() for p in ps):
                peer.stop()


# (stage, process that stamps its end, the stamp that ends it); a stage starts where the previous ends
STAGES = [("client: Router.call -> channel.send (encode frame, link)", "c", "send"),
          ("client: header + TLS write, wire, peer wakes, decrypts", "p", "rx"),
          ("peer: parse frame", "p", "deliver"),
          ("peer: step taken (receive callback; was: read loop wakes)", "p", "recv"),
          ("peer: checks, queue put", "p", "queued"),
          ("peer: shard worker wakes", "p", "worker"),
          ("peer: hand-off to the engine thread", "p", "thread"),
          ("peer: engine.forward (compute_us inside)", "p", "computed"),
          ("peer: hand-off back to the loop", "p", "back"),
          ("peer: reply built (Frame.from_array)", "p", "send"),
          ("peer: header + TLS write, wire, client wakes, decrypts", "c", "rx"),
          ("client: parse frame", "c", "deliver"),
          ("client: link gets it (receive callback; was: reader task)", "c", "read"),
          ("client: request's future wakes", "c", "woken"),
          ("client: check_reply, observers", "c", "done")]
# the sender's write call alone (send -> sent): the receiver often has the bytes before it returns
WRITES = [("  (client's write call)", "c"), ("  (peer's write call)", "p")]


def stamps_of(rows) -> dict:
    out: dict[tuple, dict[str, int]] = {}
    for stage, rid, seq, start, ns in rows:
        out.setdefault((rid, seq, start), {}).setdefault(stage, ns)  # first stamp of a stage wins
    return out


async def drive_traced(model: Path, peers: list, rounds: int, n_tokens: int) -> tuple[list, list]:
    """A client over ``peers`` with its own stamps on; (client stamp rows, client HopRecords)."""
    from contextlib import AsyncExitStack

    from edge_agent import eventloop
    from edge_agent.runtime.sampling import SamplingParams
    from edge_agent.split import strategy
    from edge_agent.transport import hoptrace

    print(f"client loop: {eventloop.kind()}")
    hoptrace.ON = True
    plain_activation, plain_call = strategy.activation, strategy.Router.call
    current: list = [None]

    def activation(rid, pos, x, *a, **kw):  # the client's first stamp: before its frame is built
        t0 = hoptrace.now()
        frame = plain_activation(rid, pos, x, *a, **kw)
        current[0] = frame if x.shape[0] == 1 and not kw.get("flags", a[4] if len(a) > 4 else 0) else None
        if current[0] is not None:
            hoptrace.mark("call", frame, t0)
        return frame

    async def call(self, *a, **kw):
        out = await plain_call(self, *a, **kw)
        if current[0] is not None:
            hoptrace.mark("done", current[0])
        return out

    strategy.activation, strategy.Router.call = activation, call
    records: list = []
    try:
        async with AsyncExitStack() as stack:
            client = await open_client(stack, model, peers)
            hoptrace._rows.clear()
            client.observers.add(lambda rec: records.append(rec) if rec.n_positions == 1 and not rec.replay else None)
            prompt = [1] + [300 + (i * 7) % 5000 for i in range(31)]
            for _ in range(rounds):
                await client.generate(prompt, SamplingParams(max_tokens=n_tokens + 1))
    finally:
        strategy.activation, strategy.Router.call = plain_activation, plain_call
        hoptrace.ON = False
    return list(hoptrace._rows), records


def breakdown(model: Path, spans: list[tuple[int, int]], rounds: int, n_tokens: int, pin: bool) -> None:
    from swarm_util import start_peer

    cpus = sorted(os.sched_getaffinity(0))
    if pin and len(cpus) < 2:
        raise SystemExit("--pin needs at least 2 CPUs")

    with tempfile.TemporaryDirectory() as d:
        os.environ["EDGE_AGENT_HOP_TRACE"] = f"{d}/trace"  # the peer processes inherit it
        peers = []
        try:
            for i, (a, b) in enumerate(spans):
                prefix = ("taskset", "-c", str(cpus[1 + i % (len(cpus) - 1)])) if pin else ()
                peers.append(start_peer(model, f"{a}:{b}", Path(d) / f"peer-{a}", prefix=prefix))
            os.environ.pop("EDGE_AGENT_HOP_TRACE")
            if pin:
                os.sched_setaffinity(0, {cpus[0]})  # before the client's engine threads start: they inherit it
            client_rows, records = asyncio.run(drive_traced(model, peers, rounds, n_tokens))
        finally:
            os.environ.pop("EDGE_AGENT_HOP_TRACE", None)
            for peer in peers:
                peer.stop()
        peer_rows = [tuple(json.loads(line)) for f in Path(d).glob("trace.*") for line in f.read_text().splitlines()]
    client, peer = stamps_of(client_rows), stamps_of(peer_rows)
    hops = [(c, peer[k]) for k, c in client.items() if "call" in c and "done" in c and k in peer]
    stamp = {"c": 0, "p": 1}
    print(f"{len(hops)} decode hops ({len(spans)} peers, {rounds} x {n_tokens} tokens); microseconds per hop:")
    print(f"  {'stage':58} {'p50':>7} {'p99':>7}")
    prev = ("c", "call")
    for name, proc, end in STAGES:
        d_us = [(h[stamp[proc]][end] - h[stamp[prev[0]]][prev[1]]) / 1000 for h in hops]
        print(f"  {name:58} {np.percentile(d_us, 50):7.1f} {np.percentile(d_us, 99):7.1f}")
        prev = (proc, end)
    for name, proc in WRITES:
        d_us = [(h[stamp[proc]]["sent"] - h[stamp[proc]]["send"]) / 1000 for h in hops]
        print(f"  {name:58} {np.percentile(d_us, 50):7.1f} {np.percentile(d_us, 99):7.1f}")
    compute = [r.compute_ms * 1000 for r in records]
    overhead = [(r.wall_ms - r.compute_ms) * 1000 for r in records]
    whole = [(c["done"] - c["call"]) / 1000 for c, _ in hops]
    print(f"  {'peer compute_us (llama_decode)':58} {np.percentile(compute, 50):7.1f} {np.percentile(compute, 99):7.1f}")
    print(f"  {'Router.call, whole (call -> done)':58} {np.percentile(whole, 50):7.1f} {np.percentile(whole, 99):7.1f}")
    print(f"overhead = link wall - compute_us over {len(records)} hops: p50 {np.percentile(overhead, 50) / 1000:.3f} ms, "
          f"p99 {np.percentile(overhead, 99) / 1000:.3f} ms; load avg {os.getloadavg()[0]:.2f}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=30, help="decode steps per in-process sample")
    ap.add_argument("--tokens", type=int, default=24, help="decode tokens per peer run")
    ap.add_argument("--skip-peer", action="store_true")
    ap.add_argument("--split", type=int, default=1, help="the middle layers as this many equal spans (peers)")
    ap.add_argument("--breakdown", action="store_true", help="only the stage-by-stage breakdown of one hop")
    ap.add_argument("--pin", action="store_true", help="with --breakdown: the client on one CPU, the peers on the others")
    args = ap.parse_args()
    shape = SHAPE_QUICK if args.quick else SHAPE_04B
    model = make_random_gguf(CACHE / f"random-{'quick' if args.quick else '04b'}-q4_0.gguf", ftype="q4_0", **shape)
    n_layer = shape["n_layer"]
    cuts = [1 + round(i * (n_layer - 2) / args.split) for i in range(args.split + 1)]
    spans = list(zip(cuts, cuts[1:]))
    if args.breakdown:
        from edge_agent import eventloop

        eventloop.install()  # as the CLI does, in the client here and in the peers (EDGE_AGENT_UVLOOP=0: asyncio's)
        print(f"model {shape} Q4_0, peers {' + '.join(f'{a}:{b}' for a, b in spans)}, 1 thread each{', pinned' if args.pin else ''}, "
              f"{'asyncio' if os.environ.get(eventloop.ENV) == '0' else 'uvloop'} loops; load avg {os.getloadavg()[0]:.2f} at start")
        return breakdown(model, spans, args.rounds, args.tokens, args.pin)
    x = np.random.default_rng(0).standard_normal((16 + max(args.steps, 20), shape["n_embd"])).astype(np.float32)
    print(f"model {shape} Q4_0, middle layers as {' + '.join(f'{a}:{b}' for a, b in spans)}, 1 thread each; "
          f"load avg {os.getloadavg()[0]:.2f} at start")
    print(f"callback census (shard 1:{n_layer - 1}):", json.dumps(census(model, (1, n_layer - 1), x, 20)), flush=True)
    print("alone, paired, ms per decode step:", json.dumps(alone_ab(model, (1, n_layer - 1), x, 2 * args.rounds)), flush=True)
    print(f"in-process ms per decode step (median over {args.rounds} rounds of each round's median of {args.steps} steps):")
    for cell, v in in_process(model, spans, x, args.rounds, args.steps).items():
        print(f"  {cell:46} {v['median']:7.2f}   (rounds {v['min']:.2f}-{v['max']:.2f})", flush=True)
    if not args.skip_peer:
        print(f"join peers over loopback TLS, {args.tokens} decode tokens per run, {args.rounds} runs each, alternating "
              "(peer_compute_ms: all hops' compute of one token):")
        for kind, v in peer_process(model, spans, args.rounds, args.tokens).items():
            print(f"  peer with {kind} capture: {json.dumps(v)}")
    print(f"load avg {os.getloadavg()[0]:.2f} at end")


if __name__ == "__main__":
    main()
