"""WebRTC transport (real aiortc over loopback UDP), with the sender in a separate OS process.

aioice never offers 127.0.0.1; rtc.py restricts ICE host candidates to loopback while
gathering for a loopback peer, so these tests never touch another interface.  WebRTC's
pure-Python SCTP moves only a few MB/s, so the big frames here are few: 10,000 frames
totalling ~25 MB (4 big ones, 256 KiB .. 8 MiB), well under a minute.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time

import aiohttp
import numpy as np
import pytest

from edge_agent.discovery.identity import Identity, SwarmKey
from edge_agent.transport import Frame, MsgType, PeerLostError, webrtc
from edge_agent.transport.handshake import make_auth, make_hello, transcript
from edge_agent.transport.signalling import PATH, _h

from test_transport_tls import HOST, LOSS_BOUND, SECRET, SLACK, assert_refusals, kill_mid_stream, listen_one, \
    stream_from_process


@pytest.mark.slow
def test_10k_mixed_frames_intact_in_order():
    nbytes, elapsed = asyncio.run(stream_from_process("webrtc", webrtc, 10_000, 2500))
    assert nbytes > 20e6
    print(f"webrtc: {nbytes / 1e6:.0f} MB in {elapsed:.2f} s")


def test_sigkilled_sender_detected_by_heartbeat():
    """UDP gives no FIN: the app heartbeat timeout must fire (ICE consent alone takes ~30 s)."""
    dt = asyncio.run(kill_mid_stream("webrtc", webrtc, signal.SIGKILL))
    print(f"webrtc SIGKILL noticed after {dt:.2f} s")
    assert dt < LOSS_BOUND + SLACK, dt


async def _round_trip() -> None:
    server, fut = await listen_one("webrtc", webrtc)
    me = Identity.generate()
    ch = await webrtc.connect(me, SwarmKey.from_secret(SECRET), HOST, server.port)
    peer = await asyncio.wait_for(fut, 10)
    assert peer.peer_id == me.agent_id and ch.kind == "webrtc" == peer.kind
    # Only loopback ICE candidates were offered (no other interface, no STUN).
    cands = [line for line in ch.pc.localDescription.sdp.splitlines() if line.startswith("a=candidate")]
    assert cands and all(" 127.0.0.1 " in c and "typ host" in c for c in cands), cands
    big = Frame.from_array(MsgType.ACTIVATION, np.arange(256 * 4096, dtype=np.float32).reshape(256, 4096))
    await ch.send(big)  # 4 MiB: 64 fragments
    assert await asyncio.wait_for(peer.recv(), 30) == big
    # Concurrent senders: fragments of different frames never interleave.
    sent = [Frame.from_array(MsgType.ACTIVATION, np.full((n, 576), n, np.float16), seq=n) for n in (200, 1, 90, 2)]
    await asyncio.gather(*(ch.send(f) for f in sent))
    got = [await asyncio.wait_for(peer.recv(), 30) for _ in sent]
    assert sorted(got, key=lambda f: f.seq) == sorted(sent, key=lambda f: f.seq)
    await asyncio.sleep(1.2)  # idle: heartbeats keep it alive
    await peer.send(Frame(MsgType.ACK, seq=9))
    assert (await asyncio.wait_for(ch.recv(), 5)).seq == 9
    await ch.close()
    with pytest.raises(PeerLostError, match="closed"):
        await asyncio.wait_for(peer.recv(), 5)
    await server.close()


def test_round_trip_loopback_only_and_graceful_close():
    asyncio.run(_round_trip())


async def _refusals() -> None:
    good = SwarmKey.from_secret(SECRET)
    accepted: list = []
    server = await webrtc.listen(Identity.generate(), good, HOST, 0, accepted.append)
    me = Identity.generate()
    await assert_refusals(webrtc.connect, server.port, me, good, timeout=5)
    # A man in the middle inside the swarm (knows the key) rewrites the offer to put in its own
    # DTLS fingerprint: it can redo the swarm proof but not the victim's signature.
    sdp = "v=0\r\na=fingerprint:sha-256 " + ":".join(["AB"] * 32) + "\r\n"
    evil = sdp.replace("AB", "CD")
    hello = make_hello(me, good)
    auth = make_auth(me, good, transcript("webrtc", _h(sdp), hello, b""), b"C")
    auth = auth[:65] + good.prove(transcript("webrtc", _h(evil), hello, b"") + b"C")
    async with aiohttp.ClientSession() as http:
        body = {"hello": hello.hex(), "sdp": evil, "auth": auth.hex()}
        async with http.post(f"http://{HOST}:{server.port}{PATH}", json=body) as resp:
            assert resp.status == 403 and "signature" in (await resp.json())["error"]
        async with http.post(f"http://{HOST}:{server.port}{PATH}", data=b"x" * 100_000) as resp:
            assert resp.status in (400, 413)
        async with http.post(f"http://{HOST}:{server.port}{PATH}", data=json.dumps([1, 2])) as resp:
            assert resp.status in (400, 403)
    await asyncio.sleep(0.2)
    assert accepted == []
    await server.close()


def test_handshake_refusals():
    t0 = time.perf_counter()
    asyncio.run(_refusals())
    assert time.perf_counter() - t0 < 30


async def _garbage_after_auth() -> None:
    server, fut = await listen_one("webrtc", webrtc)
    ch = await webrtc.connect(Identity.generate(), SwarmKey.from_secret(SECRET), HOST, server.port)
    peer = await asyncio.wait_for(fut, 10)
    ch.dc.send(b"EG\x01\x03" + b"\xff" * 50)  # a fragment declaring 4 GiB
    with pytest.raises(PeerLostError, match="protocol error"):
        await asyncio.wait_for(peer.recv(), 5)
    await ch.close()
    await server.close()


def test_malformed_fragment_from_authenticated_peer_drops_channel():
    asyncio.run(_garbage_after_auth())
