"""Transport benchmark: bare TCP vs TLS vs WebRTC vs a relayed TLS circuit on loopback, peers in separate processes.

    .venv/bin/python bench/transport.py [--quick] [--kinds tcp,tls,webrtc,relay]   (EDGE_AGENT_UVLOOP=0: asyncio's loop)

For each transport an echo peer runs in its own process (edge_agent.transport.loadgen echo).
Measured, for activation frames of hidden size 576 and 4096 in f16:
  * round trip of one token (1 x hidden): p50 / p99 over many sequential round trips;
  * one-way throughput of 512-token prefill frames (512 x hidden), pipelined: the peer ACKs
    each big frame, the sender keeps a window of 4 frames in flight.
Kinds are measured interleaved over several rounds (the machine may be shared): RTT
percentiles pool all rounds, throughput reports the best round.
Bare TCP sends the same bytes with an 8-byte length prefix and no TLS, framing or handshake.
"relay" is TLS end to end through a relay member (edge_agent/transport/relay.py) in a third
process: the echo peer holds a reservation there and the benchmark dials it through the relay.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from edge_agent import eventloop  # noqa: E402
from edge_agent.discovery.identity import Identity, SwarmKey  # noqa: E402
from edge_agent.transport import PeerLostError, relay, tls  # noqa: E402
from edge_agent.transport.frames import Frame, MsgType, encode  # noqa: E402
from edge_agent.transport.loadgen import ECHO_LIMIT, BareTcp, open_channel  # noqa: E402

HOST = "127.0.0.1"
SECRET = "bench-secret"
HIDDENS = (576, 4096)
PREFILL = 512
WINDOW = 4


def spawn(args: list[str], what: str) -> tuple[subprocess.Popen, list[str]]:
    """A peer process and its READY line's fields (port, agent id)."""
    proc = subprocess.Popen([sys.executable, *args], stdout=subprocess.PIPE, text=True,
                            cwd=Path(__file__).resolve().parent.parent)
    line = proc.stdout.readline().split()
    if not line or line[0] != "READY":
        proc.kill()
        raise RuntimeError(f"{what} failed to start")
    return proc, line[1:]


def spawn_echo(kind: str) -> tuple[list[subprocess.Popen], tuple]:
    """The echo peer's processes and where to reach it: (port,), or for "relay" (relay port, relay id, peer id)."""
    if kind != "relay":
        proc, (port, _) = spawn(["-m", "edge_agent.transport.loadgen", "echo", kind, HOST, SECRET], f"{kind} echo peer")
        return [proc], (int(port),)
    member, (port, relay_id) = spawn([__file__, "--role", "relay"], "relay member")
    peer, (_, peer_id) = spawn([__file__, "--role", "relayed-echo", "--relay-port", port], "relayed echo peer")
    return [member, peer], (int(port), relay_id, peer_id)


async def serve_role(role: str, relay_port: int) -> None:
    """The relay member, or an echo peer reachable only through it (a reservation, no listener)."""
    identity, swarm = Identity.generate(), SwarmKey.from_secret(SECRET)

    async def echo(ch) -> None:
        with contextlib.suppress(PeerLostError):
            while True:
                f = await ch.recv()
                await ch.send(f if len(f.payload) <= ECHO_LIMIT else Frame(MsgType.ACK, seq=f.seq))

    if role == "relay":
        server = await tls.listen(identity, swarm, HOST, 0, relay.RelayService().wrap(echo))
        relay_port = server.port
    else:
        reservation = relay.Reservation(identity, swarm, HOST, relay_port, echo)
        await reservation.start()
        if not await reservation.wait_reserved(10.0):
            raise SystemExit("no reservation at the relay")
    print(f"READY {relay_port} {identity.agent_id}", flush=True)
    await asyncio.sleep(3600)


