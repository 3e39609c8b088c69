"""The one interface both transports implement, and the machinery they share.

Why shared: liveness (heartbeats, the dead-peer bound), the bounded receive buffer and the
"peer lost" semantics must behave identically over TLS and WebRTC, so callers (the hop
server, the split client) handle one error type with one timing guarantee.

Liveness contract: each side sends a HEARTBEAT frame when it has sent nothing for
`heartbeat_interval` seconds; any inbound byte counts as life.  When nothing has arrived
for `peer_timeout` seconds the channel fails: `recv()` (after returning frames already
received) and `send()` raise PeerLostError.  Detection bound: `peer_timeout` plus one
watchdog tick (`heartbeat_interval / 2`) - 2.125 s with the defaults - or immediately when
the OS reports the connection closed (TCP FIN/RST after a SIGKILL).  The event loop must
not be blocked longer than `peer_timeout` (run engine compute in an executor).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from typing import Awaitable, Callable, Protocol, TypeVar, runtime_checkable

from . import hoptrace
from .errors import HandshakeError, PeerLostError
from .frames import DEFAULT_MAX_PAYLOAD, Frame, MsgType, encode_parts

__all__ = ["Channel", "FrameChannel", "PeerLostError", "HandshakeError", "ChannelHandler",
           "DEFAULT_HEARTBEAT_INTERVAL", "DEFAULT_PEER_TIMEOUT"]

log = logging.getLogger(__name__)
DEFAULT_HEARTBEAT_INTERVAL = 0.25  # frequent enough that a 1.5 s scheduling stall is not a death
DEFAULT_PEER_TIMEOUT = 2.0
DEFAULT_MAX_BUFFERED = 256 << 20  # bytes of received-but-unread frames
T = TypeVar("T")


@runtime_checkable
class Channel(Protocol):
    """An authenticated, ordered, reliable frame pipe to one verified peer."""

    peer_id: str  # remote agent_id, verified by the handshake
    kind: str     # "tls" | "webrtc"

    async def send(self, frame: Frame) -> None: ...

    async def recv(self) -> Frame: ...

    async def close(self) -> None: ...


ChannelHandler = Callable[["Channel"], Awaitable[None] | None]


class FrameChannel:
    """Base class: receive buffer, heartbeats, loss detection.  Subclasses implement the
    three transport hooks `_transmit`, `_transmit_nowait` and `_abort`."""

    kind = "abstract"

    def __init__(self, peer_id: str, *, heartbeat_interval: float = DEFAULT_HEARTBEAT_INTERVAL,
                 peer_timeout: float = DEFAULT_PEER_TIMEOUT, max_payload: int = DEFAULT_MAX_PAYLOAD,
                 max_buffered: int = DEFAULT_MAX_BUFFERED) -> None:
        self.peer_id = peer_id
        self.heartbeat_interval = heartbeat_interval
        self.peer_timeout = peer_timeout
        self.max_payload = max_payload
        self.max_buffered = max_buffered
        self._rx: deque[Frame] = deque()
        self._rx_bytes = 0
        self._rx_waiter: asyncio.Future[None] | None = None
        self._lost: PeerLostError | None = None
        self._lost_event = asyncio.Event()
        self._closing = False
        now = time.monotonic()
        self._last_rx = now
        self._last_tx = now
        self._watchdog: asyncio.Task[None] | None = None
        self._lost_callbacks: list[Callable[[PeerLostError], None]] = []
        self.frames_sent = 0
        self.frames_received = 0
        self._rx_ns = 0  # hoptrace only: when the bytes of the frames being parsed arrived
        self._receiver: Callable[[Frame], bool] | None = None

    def __repr__(self) -> str:
        return f"<{type(self).__name__} peer={self.peer_id[:12]} lost={self._lost is not None}>"

    # ---- transport hooks ----------------------------------------------------------------
    async def _transmit(self, header: bytes, payload: bytes) -> None:
        """Send one encoded frame, waiting for flow control."""
        raise NotImplementedError

    def _transmit_nowait(self, header: bytes) -> bool:
        """Send a payload-less control frame without waiting; False if not possible now."""
        raise NotImplementedError

    def _abort(self) -> None:
        """Tear the underlying connection down (idempotent, never raises)."""
        raise NotImplementedError

    # ---- called by transports -----------------------------------------------------------
    def _start(self) -> None:
        if self._watchdog is None:
            self._watchdog = asyncio.get_running_loop().create_task(self._watch())

    def _touch(self) -> None:
        self._last_rx = time.monotonic()

    def _deliver(self, frame: Frame) -> None:
        """A complete frame arrived (liveness already touched by the transport)."""
        t = frame.type
        if t == MsgType.HEARTBEAT:
            return
        if t == MsgType.CLOSE:
            self._fail("closed by peer")
            return
        if hoptrace.ON and t == MsgType.ACTIVATION:
            hoptrace.mark("rx", frame, self._rx_ns)
            hoptrace.mark("deliver", frame)
        self.frames_received += 1
        if self._receiver is not None and not self._rx:  # never ahead of frames left for recv()
            try:
                if self._receiver(frame):
                    return
            except Exception as exc:  # noqa: BLE001 - a receiver bug fails this channel, not the transport
                log.exception("%s: frame receiver failed", self.kind)
                self._fail(f"frame receiver failed: {exc!r}")
                return
        self._rx.append(frame)
        self._rx_bytes += len(frame.payload)
        w = self._rx_waiter
        if w is not None and not w.done():
            w.set_result(None)

    @property
    def rx_full(self) -> bool:
        """Receive buffer over its limit: stream transports pause reading (backpressure)."""
        return self._rx_bytes >= self.max_buffered

    def _on_rx_drained(self) -> None:
        """Hook: buffer dropped below its limit (stream transports resume reading)."""

    def _fail(self, reason: str) -> None:
        """Mark the channel lost, wake every waiter, drop the connection."""
        if self._lost is None:
            self._lost = PeerLostError(reason)
            self._lost_event.set()
            w = self._rx_waiter
            if w is not None and not w.done():
                w.set_result(None)
            if self._watchdog is not None and self._watchdog is not asyncio.current_task():
                self._watchdog.cancel()
            self._abort()
            for cb in self._lost_callbacks:
                try:
                    cb(self._lost)
                except Exception:  # noqa: BLE001 - a callback bug must not hide the loss
                    pass

    def add_lost_callback(self, cb: Callable[[PeerLostError], None]) -> None:
        """Call `cb(error)` once when the channel fails or closes (at once if it already has);
        e.g. to drop the peer from a table without a task blocked in recv()."""
        if self._lost is not None:
            cb(self._lost)
        else:
            self._lost_callbacks.append(cb)

    @property
    def lost(self) -> PeerLostError | None:
        return self._lost

    async def _guard(self, aw: Awaitable[T]) -> T:
        """Await `aw` but give up with PeerLostError as soon as the channel is lost."""
        if self._lost is not None:
            if asyncio.iscoroutine(aw):
                aw.close()
            raise self._lost
        task = asyncio.ensure_future(aw)
        lost = asyncio.ensure_future(self._lost_event.wait())
        try:
            await asyncio.wait((task, lost), return_when=asyncio.FIRST_COMPLETED)
        finally:
            lost.cancel()
        if task.done():
            return task.result()
        task.cancel()
        assert self._lost is not None
        raise self._lost

    # ---- public API ---------------------------------------------------------------------
    async def send(self, frame: Frame) -> None:
        if self._lost is not None:
            raise self._lost
        if hoptrace.ON and frame.type == MsgType.ACTIVATION:
            hoptrace.mark("send", frame)
        header, payload = encode_parts(frame, self.max_payload)
        try:
            await self._transmit(header, payload)
        except (ConnectionError, OSError) as exc:
            self._fail(f"send failed: {exc!r}")
        if self._lost is not None:
            raise self._lost
        if hoptrace.ON and frame.type == MsgType.ACTIVATION:
            hoptrace.mark("sent", frame)
        self._last_tx = time.monotonic()
        self.frames_sent += 1

    async def recv(self) -> Frame:
        """Next frame in order; PeerLostError once the peer is gone and the buffer is empty.
        One consumer at a time (the hop server's or the client's read loop)."""
        while True:
            if self._rx:
                frame = self._rx.popleft()
                was_full = self.rx_full
                self._rx_bytes -= len(frame.payload)
                if was_full and not self.rx_full:
                    self._on_rx_drained()
                return frame
            if self._lost is not None:
                raise self._lost
            if self._rx_waiter is not None:
                raise RuntimeError("concurrent recv() on one channel")
            self._rx_waiter = asyncio.get_running_loop().create_future()
            try:
                await self._rx_waiter
            finally:
                self._rx_waiter = None

    def set_receiver(self, receiver: Callable[[Frame], bool]) -> None:
        """Offer every frame to ``receiver(frame)`` as it arrives, in the transport's callback:
        True means it took the frame, False leaves it for ``recv()``. A consumer reached this
        way needs no reader task to be woken first (a request/reply link, or a hop server's
        steps, save a loop pass per frame). Order is kept: while frames wait for ``recv()``,
        later ones wait behind them. The receiver must not block, and frames it takes are not
        counted by the receive buffer's backpressure. Frames buffered now are offered first."""
        self._receiver = receiver
        was_full = self.rx_full
        while self._rx and receiver(self._rx[0]):
            self._rx_bytes -= len(self._rx.popleft().payload)
        if was_full and not self.rx_full:
            self._on_rx_drained()

    async def close(self) -> None:
        """Tell the peer (best effort, bounded) and drop the connection."""
        if self._lost is None and not self._closing:
            self._closing = True
            try:
                header, _ = encode_parts(Frame(MsgType.CLOSE))
                await asyncio.wait_for(self._transmit(header, b""), 1.0)
                await asyncio.wait_for(self._flush(), 1.0)
            except (Exception, asyncio.TimeoutError):  # noqa: BLE001 - closing anyway
                pass
        self._fail("closed locally")
        if self._watchdog is not None:
            self._watchdog.cancel()

    async def _flush(self) -> None:
        """Hook: wait until queued bytes have left (best effort before close)."""

    # ---- heartbeats and loss detection --------------------------------------------------
    async def _watch(self) -> None:
        tick = min(self.heartbeat_interval, self.peer_timeout) / 2
        hb, _ = encode_parts(Frame(MsgType.HEARTBEAT))
        try:
            while self._lost is None:
                await asyncio.sleep(tick)
                now = time.monotonic()
                if self.rx_full:
                    self._last_rx = now  # we are the bottleneck, not the peer
                if now - self._last_rx > self.peer_timeout:
                    self._fail(f"no traffic from peer for {self.peer_timeout:.1f} s")
                    return
                if now - self._last_tx >= self.heartbeat_interval:
                    try:
                        if self._transmit_nowait(hb):
                            self._last_tx = now
                    except (ConnectionError, OSError) as exc:
                        self._fail(f"heartbeat failed: {exc!r}")
                        return
        except asyncio.CancelledError:
            pass


async def hand_over(ch: FrameChannel, channels: set, on_channel: ChannelHandler) -> None:
    """Listener side: track an authenticated channel in `channels` until it is lost, and run
    the application's handler (sync or async); a handler bug must not kill the listener."""
    channels.add(ch)
    ch.add_lost_callback(lambda _exc: channels.discard(ch))
    try:
        res = on_channel(ch)  # type: ignore[arg-type]
        if asyncio.iscoroutine(res):
            await res
    except Exception:  # noqa: BLE001
        log.exception("%s: on_channel handler failed", ch.kind)
