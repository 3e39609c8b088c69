"""TLS transport over real loopback sockets, with the sender in a separate OS process."""

from __future__ import annotations

import asyncio
import os
import signal
import ssl
import subprocess
import sys
import time

import numpy as np
import pytest

from edge_agent.discovery.identity import Identity, SwarmKey
from edge_agent.transport import Frame, HandshakeError, MsgType, PeerLostError, tls
from edge_agent.transport.channel import DEFAULT_HEARTBEAT_INTERVAL, DEFAULT_PEER_TIMEOUT
from edge_agent.transport.loadgen import mixed_frame

HOST = "127.0.0.1"
SECRET = "test-swarm-secret"
LOSS_BOUND = DEFAULT_PEER_TIMEOUT + DEFAULT_HEARTBEAT_INTERVAL / 2  # documented: 2.125 s
# What must hold is that loss is noticed within the bound, not how precisely: on a loaded
# 2-core machine the event loop can run seconds late, so the tests allow that much.
SLACK = 3.0


def spawn_sender(kind: str, port: int, count: int, big_every: int, forever: bool = False) -> subprocess.Popen:
    args = [sys.executable, "-m", "edge_agent.transport.loadgen", "send", kind, HOST, str(port), SECRET,
            str(count), str(big_every)] + (["--forever"] if forever else [])
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def reap(proc: subprocess.Popen) -> None:
    proc.kill()
    proc.wait(10)
    proc.stdout.close()
    proc.stderr.close()


async def listen_one(kind: str, module, swarm: SwarmKey | None = None):
    """Listen; return (server, future resolving to the first authenticated channel)."""
    fut = asyncio.get_running_loop().create_future()

    async def on_channel(ch):
        if not fut.done():
            fut.set_result(ch)
    server = await module.listen(Identity.generate(), swarm or SwarmKey.from_secret(SECRET), HOST, 0, on_channel)
    return server, fut


async def receive_in_order(ch, count: int, big_every: int) -> int:
    """Each of `count` frames arrives intact, in order, once; returns the payload bytes."""
    total = 0
    for i in range(count):
        got = await ch.recv()
        want = mixed_frame(i, big_every)
        assert got == want, f"frame {i}: got seq={got.seq} len={len(got.payload)}, want seq={want.seq} len={len(want.payload)}"
        total += len(got.payload)
    return total


async def stream_from_process(kind: str, module, count: int, big_every: int) -> tuple[int, float]:
    server, fut = await listen_one(kind, module)
    proc = spawn_sender(kind, server.port, count, big_every)
    try:
        ch = await asyncio.wait_for(fut, 30)
        t0 = time.perf_counter()
        nbytes = await asyncio.wait_for(receive_in_order(ch, count, big_every), 90)
        elapsed = time.perf_counter() - t0
        await ch.close()
        assert await asyncio.to_thread(proc.wait, 20) == 0, proc.stderr.read()
        return nbytes, elapsed
    finally:
        reap(proc)
        await server.close()


async def kill_mid_stream(kind: str, module, sig: int) -> float:
    """Sender streams flat out; stop it with `sig`; seconds until recv raises PeerLostError."""
    server, fut = await listen_one(kind, module)
    proc = spawn_sender(kind, server.port, 0, 0, forever=True)
    try:
        ch = await asyncio.wait_for(fut, 30)
        for _ in range(300):
            await asyncio.wait_for(ch.recv(), 10)
        os.kill(proc.pid, sig)
        t0 = time.perf_counter()
        with pytest.raises(PeerLostError):
            while True:
                await asyncio.wait_for(ch.recv(), LOSS_BOUND + 5)
        return time.perf_counter() - t0
    finally:
        reap(proc)
        await server.close()


def test_10k_mixed_frames_intact_in_order():
    """10,000 frames: one-token (576 x f16) plus every 500th big (256 KiB .. 8 MiB, ~66 MB total)."""
    nbytes, elapsed = asyncio.run(stream_from_process("tls", tls, 10_000, 500))
    assert nbytes == sum(len(mixed_frame(i, 500).payload) for i in range(10_000))
    print(f"tls: {nbytes / 1e6:.0f} MB in {elapsed:.2f} s")


def test_sigkilled_sender_detected():
    """SIGKILL: the kernel closes the socket, so loss is seen at once (well inside the bound)."""
    dt = asyncio.run(kill_mid_stream("tls", tls, signal.SIGKILL))
    print(f"tls SIGKILL noticed after {dt:.2f} s")
    assert dt < LOSS_BOUND + SLACK, dt


def test_silent_peer_detected_by_heartbeat():
    """SIGSTOP: the socket stays open and silent (like a power loss); the heartbeat timeout fires."""
    dt = asyncio.run(kill_mid_stream("tls", tls, signal.SIGSTOP))
    print(f"tls SIGSTOP noticed after {dt:.2f} s")
    assert DEFAULT_PEER_TIMEOUT - 0.5 < dt < LOSS_BOUND + SLACK, dt


