"""split.engine_thread.EngineThread: results, exceptions and order come back to the loop."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from edge_agent.split.engine_thread import EngineThread


async def _run_calls() -> None:
    worker = EngineThread("test")
    try:
        names = await asyncio.gather(*(worker.run(lambda i=i: (i, threading.current_thread().name)) for i in range(20)))
        assert [i for i, _ in names] == list(range(20))
        assert {name for _, name in names} == {"test"}  # one long-lived thread, not a pool
        with pytest.raises(ZeroDivisionError):
            await worker.run(lambda: 1 / 0)
        slow = asyncio.ensure_future(worker.run(time.sleep, 0.2))
        await asyncio.sleep(0.05)
        slow.cancel()  # the waiter goes; the call finishes on the thread and its result is dropped
        assert await worker.run(sum, [1, 2, 3]) == 6
    finally:
        worker.close()
    worker._thread.join(5)
    assert not worker._thread.is_alive()


def test_engine_thread_runs_calls_in_order_on_one_thread():
    asyncio.run(_run_calls())
