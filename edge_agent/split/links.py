"""The client's side of a connection to one peer: request/reply over a channel.

Many requests (and many hops of one request, in chain mode) share one channel to a peer;
each reply is matched to its waiter by (request id, seq) as the channel receives it. A
lost peer fails every waiter at once with ``HopFailed`` so the client can re-route
without hanging.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from dataclasses import dataclass

from edge_agent.split.protocol import ErrorCode, HopFailed, control_frame, parse_control, parse_error
from edge_agent.transport import Frame, FrameError, MsgType, PeerLostError, hoptrace

__all__ = ["HopFailed", "PeerLink", "Reply"]


@dataclass
class Reply:
    frame: Frame
    wall_ms: float  # send -> reply, as the client saw it


class PeerLink:
    def __init__(self, peer_id: str, channel, rtt_ms: float | None = None, on_traffic=None):
        self.peer_id = peer_id
        self.on_traffic = on_traffic  # liveness hook: traffic proves the peer alive (peer table)
        self.channel = channel
        self.rtt_ms = rtt_ms
        self._pending: dict[tuple[bytes, int], asyncio.Future] = {}
        self._seq = itertools.count(1)
        self._lost: str | None = None
        # replies are matched in the channel's receive callback: no reader task to wake first
        channel.add_lost_callback(lambda exc: self._fail(f"connection lost ({exc})"))
        channel.set_receiver(self._on_frame)

    @property
    def alive(self) -> bool:
        return self._lost is None

    def next_seq(self) -> int:
        return next(self._seq)

    def _on_frame(self, frame: Frame) -> bool:
        if hoptrace.ON and frame.type == MsgType.ACTIVATION:
            hoptrace.mark("read", frame)
        if self.on_traffic is not None:
            self.on_traffic(self.peer_id)
        fut = self._pending.pop((frame.request_id, frame.seq), None)
        if fut is not None and not fut.done():
            fut.set_result(frame)
        return True  # a reply nobody waits for (timed out) is dropped

    def _fail(self, reason: str) -> None:
        self._lost = self._lost or reason  # the first cause, not the channel's echo of it
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(HopFailed(self.peer_id, reason, ErrorCode.PEER_LOST))
        self._pending.clear()

    async def request(self, frame: Frame, timeout_s: float | None) -> Reply:
        """Send a frame and wait for the reply with the same (request id, seq)."""
        if self._lost is not None:
            raise HopFailed(self.peer_id, self._lost, ErrorCode.PEER_LOST)
        key = (frame.request_id, frame.seq)
        fut = asyncio.get_running_loop().create_future()
        self._pending[key] = fut
        t0 = time.perf_counter()
        try:
            await self.channel.send(frame)
            async with asyncio.timeout(timeout_s):  # no extra waiter future, unlike wait_for on 3.11
                reply = await fut
            if hoptrace.ON and reply.type == MsgType.ACTIVATION:
                hoptrace.mark("woken", reply)
        except (PeerLostError, FrameError) as exc:
            self._fail(f"connection lost ({exc})")
            raise HopFailed(self.peer_id, str(exc), ErrorCode.PEER_LOST) from None
        except TimeoutError:
            self._pending.pop(key, None)
            raise HopFailed(self.peer_id, f"no answer within {timeout_s * 1000:.0f} ms", ErrorCode.DEADLINE, permanent=False) from None
        wall = (time.perf_counter() - t0) * 1000.0
        if reply.type == MsgType.ERROR:
            code, message = parse_error(reply)
            raise HopFailed(self.peer_id, message, code)
        return Reply(reply, wall)

    async def post(self, frame: Frame) -> None:
        """Send without waiting for an answer here (chain mode: it comes on another link)."""
        if self._lost is not None:
            raise HopFailed(self.peer_id, self._lost, ErrorCode.PEER_LOST)
        try:
            await self.channel.send(frame)
        except (PeerLostError, FrameError) as exc:
            self._fail(f"connection lost ({exc})")
            raise HopFailed(self.peer_id, str(exc), ErrorCode.PEER_LOST) from None

    def expect(self, key: tuple[bytes, int]) -> asyncio.Future:
        """A future for a reply that another peer's frame will cause (chain mode)."""
        fut = asyncio.get_running_loop().create_future()
        if self._lost is not None:
            fut.set_exception(HopFailed(self.peer_id, self._lost, ErrorCode.PEER_LOST))
        else:
            self._pending[key] = fut
        return fut

    def forget(self, key: tuple[bytes, int]) -> None:
        self._pending.pop(key, None)

    async def send(self, frame: Frame) -> None:
        """Fire and forget (END_REQUEST); a dead link is ignored."""
        if self._lost is None:
            try:
                await self.channel.send(frame)
            except PeerLostError:
                self._fail("connection lost")

    async def info(self, timeout_s: float = 5.0) -> dict:
        reply = await self.request(control_frame({"op": "info"}, self.next_seq()), timeout_s)
        self.rtt_ms = reply.wall_ms if self.rtt_ms is None else min(self.rtt_ms, reply.wall_ms)
        info = parse_control(reply.frame)
        if info is None:
            raise HopFailed(self.peer_id, "malformed info reply", ErrorCode.BAD_REPLY)
        return info

    async def close(self) -> None:
        self._fail("link closed")
        try:
            await self.channel.close()
        except Exception:  # noqa: BLE001 - closing a dead channel
            pass