async def _round_trip_and_close() -> None:
    server, fut = await listen_one("tls", tls)
    me = Identity.generate()
    ch = await tls.connect(me, SwarmKey.from_secret(SECRET), HOST, server.port)
    peer = await asyncio.wait_for(fut, 5)
    assert peer.peer_id == me.agent_id and ch.kind == "tls" == peer.kind
    big = Frame.from_array(MsgType.ACTIVATION, np.ones((2048, 4096), np.float16), seq=1)  # 16 MiB
    await ch.send(big)
    assert await peer.recv() == big
    # Concurrent senders: big frames go out in slices, nothing may interleave inside a frame.
    sent = [Frame.from_array(MsgType.ACTIVATION, np.full((n, 4096), n, np.float16), seq=n) for n in (300, 1, 200, 2)]
    await asyncio.gather(*(ch.send(f) for f in sent))
    got = [await asyncio.wait_for(peer.recv(), 10) for _ in sent]
    assert sorted(got, key=lambda f: f.seq) == sorted(sent, key=lambda f: f.seq)
    await peer.send(Frame.from_bytes(MsgType.ERROR, b"nope"))
    assert (await ch.recv()).payload == b"nope"
    await asyncio.sleep(1.2)  # idle: heartbeats keep the channel alive
    await ch.send(Frame(MsgType.ACK, seq=2))
    assert (await peer.recv()).type == MsgType.ACK
    await ch.close()
    with pytest.raises(PeerLostError, match="closed by peer"):
        await asyncio.wait_for(peer.recv(), 3)
    with pytest.raises(PeerLostError):
        await ch.send(Frame(MsgType.ACK))
    await server.close()


def test_round_trip_heartbeat_and_graceful_close():
    asyncio.run(_round_trip_and_close())


class _TagThief(SwarmKey):
    """An outsider who copied the public swarm tag (it is advertised) but lacks the key."""

    def __init__(self, tag: str) -> None:
        super().__init__(SwarmKey.from_secret("guess")._key)
        self._stolen = tag

    def tag(self) -> str:
        return self._stolen


class _Forger(Identity):
    """Claims another agent's public key but can only sign with its own key."""

    def __init__(self, victim: Identity) -> None:
        super().__init__(Identity.generate()._sk)
        self.public_key, self.agent_id = victim.public_key, victim.agent_id


async def assert_refusals(connect, port: int, me: Identity, good: SwarmKey, **extra) -> None:
    """Every way of being the wrong peer ends in HandshakeError (shared by both transports)."""
    cases = {
        "wrong key": dict(swarm=SwarmKey.from_secret("wrong")),
        "missing key": dict(swarm=SwarmKey.from_secret(None)),
        "stolen tag, wrong key": dict(swarm=_TagThief(good.tag())),
        "forged identity": dict(identity=_Forger(Identity.generate())),
        "wrong version": dict(_version=2),
        "unexpected peer": dict(expect_peer_id=Identity.generate().agent_id),
    }
    for name, kw in cases.items():
        identity, swarm = kw.pop("identity", me), kw.pop("swarm", good)
        with pytest.raises(HandshakeError) as err:
            await connect(identity, swarm, HOST, port, **kw, **extra)
        print(name, "->", err.value.reason)


async def _mitm_relay(server_port: int) -> tuple[asyncio.AbstractServer, int]:
    """A man in the middle: terminates TLS with its own certificate and relays the plaintext."""
    ctx_server, _ = tls._context(Identity.generate(), server=True)
    ctx_client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx_client.check_hostname, ctx_client.verify_mode = False, ssl.CERT_NONE

    async def pipe(r, w):
        try:
            while data := await r.read(65536):
                w.write(data)
                await w.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            w.close()

    async def handle(r1, w1):
        r2, w2 = await asyncio.open_connection(HOST, server_port, ssl=ctx_client, server_hostname="x")
        await asyncio.gather(pipe(r1, w2), pipe(r2, w1))

    relay = await asyncio.start_server(handle, HOST, 0, ssl=ctx_server)
    return relay, relay.sockets[0].getsockname()[1]


async def _refusals() -> None:
    good = SwarmKey.from_secret(SECRET)
    server_id = Identity.generate()
    accepted = []
    server = await tls.listen(server_id, good, HOST, 0, accepted.append)
    me = Identity.generate()
    await assert_refusals(tls.connect, server.port, me, good)
    # A man in the middle with its own TLS certificate: the channel binding differs.
    relay, relay_port = await _mitm_relay(server.port)
    with pytest.raises(HandshakeError, match="signature|refused"):
        await tls.connect(me, good, HOST, relay_port)
    relay.close()
    # Private server vs open client, and open server vs private client.
    open_server = await tls.listen(Identity.generate(), SwarmKey.from_secret(None), HOST, 0, accepted.append)
    with pytest.raises(HandshakeError, match="swarm"):
        await tls.connect(me, good, HOST, open_server.port)
    ok = await tls.connect(me, SwarmKey.from_secret(None), HOST, open_server.port)
    await asyncio.sleep(0.1)
    assert len(accepted) == 1  # only the open-to-open connection was handed to the application
    await ok.close()
    await server.close()
    await open_server.close()


