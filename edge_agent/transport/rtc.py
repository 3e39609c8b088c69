"""The WebRTC Channel (an aiortc data channel) and ICE helpers; entry points are in webrtc.py.

Why this shape: one negotiated, ordered, reliable data channel carries fragmented frames
(aiortc caps a message at 256 KiB, and smaller messages let heartbeats interleave).  Sending
waits on `bufferedAmount` (high/low watermarks), so a fast sender cannot queue unbounded
memory in aiortc.  Authentication happens in the HTTP offer/answer exchange
(signalling.py): both sides sign the SDPs, which carry the DTLS fingerprints that aiortc
then enforces, and prove the swarm key.

Loopback: aioice never offers 127.0.0.1 as a host candidate.  While we gather candidates for
a connection whose signalling address is loopback, a context variable restricts aioice's
host addresses to that loopback address (see `_ice_hosts`), so tests and single-machine
swarms stay on 127.0.0.1 and never touch other interfaces.  iceServers defaults to [] (no
public STUN) unless the caller configures servers.
"""

from __future__ import annotations

import asyncio
import contextvars
import ipaddress
import logging
import time
from contextlib import contextmanager
from typing import Any, Iterator

import aioice.ice as _aioice
from aiortc import RTCConfiguration, RTCIceServer, RTCPeerConnection
from aiortc.rtcdatachannel import RTCDataChannel

from .channel import FrameChannel
from .errors import FrameError
from .fragments import FRAGMENT_HEADER, FRAG_MAGIC, FRAG_VERSION, FIRST, LAST, Reassembler, fragment
from .frames import HEADER_SIZE, decode

log = logging.getLogger(__name__)

FRAGMENT_SIZE = 64 * 1024      # bytes per data channel message (aiortc's limit: 256 KiB); see docs/transport.md
HIGH_WATERMARK = 1 << 20        # pause sending while this much is queued in the channel
LOW_WATERMARK = 256 * 1024      # resume when the queue drains below this
DEFAULT_OPEN_TIMEOUT = 15.0

_ICE_HOSTS: contextvars.ContextVar[list[str] | None] = contextvars.ContextVar("edge_agent_ice_hosts", default=None)
_orig_get_host_addresses = _aioice.get_host_addresses


def _get_host_addresses(use_ipv4: bool, use_ipv6: bool) -> list[str]:
    only = _ICE_HOSTS.get()
    if only is None:
        return _orig_get_host_addresses(use_ipv4, use_ipv6)
    return [a for a in only if (":" in a and use_ipv6) or (":" not in a and use_ipv4)]


_aioice.get_host_addresses = _get_host_addresses  # transparent unless _ICE_HOSTS is set


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def loopback_hosts(host: str) -> list[str] | None:
    """ICE host addresses to use for a peer at `host`: only loopback when it is loopback."""
    if not is_loopback(host):
        return None
    return ["::1"] if ":" in host else ["127.0.0.1"]


@contextmanager
def _ice_hosts(hosts: list[str] | None) -> Iterator[None]:
    token = _ICE_HOSTS.set(hosts)
    try:
        yield
    finally:
        _ICE_HOSTS.reset(token)


def make_peer_connection(ice_servers: list[RTCIceServer | str] | None) -> RTCPeerConnection:
    """An RTCPeerConnection with no STUN/TURN unless configured (aiortc defaults to Google's).
    Servers may be RTCIceServer objects or URL strings such as "stun:stun.example.org:3478"."""
    servers = [s if isinstance(s, RTCIceServer) else RTCIceServer(urls=str(s)) for s in ice_servers or []]
    return RTCPeerConnection(RTCConfiguration(iceServers=servers))


def open_data_channel(pc: RTCPeerConnection) -> RTCDataChannel:
    """The single negotiated channel (id 0) both sides create: no DCEP round trip."""
    return pc.createDataChannel("edge-agent", negotiated=True, id=0, ordered=True)


