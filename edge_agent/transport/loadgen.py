"""A second process to talk to: deterministic frame streams and echo peers.

Why: transport tests and bench/transport.py must exercise real sockets between separate OS
processes (a SIGKILLed sender, CPU not shared with the receiver's event loop).  This module
is that other process, and the deterministic traffic both sides agree on.

    python -m edge_agent.transport.loadgen send KIND HOST PORT SECRET COUNT BIG_EVERY [--forever]
    python -m edge_agent.transport.loadgen echo KIND HOST SECRET   (echoes frames <= 64 KiB, ACKs bigger)
KIND is tls, webrtc or tcp (bare length-prefixed TCP, the benchmark baseline).  The first
stdout line is "READY <port> <agent_id>".  Loopback only: it binds/connects where told.
"""

from __future__ import annotations

import asyncio
import struct
import sys
from typing import Any

import numpy as np

from ..discovery.identity import Identity, SwarmKey
from .errors import PeerLostError
from .frames import Frame, MsgType

HIDDEN = 576
ECHO_LIMIT = 64 * 1024  # echo peers return frames up to this size, and only an ACK for bigger ones
BIG_SIZES = (256 * 1024, 1 << 20, 4 << 20, 8 << 20)


def mixed_frame(i: int, big_every: int = 500) -> Frame:
    """Frame i of the standard mix: one-token f16 activations, every `big_every`-th one big
    (cycling 256 KiB .. 8 MiB).  Content depends only on i, so a receiver can regenerate it."""
    rid = struct.pack("<QQ", 0xEA, i // 100)
    if big_every and i % big_every == big_every - 1:
        nbytes = BIG_SIZES[(i // big_every) % len(BIG_SIZES)]
        rows = nbytes // (4096 * 2)
        arr = np.frombuffer(np.random.default_rng(i).bytes(rows * 4096 * 2), np.float16).reshape(rows, 4096)
        n = rows
    else:
        arr = np.frombuffer(np.random.default_rng(i).bytes(HIDDEN * 2), np.float16).reshape(1, HIDDEN)
        n = 1
    return Frame.from_array(MsgType.ACTIVATION, arr, request_id=rid, step=i, n_positions=n, layer_start=0,
                            layer_end=12, seq=i, flags=0)


async def open_channel(kind: str, identity: Identity, swarm: SwarmKey, host: str, port: int, **kw: Any) -> Any:
    if kind == "tls":
        from . import tls
        return await tls.connect(identity, swarm, host, port, **kw)
    if kind == "webrtc":
        from . import webrtc
        return await webrtc.connect(identity, swarm, host, port, **kw)
    raise ValueError(kind)


async def serve(kind: str, identity: Identity, swarm: SwarmKey, host: str, port: int, handler: Any,
                **kw: Any) -> Any:
    if kind == "tls":
        from . import tls
        return await tls.listen(identity, swarm, host, port, handler, **kw)
    if kind == "webrtc":
        from . import webrtc
        return await webrtc.listen(identity, swarm, host, port, handler, **kw)
    raise ValueError(kind)


# ---- bare TCP baseline (no TLS, no handshake): 8-byte length prefix + bytes -------------------
class BareTcp(asyncio.Protocol):
    """Length-prefixed messages over plain TCP, parsed like TlsChannel parses frames."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[bytes] = asyncio.Queue()
        self.transport: asyncio.Transport | None = None
        self._buf = bytearray()
        self._need = -1
        self._ok = asyncio.Event()
        self._ok.set()

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        transport.set_write_buffer_limits(high=2 << 20, low=512 * 1024)  # same tuning as TlsChannel

    def pause_writing(self) -> None:
        self._ok.clear()

    def resume_writing(self) -> None:
        self._ok.set()

    def data_received(self, data: bytes) -> None:
        self._buf += data
        while True:
            if self._need < 0:
                if len(self._buf) < 8:
                    return
                self._need = struct.unpack_from("<Q", self._buf)[0]
                del self._buf[:8]
            if len(self._buf) < self._need:
                return
            msg = bytes(self._buf[:self._need])
            del self._buf[:self._need]
            self._need = -1
            self.queue.put_nowait(msg)

    async def send(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.writelines((struct.pack("<Q", len(data)), data))
        await self._ok.wait()

    async def recv(self) -> bytes:
        return await self.queue.get()


async def _echo(kind: str, host: str, secret: str) -> None:
    identity, swarm = Identity.generate(), SwarmKey.from_secret(secret or None)
    loop = asyncio.get_running_loop()
    if kind == "tcp":
        def factory() -> BareTcp:
            p = BareTcp()

            async def pump() -> None:
                while True:
                    msg = await p.recv()
                    await p.send(msg if len(msg) <= ECHO_LIMIT else b"ACK")
            loop.create_task(pump())
            return p
        server = await loop.create_server(factory, host, 0)
        port = server.sockets[0].getsockname()[1]
    else:
        async def handler(ch: Any) -> None:
            try:
                while True:
                    f = await ch.recv()
                    await ch.send(f if len(f.payload) <= ECHO_LIMIT else Frame(MsgType.ACK, seq=f.seq))
            except PeerLostError as exc:
                print(f"echo {kind}: channel ended: {exc.reason}", file=sys.stderr, flush=True)
        server = await serve(kind, identity, swarm, host, 0, handler)
        port = server.port
    print(f"READY {port} {identity.agent_id}", flush=True)
    await asyncio.sleep(3600)


async def _send(kind: str, host: str, port: int, secret: str, count: int, big_every: int, forever: bool) -> None:
    identity, swarm = Identity.generate(), SwarmKey.from_secret(secret or None)
    ch = await open_channel(kind, identity, swarm, host, port)
    print(f"READY {port} {identity.agent_id}", flush=True)
    i = 0
    while forever or i < count:
        f = mixed_frame(i, big_every)
        await ch.send(f)
        i += 1
    try:  # wait for the receiver to hang up: it has then seen everything
        while True:
            await ch.recv()
    except PeerLostError:
        pass


def main(argv: list[str]) -> None:
    from edge_agent import eventloop

    eventloop.install()  # the loop an agent runs (EDGE_AGENT_UVLOOP=0: asyncio's), for the benchmark's peers
    mode, kind = argv[0], argv[1]
    if mode == "echo":
        asyncio.run(_echo(kind, argv[2], argv[3]))
    elif mode == "send":
        forever = "--forever" in argv
        asyncio.run(_send(kind, argv[2], int(argv[3]), argv[4], int(argv[5]), int(argv[6]), forever))
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
