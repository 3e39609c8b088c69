"""The ledger on the wire: answer ledger messages from peers, and ask peers over a channel.

``LedgerService.handle`` is what a listener calls for a CONTROL frame whose payload is a
ledger message (``wire.is_ledger_message``); it never raises, a bad message gets an
ERROR reply with the reason. ``ChannelRequester`` is the asking side over a channel we own
(one reader task matches replies by seq, so pull and push can run at once).
"""

from __future__ import annotations

import asyncio
import itertools
import logging

from edge_agent.ledger import wire
from edge_agent.ledger.encoding import EncodingError
from edge_agent.ledger.store import LedgerStore
from edge_agent.ledger.signed_sync import ingest_bonds, ingest_evidence, recent_bonds, recent_evidence
from edge_agent.ledger.sync import Budget, SyncReport, SyncResponder, sync_with
from edge_agent.ledger.wire import Msg
from edge_agent.transport import Frame, MsgType, PeerLostError

log = logging.getLogger(__name__)
REQUEST_TIMEOUT_S = 60.0


class LedgerService:
    def __init__(self, store: LedgerStore, node_recorder=None, budget: Budget | None = None) -> None:
        self.store = store
        self.sync = SyncResponder(store, budget)
        self.node_recorder = node_recorder  # answers COMMITS_GET / RECEIPT_SIGN when this agent serves hops

    @staticmethod
    def accepts(payload: bytes) -> bool:
        """Is this CONTROL payload ours (the hop server asks before its JSON control messages)?"""
        return wire.is_ledger_message(payload)

    async def handle(self, payload: bytes, peer_id: str) -> bytes:
        try:
            kind, r = wire.unpack(payload)
            if kind in (Msg.COMMITS_GET, Msg.RECEIPT_SIGN):
                if self.node_recorder is None:
                    return wire.error("this agent serves no hops")
                return await self.node_recorder.handle(kind, r, peer_id)
            if kind == Msg.EVIDENCE:  # gossip: store what verifies, answer with ours
                await ingest_evidence(self.store, wire.read_evidence(r))
                return wire.evidence(await asyncio.to_thread(recent_evidence, self.store))
            if kind == Msg.BONDS:
                await ingest_bonds(self.store, wire.read_bonds(r))
                return wire.bonds(await asyncio.to_thread(recent_bonds, self.store))
            return await self.sync.handle(kind, r, peer_id)
        except EncodingError as exc:
            return wire.error(f"malformed: {exc.reason}")
        except Exception as exc:  # noqa: BLE001 - a peer's message must never take the agent down
            log.warning("ledger message from %s failed: %r", peer_id[:12], exc)
            return wire.error(f"internal error: {type(exc).__name__}")

    async def reply_to(self, channel, frame: Frame) -> None:
        """Answer one CONTROL frame on ``channel`` (same request id and seq)."""
        payload = await self.handle(bytes(frame.payload), getattr(channel, "peer_id", ""))
        try:
            await channel.send(Frame.from_bytes(MsgType.CONTROL, payload, request_id=frame.request_id, seq=frame.seq))
        except PeerLostError:
            pass

    async def serve_channel(self, channel) -> None:
        """A read loop for a channel that carries only ledger traffic."""
        while True:
            try:
                frame = await channel.recv()
            except PeerLostError:
                return
            if frame.type == MsgType.CONTROL:
                await self.reply_to(channel, frame)


class ChannelRequester:
    """Request/reply of ledger messages over a channel whose reads we own."""

    def __init__(self, channel, timeout_s: float = REQUEST_TIMEOUT_S) -> None:
        self.channel = channel
        self.timeout_s = timeout_s
        self._seq = itertools.count(1)
        self._pending: dict[int, asyncio.Future] = {}
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        try:
            while True:
                frame = await self.channel.recv()
                fut = self._pending.pop(frame.seq, None)
                if fut is not None and not fut.done():
                    fut.set_result(frame)
        except (PeerLostError, asyncio.CancelledError) as exc:
            for fut in self._pending.values():
                if not fut.done():
                    fut.set_exception(PeerLostError(f"ledger peer lost: {exc!r}"))

    async def __call__(self, payload: bytes) -> bytes:
        seq = next(self._seq)
        fut = asyncio.get_running_loop().create_future()
        self._pending[seq] = fut
        await self.channel.send(Frame.from_bytes(MsgType.CONTROL, payload, seq=seq))
        frame = await asyncio.wait_for(fut, self.timeout_s)
        if frame.type == MsgType.ERROR:
            return wire.error(bytes(frame.payload[:1000]).decode("utf-8", "replace"))
        return bytes(frame.payload)

    def close(self) -> None:
        self._reader.cancel()


async def sync_over(channel, store: LedgerStore) -> SyncReport:
    requester = ChannelRequester(channel)
    try:
        return await sync_with(requester, store)
    finally:
        requester.close()


async def sync_peer(identity, swarm, host: str, port: int, store: LedgerStore, expect_peer_id: str | None = None) -> SyncReport:
    """Open our own TLS channel to a peer, sync, close it."""
    from edge_agent.transport import tls

    channel = await tls.connect(identity, swarm, host, port, expect_peer_id=expect_peer_id)
    try:
        return await sync_over(channel, store)
    finally:
        await channel.close()


async def serve_ledger(identity, swarm, host: str, port: int, store: LedgerStore, on_ready=None) -> None:
    """Listen on TLS for ledger traffic only, until SIGTERM or SIGINT."""
    import signal

    from edge_agent.transport import tls

    service = LedgerService(store)
    server = await tls.listen(identity, swarm, host, port, service.serve_channel)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if on_ready:
        on_ready({"agent_id": identity.agent_id, "tls_port": server.port})
    try:
        await stop.wait()
    finally:
        await server.close()
