"""One background loop for the discovery services: a step, a pause, again, until closed.

The peer table's upkeep (peers.py), gossip rounds (membership.py) and DHT rounds (dht.py)
all run this way, so start, close and what a failing step does are decided once, here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Awaitable, Callable


class Periodic:
    """Runs `step()` in a background task, sleeping `pause()` seconds after each, until `close`.

    `pause` is asked again after every step, so a caller's jitter (no two members in
    lockstep) or a changed interval takes effect at once.  A step that raises is logged on
    `log` as "<what> failed" and the loop goes on: a bug or a stall in one step must not end
    the service.  Only cancellation (`close`) ends it.
    """

    def __init__(self, step: Callable[[], Awaitable[None]], pause: Callable[[], float], *,
                 log: logging.Logger, what: str) -> None:
        self._step, self._pause = step, pause
        self._log, self._what = log, what
        self._task: asyncio.Task[None] | None = None

    @property
    def running(self) -> bool:
        return self._task is not None

    def start(self) -> None:
        """Start the loop on the running event loop; a no-op while it runs."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def close(self) -> None:
        """Cancel the loop and wait for it to end (a later `start` begins a new one)."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        while True:
            try:
                await self._step()
            except Exception:  # noqa: BLE001 - CancelledError is no Exception: close still ends the loop
                self._log.exception("%s failed", self._what)
            await asyncio.sleep(self._pause())
