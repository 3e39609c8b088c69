"""The client's side of a connection to one peer: request/reply over a channel.

Many requests (and many hops of one request, in chain mode) share one channel to a peer;
a reader task matches each reply to its waiter by (request id, seq). A lost peer fails
every waiter at once with ``HopFailed`` so the client can re-route without hanging.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from dataclasses import dataclass

from edge_agent.split.serve import parse_error
from edge_agent.transport import Frame, FrameError, MsgType, PeerLostError


class HopFailed(Exception):
    """A hop could not produce its step: peer lost, error reply, or deadline overrun."""

    def __init__(self, peer_id: str, reason: str, code: str = "error", permanent: bool = True):
        super().__init__(f"peer {peer_id[:12]}: {reason}")
        self.peer_id, self.reason, self.code, self.permanent = peer_id, reason, code, permanent


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
        self._reader = asyncio.create_task(self._read())

    @property
    def alive(self) -> bool:
        return self._lost is None

    def next_seq(self) -> int:
        return next(self._seq)

    async def _read(self) -> None:
        try:
            while True:
                frame = await self.channel.recv()
                if self.on_traffic is not None:
                    self.on_traffic(self.peer_id)
                fut = self._pending.pop((frame.request_id, frame.seq), None)
                if fut is not None and not fut.done():
                    fut.set_result(frame)
        except PeerLostError as exc:
            self._fail(f"connection lost ({exc})")
        except asyncio.CancelledError:
            self._fail("link closed")
        except Exception as exc:  # noqa: BLE001 - a dead reader must not look like a live link
            self._fail(f"link reader failed: {exc!r}")

    def _fail(self, reason: str) -> None:
        self._lost = reason
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(HopFailed(self.peer_id, reason, "peer_lost"))
        self._pending.clear()

    async def request(self, frame: Frame, timeout_s: float | None) -> Reply:
        """Send a frame and wait for the reply with the same (request id, seq)."""
        if self._lost is not None:
            raise HopFailed(self.peer_id, self._lost, "peer_lost")
        key = (frame.request_id, frame.seq)
        fut = asyncio.get_running_loop().create_future()
        self._pending[key] = fut
        t0 = time.perf_counter()
        try:
            await self.channel.send(frame)
            reply = await asyncio.wait_for(fut, timeout_s)
        except (PeerLostError, FrameError) as exc:
            self._fail(f"connection lost ({exc})")
            raise HopFailed(self.peer_id, str(exc), "peer_lost") from None
        except asyncio.TimeoutError:
            self._pending.pop(key, None)
            raise HopFailed(self.peer_id, f"no answer within {timeout_s * 1000:.0f} ms", "deadline", permanent=False) from None
        wall = (time.perf_counter() - t0) * 1000.0
        if reply.type == MsgType.ERROR:
            code, message = parse_error(reply)
            raise HopFailed(self.peer_id, message, code)
        return Reply(reply, wall)

    def expect(self, key: tuple[bytes, int]) -> asyncio.Future:
        """A future for a reply that another peer's frame will cause (chain mode)."""
        fut = asyncio.get_running_loop().create_future()
        if self._lost is not None:
            fut.set_exception(HopFailed(self.peer_id, self._lost, "peer_lost"))
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
        frame = Frame.from_bytes(MsgType.CONTROL, json.dumps({"op": "info"}).encode(), request_id=b"\x00" * 16, seq=self.next_seq())
        reply = await self.request(frame, timeout_s)
        self.rtt_ms = reply.wall_ms if self.rtt_ms is None else min(self.rtt_ms, reply.wall_ms)
        try:
            info = json.loads(bytes(reply.frame.payload).decode("utf-8"))
        except (ValueError, RecursionError) as exc:
            raise HopFailed(self.peer_id, f"malformed info reply: {exc!r}", "bad_reply") from None
        if not isinstance(info, dict):
            raise HopFailed(self.peer_id, "malformed info reply", "bad_reply")
        return info

    async def close(self) -> None:
        self._reader.cancel()
        try:
            await self.channel.close()
        except Exception:  # noqa: BLE001 - closing a dead channel
            pass