class WebRtcChannel(FrameChannel):
    """A Channel over one ordered, reliable data channel of `pc`."""

    kind = "webrtc"

    def __init__(self, peer_id: str, pc: RTCPeerConnection, dc: RTCDataChannel, *,
                 fragment_size: int = FRAGMENT_SIZE, **kw: Any) -> None:
        super().__init__(peer_id, **kw)
        self.pc, self.dc = pc, dc
        self.fragment_size = fragment_size
        self._reasm = Reassembler(self.max_payload + HEADER_SIZE, max_fragment=max(fragment_size, 262144))
        self._msg_id = 0
        self._send_lock = asyncio.Lock()
        self._low = asyncio.Event()
        self._low.set()
        self._closing_task: asyncio.Task[None] | None = None
        dc.bufferedAmountLowThreshold = LOW_WATERMARK
        dc.on("message", self._on_message)
        dc.on("bufferedamountlow", self._low.set)
        dc.on("close", lambda: self._fail("data channel closed"))
        pc.on("connectionstatechange", self._on_state)

    def _on_state(self) -> None:
        if self.pc.connectionState in ("failed", "closed"):
            self._fail(f"peer connection {self.pc.connectionState}")

    def _on_message(self, data: bytes | str) -> None:
        self._last_rx = time.monotonic()
        if self._lost is not None:
            return
        if isinstance(data, str):
            self._fail("protocol error from peer: text message")
            return
        try:
            msg = self._reasm.feed(data)
            if msg is not None:
                self._deliver(decode(msg, self.max_payload))
        except FrameError as exc:
            self._fail(f"protocol error from peer: {exc.reason}")
            return
        if self._rx_bytes > self.max_buffered:
            # aiortc has no receive-side backpressure: refuse to grow without bound.
            self._fail(f"receiver overrun: more than {self.max_buffered} bytes unread")

    def _next_msg_id(self) -> int:
        mid = self._msg_id
        self._msg_id = (mid + 1) & 0xFFFFFFFF
        return mid

    async def _transmit(self, header: bytes, payload: bytes) -> None:
        async with self._send_lock:
            if self.dc.readyState != "open":
                raise ConnectionResetError("data channel not open")
            frags = fragment(header + payload if payload else header, self.fragment_size, self._next_msg_id())
            for frag in frags:
                if self.dc.bufferedAmount > HIGH_WATERMARK:
                    self._low.clear()
                    if self.dc.bufferedAmount > LOW_WATERMARK:
                        await self._guard(self._low.wait())
                self._dc_send(frag)

    def _transmit_nowait(self, header: bytes) -> bool:
        if self._send_lock.locked() or self.dc.readyState != "open":
            return False  # a frame is in flight: its fragments keep the peer's timer fresh
        head = FRAGMENT_HEADER.pack(FRAG_MAGIC, FRAG_VERSION, FIRST | LAST, self._next_msg_id(), 0, len(header))
        self._dc_send(head + header)
        return True

    def _dc_send(self, data: bytes) -> None:
        """dc.send, with aiortc's state errors turned into ConnectionError (-> PeerLostError)."""
        try:
            self.dc.send(data)
        except Exception as exc:  # noqa: BLE001 - aiortc raises InvalidStateError and others
            raise ConnectionResetError(f"data channel send failed: {exc!r}") from None

    async def _flush(self) -> None:
        deadline = time.monotonic() + 1.0
        while self.dc.bufferedAmount > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)  # let SCTP put the last chunk on the wire

    def _abort(self) -> None:
        self._low.set()
        if self._closing_task is None:
            try:
                self._closing_task = asyncio.get_running_loop().create_task(self.pc.close())
            except RuntimeError:
                pass

    async def close(self) -> None:
        await super().close()
        if self._closing_task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._closing_task), 2.0)
            except (Exception, asyncio.TimeoutError):  # noqa: BLE001
                pass


async def wait_open(dc: RTCDataChannel, pc: RTCPeerConnection, timeout: float) -> None:
    """Wait for the data channel to open; ConnectionError on failure or timeout."""
    if dc.readyState == "open":
        return
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[None] = loop.create_future()

    def opened() -> None:
        if not fut.done():
            fut.set_result(None)

    def state() -> None:
        if pc.connectionState in ("failed", "closed") and not fut.done():
            fut.set_exception(ConnectionError(f"peer connection {pc.connectionState}"))

    dc.on("open", opened)
    pc.on("connectionstatechange", state)
    try:
        await asyncio.wait_for(fut, timeout)
    except asyncio.TimeoutError:
        raise ConnectionError(f"data channel did not open within {timeout:.0f} s") from None
    finally:
        dc.remove_listener("open", opened)
        pc.remove_listener("connectionstatechange", state)
