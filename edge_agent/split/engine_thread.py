"""One long-lived thread per engine that runs its calls for the event loop.

Why not ``asyncio.to_thread``: every call there goes through the default executor (a work
item, a ``concurrent.futures.Future``, a copied context, and a second future chained back
to the loop), may land on a different pool thread each time (a new OpenMP team for
llama.cpp), and wakes the loop twice on the way back. A decode step of a shard takes
~1-15 ms, so those hand-offs are a visible part of a hop (docs/benchmarks.md, hop
overhead). Here the loop puts (function, arguments, future) on a queue the thread blocks
on, and the thread settles the asyncio future with one ``call_soon_threadsafe``. Calls run
one at a time, in order: an engine serialises its calls anyway.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from typing import Any, Callable


class EngineThread:
    def __init__(self, name: str) -> None:
        self._calls: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)`` on the thread; its result or exception here. Cancelling the wait does
        not stop a call already running (as with ``to_thread``): its result is dropped."""
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._calls.put((loop, fut, fn, args))
        return await fut

    def close(self) -> None:
        """The thread ends after the calls already queued."""
        self._calls.put(None)

    def _serve(self) -> None:
        while (call := self._calls.get()) is not None:
            loop, fut, fn, args = call
            try:
                outcome = (fn(*args), None)
            except BaseException as exc:  # noqa: BLE001 - handed to the waiter, whatever it is
                outcome = (None, exc)
            try:
                loop.call_soon_threadsafe(_settle, fut, *outcome)
            except RuntimeError:  # the loop is closed: nobody is waiting
                pass
            del call, fut, outcome  # drop references while blocked on the next call


def _settle(fut: asyncio.Future, result: Any, exc: BaseException | None) -> None:
    if fut.done():  # the waiter was cancelled
        return
    if exc is not None:
        fut.set_exception(exc)
    else:
        fut.set_result(result)
