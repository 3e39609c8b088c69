"""This device's KV slots, shared by running requests and conversations kept for their next turn.

A finished request can stay alive (its KV on this device and on every hop) so that the
next turn of the same chat, whose prompt extends the tokens already computed, computes
only its new tokens (``split.client.KeptRequest``). A kept request holds one slot; at most
``max_kept`` are kept (the oldest goes first). A request that finds no free slot takes the
oldest kept one's; a kept request idle for ``keep_s`` is released (peers free idle KV after their own, longer, ``--idle-timeout``; were one to
free it earlier, the client rebuilds that hop by replay and the output does not change).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Protocol, Sequence

log = logging.getLogger(__name__)


class Kept(Protocol):
    tokens: list[int]

    def extended_by(self, prompt: Sequence[int]) -> bool: ...


class Conversations:
    def __init__(self, release, slots: int, keep_s: float = 300.0, max_kept: int | None = None):
        self._release_request = release  # async (kept) -> None: end it on this device and every hop
        self._free = asyncio.Semaphore(slots)
        # kept KV also takes slots on the peers, which serve other clients too: keep at most half of ours
        self.max_kept = max(1, slots // 2) if max_kept is None else max_kept
        self._kept: list[tuple[float, Kept]] = []  # (kept at, request), oldest first
        self._waiting = 0
        self.keep_s = keep_s

    def __len__(self) -> int:
        return len(self._kept)

    async def acquire(self, prompt: Sequence[int]) -> Kept | None:
        """A slot for a request: the kept request its prompt extends (with that one's slot), or a free slot."""
        await self._expire()
        matches = [i for i, (_, k) in enumerate(self._kept) if k.extended_by(prompt)]
        if matches:
            best = max(matches, key=lambda i: len(self._kept[i][1].tokens))
            return self._kept.pop(best)[1]
        self._waiting += 1
        try:
            while self._free.locked() and self._kept:
                await self._release(self._kept.pop(0)[1])
            await self._free.acquire()
        finally:
            self._waiting -= 1
        return None

    async def done(self, kept: Kept | None) -> None:
        """A request ended. ``kept``: it stays alive for a next turn, unless a request waits for its slot."""
        if kept is not None and not self._waiting and self.max_kept > 0:
            while len(self._kept) >= self.max_kept:
                await self._release(self._kept.pop(0)[1])
            self._kept.append((time.monotonic(), kept))
        elif kept is not None:
            await self._release(kept)
        else:
            self._free.release()

    async def close(self) -> None:
        while self._kept:
            await self._release(self._kept.pop()[1])

    async def _expire(self) -> None:
        now = time.monotonic()
        while self._kept and now - self._kept[0][0] > self.keep_s:
            await self._release(self._kept.pop(0)[1])

    async def _release(self, kept: Kept) -> None:
        try:
            await self._release_request(kept)
        except Exception as exc:  # noqa: BLE001 - a lost peer frees the KV by itself (idle timeout)
            log.info("releasing a kept conversation: %s", exc)
        finally:
            self._free.release()
