"""WebRTC signalling over HTTP: one authenticated offer/answer round trip.

POST /v1/webrtc/offer with JSON {"hello": hex, "sdp": str, "auth": hex}
  -> 200 {"hello": hex, "sdp": str, "auth": hex}   or   4xx/5xx {"error": reason}

The client signs (and proves the swarm key over) a transcript holding its HELLO and the hash
of its offer SDP; the server checks that before it allocates a peer connection, then signs a
transcript holding both HELLOs and both SDP hashes.  The SDPs carry the DTLS fingerprints
and aiortc refuses a DTLS peer whose certificate does not match, so an attacker who
rewrites or replays the exchange cannot complete DTLS.  The client's nonce makes the answer
fresh; a replayed offer gains nothing without the offerer's DTLS key, and it only costs the
server a pending connection, capped at MAX_PENDING and timed out.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from typing import Any

import aiohttp
from aiohttp import web
from aiortc import RTCIceServer, RTCSessionDescription

from ..discovery.identity import Identity, SwarmKey
from .channel import ChannelHandler, hand_over
from .errors import HandshakeError, PeerLostError
from .handshake import HANDSHAKE_VERSION, check_auth, make_auth, make_hello, parse_hello, transcript
from . import rtc as _w

log = logging.getLogger(__name__)
PATH = "/v1/webrtc/offer"
MAX_BODY = 64 * 1024
MAX_PENDING = 32


def _h(sdp: str) -> bytes:
    return hashlib.sha256(sdp.encode("utf-8")).digest()


def _unhex(value: Any, what: str, limit: int = 512) -> bytes:
    if not isinstance(value, str) or len(value) > limit:
        raise HandshakeError(f"malformed {what}")
    try:
        return bytes.fromhex(value)
    except ValueError:
        raise HandshakeError(f"malformed {what}") from None


class WebRtcServer:
    """The signalling endpoint; `port` is its bound port, `close()` stops it and its channels."""

    def __init__(self, runner: web.AppRunner, port: int, channels: set[_w.WebRtcChannel],
                 pcs: set[Any]) -> None:
        self._runner, self.port, self._channels, self._pcs = runner, port, channels, pcs

    def close(self) -> "asyncio.Task[None]":
        """Stop accepting and drop every channel; the returned task may be awaited."""
        for ch in list(self._channels):
            ch._fail("server closed")

        async def _cleanup() -> None:
            await asyncio.gather(*(pc.close() for pc in list(self._pcs)), return_exceptions=True)
            await self._runner.cleanup()
        return asyncio.get_running_loop().create_task(_cleanup())


async def listen(identity: Identity, swarm: SwarmKey, host: str, port: int, on_channel: ChannelHandler, *,
                 ice_servers: list[RTCIceServer | str] | None = None, open_timeout: float = _w.DEFAULT_OPEN_TIMEOUT,
                 **channel_kw: Any) -> WebRtcServer:
    """Serve signalling on host:port; `on_channel(channel)` runs for each authenticated peer."""
    channels: set[_w.WebRtcChannel] = set()
    pcs: set[Any] = set()
    tasks: set[asyncio.Task[None]] = set()

    async def finish(pc: Any, dc: Any, peer_id: str) -> None:
        try:
            await _w.wait_open(dc, pc, open_timeout)
        except ConnectionError as exc:
            log.info("webrtc: peer %s... never opened: %s", peer_id[:12], exc)
            pcs.discard(pc)
            await pc.close()
            return
        ch = _w.WebRtcChannel(peer_id, pc, dc, **channel_kw)
        ch._start()
        pcs.discard(pc)
        await hand_over(ch, channels, on_channel)

    async def offer(request: web.Request) -> web.Response:
        if len(pcs) >= MAX_PENDING:  # offers whose data channel has not opened yet
            return web.json_response({"error": "busy"}, status=503)
        try:
            body = await request.json()
            if not isinstance(body, dict) or not isinstance(body.get("sdp"), str):
                raise HandshakeError("malformed offer")
            offer_sdp: str = body["sdp"]
            client = parse_hello(_unhex(body.get("hello"), "hello"), swarm, identity)
            check_auth(client, swarm, transcript("webrtc", _h(offer_sdp), client.raw, b""), b"C",
                       _unhex(body.get("auth"), "auth"))
        except HandshakeError as exc:
            log.info("webrtc: refused an offer: %s", exc.reason)
            return web.json_response({"error": exc.reason}, status=403)
        except (ValueError, UnicodeDecodeError):
            return web.json_response({"error": "malformed offer"}, status=400)
        pc = _w.make_peer_connection(ice_servers)
        pcs.add(pc)
        pc.on("connectionstatechange",
              lambda: pcs.discard(pc) if pc.connectionState in ("failed", "closed") else None)
        dc = _w.open_data_channel(pc)
        try:
            with _w._ice_hosts(_w.loopback_hosts(request.remote or "")):
                await pc.setRemoteDescription(RTCSessionDescription(offer_sdp, "offer"))
                await pc.setLocalDescription(await pc.createAnswer())
        except Exception as exc:  # noqa: BLE001 - aiortc raises many types on a bad SDP
            pcs.discard(pc)
            await pc.close()
            return web.json_response({"error": f"bad offer: {type(exc).__name__}"}, status=400)
        answer_sdp = pc.localDescription.sdp
        mine = make_hello(identity, swarm)
        base = transcript("webrtc", _h(offer_sdp) + _h(answer_sdp), client.raw, mine)
        task = asyncio.get_running_loop().create_task(finish(pc, dc, client.agent_id))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        return web.json_response({"hello": mine.hex(), "sdp": answer_sdp,
                                  "auth": make_auth(identity, swarm, base, b"S").hex()})

    app = web.Application(client_max_size=MAX_BODY)
    app.router.add_post(PATH, offer)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return WebRtcServer(runner, bound, channels, pcs)


async def connect(identity: Identity, swarm: SwarmKey, host: str, signalling_port: int,
                  ice_servers: list[RTCIceServer | str] | None = None, expect_peer_id: str | None = None, *,
                  timeout: float = _w.DEFAULT_OPEN_TIMEOUT, _version: int = HANDSHAKE_VERSION,
                  **channel_kw: Any) -> _w.WebRtcChannel:
    """Offer a data channel to the peer serving signalling at host:port."""
    pc = _w.make_peer_connection(ice_servers)
    try:
        dc = _w.open_data_channel(pc)
        with _w._ice_hosts(_w.loopback_hosts(host)):
            await pc.setLocalDescription(await pc.createOffer())
        offer_sdp = pc.localDescription.sdp
        mine = make_hello(identity, swarm, version=_version)
        auth = make_auth(identity, swarm, transcript("webrtc", _h(offer_sdp), mine, b""), b"C")
        url = f"http://{'[' + host + ']' if ':' in host else host}:{signalling_port}{PATH}"
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as http:
                async with http.post(url, json={"hello": mine.hex(), "sdp": offer_sdp, "auth": auth.hex()}) as resp:
                    if resp.content_length is not None and resp.content_length > MAX_BODY:
                        raise HandshakeError("oversized answer")
                    body = await resp.json(content_type=None)
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
            raise PeerLostError(f"signalling with {host}:{signalling_port} failed: {exc!r}") from None
        if not isinstance(body, dict):
            raise HandshakeError("malformed answer")
        if resp.status != 200:
            raise HandshakeError(f"peer refused: {str(body.get('error'))[:200]}")
        if not isinstance(body.get("sdp"), str):
            raise HandshakeError("malformed answer")
        answer_sdp: str = body["sdp"]
        server = parse_hello(_unhex(body.get("hello"), "hello"), swarm, identity, expect_peer_id)
        base = transcript("webrtc", _h(offer_sdp) + _h(answer_sdp), mine, server.raw)
        check_auth(server, swarm, base, b"S", _unhex(body.get("auth"), "auth"))
        await pc.setRemoteDescription(RTCSessionDescription(answer_sdp, "answer"))
        try:
            await _w.wait_open(dc, pc, timeout)
        except ConnectionError as exc:
            raise PeerLostError(f"webrtc to {server.agent_id[:12]}... did not connect: {exc}") from None
    except BaseException:
        await pc.close()
        raise
    ch = _w.WebRtcChannel(server.agent_id, pc, dc, **channel_kw)
    ch._start()
    return ch
