"""Background sync with the peers of our swarm, and the one object node.py wires.

``Ledger`` bundles what an agent needs: the store, the service that answers peers (sync,
and commitments/receipts when it serves hops), the recorders, and a background task that
syncs with one known peer every ``interval_s`` (peers are taken in turn; a failing peer
is only logged). Syncs use their own TLS connection, so they never share a channel's
reader with the inference plane.
"""

from __future__ import annotations

import asyncio
import logging
import random
from pathlib import Path
from typing import Callable

from edge_agent.ledger.recorder import ClientRecorder, NodeRecorder
from edge_agent.ledger.service import LedgerService, sync_peer
from edge_agent.ledger.store import LedgerStore
from edge_agent.ledger.sync import SyncError

log = logging.getLogger(__name__)
SYNC_INTERVAL_S = 30.0
SYNC_TIMEOUT_S = 120.0
FINISH_TIMEOUT_S = 10.0  # a client closing waits at most this per step for a hung peer


class Ledger:
    def __init__(self, store: LedgerStore, identity, swarm) -> None:
        self.store = store
        self.identity = identity
        self.swarm = swarm
        self.service = LedgerService(store)
        self.syncs = 0
        self._task: asyncio.Task | None = None

    @classmethod
    def open(cls, data_dir: Path, identity, swarm, max_mb: float | None = None) -> "Ledger":
        return cls(LedgerStore.open(data_dir, max_mb), identity, swarm)

    def node_recorder(self, shard_hashes: Callable[[int, int], tuple[str, str]]) -> NodeRecorder:
        """Sign commitments for the hops this agent serves (and countersign their receipts)."""
        rec = NodeRecorder(self.identity, self.store, shard_hashes)
        self.service.node_recorder = rec
        return rec

    def client_recorder(self, model_hash: str, n_embd: int) -> ClientRecorder:
        return ClientRecorder(self.identity, self.store, model_hash, bytes_per_position=4 * n_embd)

    @staticmethod
    def requester_via(link: Callable, timeout_s: float = 10.0) -> Callable:
        """``request_for`` for the client recorder: ledger messages over the hop's own link
        (``link(peer_id)`` -> PeerLink); None for this device's own fallback hop."""
        from edge_agent.split.local import LOCAL_PEER_ID
        from edge_agent.transport import Frame, MsgType

        async def request_for(peer_id: str):
            if peer_id == LOCAL_PEER_ID:
                return None
            peer = await link(peer_id)

            async def request(payload: bytes) -> bytes:
                reply = await peer.request(Frame.from_bytes(MsgType.CONTROL, payload, seq=peer.next_seq()), timeout_s)
                return bytes(reply.frame.payload)

            return request

        return request_for

    def start_sync(self, peers: Callable[[], list[tuple[str, str, int]]], interval_s: float = SYNC_INTERVAL_S) -> None:
        """Sync in the background with ``peers()`` -> [(agent_id, host, tls_port)], one per interval."""
        if self._task is None:
            self._task = asyncio.create_task(self._sync_loop(peers, interval_s))

    async def sync_once(self, agent_id: str, host: str, port: int, timeout_s: float = SYNC_TIMEOUT_S) -> None:
        try:
            report = await asyncio.wait_for(sync_peer(self.identity, self.swarm, host, port, self.store, agent_id), timeout_s)
            self.syncs += 1
            log.info("ledger sync with %s: %s", agent_id[:12], report.to_dict())
        except (SyncError, OSError, asyncio.TimeoutError, ConnectionError) as exc:
            log.info("ledger sync with %s failed: %s", agent_id[:12], exc)
        except Exception as exc:  # noqa: BLE001 - transport errors of any kind: try another peer next time
            log.info("ledger sync with %s failed: %r", agent_id[:12], exc)

    async def finish_client(self, recorder: ClientRecorder, address: Callable[[str], tuple[str, int]]) -> None:
        """End of a client's session: finish its receipts, then push them to every peer that worked
        for it (so a short ``run`` leaves the same receipts in every ledger of its path)."""
        await recorder.drain(FINISH_TIMEOUT_S)
        for peer_id in sorted(recorder.peers):
            try:
                host, port = address(peer_id)
            except Exception:  # noqa: BLE001 - this device's own hop, or a peer that left: nothing to push to
                continue
            await self.sync_once(peer_id, host, port, FINISH_TIMEOUT_S)

    async def _sync_loop(self, peers, interval_s: float) -> None:
        turn = 0
        while True:
            await asyncio.sleep(interval_s * random.uniform(0.5, 1.0))  # jitter: peers do not sync in lockstep
            known = sorted(peers())
            if known:
                await self.sync_once(*known[turn % len(known)])
                turn += 1

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        await asyncio.to_thread(self.store.close)