class Conn:
    """Uniform send/recv over a Channel or the bare TCP baseline (which sends encoded frames)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind

    async def open(self, port: int, *relayed: str) -> None:
        if self.kind == "tcp":
            loop = asyncio.get_running_loop()
            _, self.p = await loop.create_connection(BareTcp, HOST, port)
        elif self.kind == "relay":
            self.ch = await relay.dial(Identity.generate(), SwarmKey.from_secret(SECRET), HOST, port, *relayed)
        else:
            self.ch = await open_channel(self.kind, Identity.generate(), SwarmKey.from_secret(SECRET), HOST, port)

    async def send(self, frame: Frame) -> None:
        if self.kind == "tcp":
            await self.p.send(encode(frame))
        else:
            await self.ch.send(frame)

    async def recv(self) -> None:
        if self.kind == "tcp":
            await self.p.recv()
        else:
            await self.ch.recv()

    async def close(self) -> None:
        if self.kind == "tcp":
            self.p.transport.close()
        else:
            await self.ch.close()


def act(n: int, hidden: int, seq: int = 0) -> Frame:
    arr = np.random.default_rng(n + hidden).standard_normal((n, hidden)).astype(np.float16)
    return Frame.from_array(MsgType.ACTIVATION, arr, request_id=b"b" * 16, step=seq, n_positions=n, seq=seq,
                            layer_start=0, layer_end=12)


async def rtt(conn: Conn, hidden: int, n: int) -> list[float]:
    f = act(1, hidden)
    for _ in range(min(50, n)):
        await conn.send(f)
        await conn.recv()
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        await conn.send(f)
        await conn.recv()
        ts.append(time.perf_counter() - t)
    return ts


async def throughput(conn: Conn, hidden: int, frames: int) -> float:
    f = act(PREFILL, hidden)
    inflight = 0
    t = time.perf_counter()
    for _ in range(frames):
        await conn.send(f)
        inflight += 1
        if inflight >= WINDOW:
            await conn.recv()
            inflight -= 1
    while inflight:
        await conn.recv()
        inflight -= 1
    return frames * len(f.payload) / (time.perf_counter() - t) / 1e6


async def run_all(kinds: list[str], quick: bool, reps: int) -> dict:
    """Every transport's echo peer runs at once; measurements interleave kinds, `reps` rounds.
    RTT percentiles pool every round's samples; throughput keeps each round's best (this
    machine is shared, so the best round is the least disturbed one)."""
    procs, conns = [], {}
    try:
        for kind in kinds:
            started, where = spawn_echo(kind)
            procs += started
            conns[kind] = Conn(kind)
            await conns[kind].open(*where)
        samples: dict = {(k, h): [] for k in kinds for h in HIDDENS}
        best: dict = {(k, h): 0.0 for k in kinds for h in HIDDENS}
        for _ in range(reps):
            for kind, conn in conns.items():
                slow = kind == "webrtc"
                n_rtt = (200 if quick else 500) if slow else (500 if quick else 2000)
                for hidden in HIDDENS:
                    samples[kind, hidden] += await rtt(conn, hidden, n_rtt)
                    mb = PREFILL * hidden * 2 / 1e6
                    target_mb = (5 if quick else 15) if slow else (100 if quick else 400)
                    mbps = await throughput(conn, hidden, max(WINDOW, int(target_mb / mb)))
                    best[kind, hidden] = max(best[kind, hidden], mbps)
        for conn in conns.values():
            await conn.close()
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
    out: dict = {k: {} for k in kinds}
    for (kind, hidden), ts in samples.items():
        ts.sort()
        out[kind][hidden] = (ts[len(ts) // 2] * 1e3, ts[min(len(ts) - 1, int(len(ts) * 0.99))] * 1e3,
                             best[kind, hidden])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--kinds", default="tcp,tls,webrtc")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--role", choices=("relay", "relayed-echo"), help=argparse.SUPPRESS)  # the relay kind's processes
    ap.add_argument("--relay-port", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    kinds = args.kinds.split(",")
    eventloop.install()  # as an agent runs, here and in the echo peers (EDGE_AGENT_UVLOOP=0: asyncio's loop)
    if args.role:
        asyncio.run(serve_role(args.role, args.relay_port))
        return
    results = asyncio.run(run_all(kinds, args.quick, args.reps))
    base = results.get("tcp")
    loop = "asyncio" if os.environ.get(eventloop.ENV) == "0" else "uvloop"
    print(f"\nloopback, peers in separate processes, {os.cpu_count()} CPUs, Python {sys.version.split()[0]}, {loop} loops, "
          f"{args.reps} rounds; RTT = one-token frame there and back; prefill = 512 x hidden f16 one way")
    print(f"{'transport':<9} {'hidden':>6} {'RTT p50 ms':>10} {'RTT p99 ms':>10} {'prefill MB/s':>12} "
          f"{'p50 x tcp':>9} {'MB/s / tcp':>10}")
    for k in kinds:
        for hidden, (p50, p99, mbps) in results[k].items():
            r1 = f"{p50 / base[hidden][0]:.2f}" if base else "-"
            r2 = f"{mbps / base[hidden][2]:.0%}" if base else "-"
            print(f"{k:<9} {hidden:>6} {p50:>10.3f} {p99:>10.3f} {mbps:>12.1f} {r1:>9} {r2:>10}")


if __name__ == "__main__":
    main()