def test_handshake_refusals():
    asyncio.run(_refusals())


async def _backpressure() -> None:
    fut = asyncio.get_running_loop().create_future()
    server = await tls.listen(Identity.generate(), SwarmKey.from_secret(SECRET), HOST, 0,
                              lambda ch: fut.set_result(ch), max_buffered=1 << 20)
    ch = await tls.connect(Identity.generate(), SwarmKey.from_secret(SECRET), HOST, server.port)
    peer = await asyncio.wait_for(fut, 5)
    frames = [Frame.from_array(MsgType.ACTIVATION, np.full((128, 4096), i, np.float16), seq=i) for i in range(40)]

    async def produce():
        for f in frames:
            await ch.send(f)
    producer = asyncio.ensure_future(produce())
    await asyncio.sleep(DEFAULT_PEER_TIMEOUT + 1.0)  # the receiver reads nothing for a while
    assert not producer.done()  # the sender is held back (40 MiB cannot fit the 1 MiB buffer + TCP)
    assert peer.lost is None and ch.lost is None  # a slow reader is not a dead peer
    for f in frames:
        assert await asyncio.wait_for(peer.recv(), 10) == f
    await asyncio.wait_for(producer, 10)
    await ch.close()
    await server.close()


def test_backpressure_slow_reader_is_not_lost():
    asyncio.run(_backpressure())


async def _garbage_after_auth() -> None:
    server, fut = await listen_one("tls", tls)
    ch = await tls.connect(Identity.generate(), SwarmKey.from_secret(SECRET), HOST, server.port)
    peer = await asyncio.wait_for(fut, 5)
    ch._transport.write(b"EAF\x01\x01" + b"\xff" * 200)  # an authenticated peer sends a bad header
    with pytest.raises(PeerLostError, match="protocol error"):
        await asyncio.wait_for(peer.recv(), 5)
    await ch.close()
    await server.close()


def test_malformed_frame_from_authenticated_peer_drops_channel():
    asyncio.run(_garbage_after_auth())


async def _junk_clients() -> None:
    accepted: list = []
    server = await tls.listen(Identity.generate(), SwarmKey.from_secret(SECRET), HOST, 0, accepted.append,
                              handshake_timeout=1.0)
    socks = [await asyncio.open_connection(HOST, server.port) for _ in range(3)]
    socks[0][1].write(b"GET / HTTP/1.0\r\n\r\n" + b"\x00" * 5000)  # not TLS at all
    await asyncio.sleep(2.5)  # the silent ones time out
    for _, w in socks:
        w.close()
    ch = await tls.connect(Identity.generate(), SwarmKey.from_secret(SECRET), HOST, server.port)
    await asyncio.sleep(0.1)
    assert len(accepted) == 1
    await ch.close()
    await server.close()


def test_junk_and_silent_clients_do_not_wedge_the_listener():
    asyncio.run(_junk_clients())


async def _receiver_keeps_order() -> None:
    server, accepted = await listen_one("tls", tls)
    ch = await tls.connect(Identity.generate(), SwarmKey.from_secret(SECRET), HOST, server.port)
    try:
        rx = await asyncio.wait_for(accepted, 10)
        taken: list[int] = []
        rx.set_receiver(lambda f: f.type == MsgType.ACTIVATION and not taken.append(f.seq))
        kinds = [MsgType.ACTIVATION, MsgType.CONTROL, MsgType.ACTIVATION, MsgType.ACTIVATION]
        for seq, kind in enumerate(kinds):
            await ch.send(Frame(kind, seq=seq))
        for _ in range(500):  # bounded: all four delivered before anyone calls recv()
            if rx.frames_received == 4:
                break
            await asyncio.sleep(0.01)
        # the receiver took the first step; the control frame waits for recv(), and so do the
        # steps behind it: nothing overtakes a frame left for recv()
        assert taken == [0]
        assert [(await rx.recv()).seq for _ in range(3)] == [1, 2, 3]
        await ch.send(Frame(MsgType.ACTIVATION, seq=4))  # nothing waiting now: taken at once
        for _ in range(500):
            if taken[-1] == 4:
                break
            await asyncio.sleep(0.01)
        assert taken == [0, 4]
    finally:
        await ch.close()
        server.close()


def test_receiver_takes_frames_in_order_and_leaves_the_rest_to_recv():
    asyncio.run(_receiver_keeps_order())
