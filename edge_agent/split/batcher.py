"""The client's own layers, batched across concurrent requests.

Each request of a ``SwarmClient`` runs its head (embedding + first layers) and tail (last
layers, LM head) on this device once per token. Run one at a time, N concurrent requests
cost N engine calls and N thread hand-offs per token round; batched, the requests waiting
at the same moment share one ``engine.forward`` (one llama_decode: the weights are read
once for all of them), as the hop servers batch their shards (``split/serve.py``).

No waiting window: the first step to arrive runs at once, and whatever arrives while an
engine call is in flight goes into the next one. The engine runs no more rows per decode
than it measured bit-identical to single rows (``runtime/exactness.py``; each request keeps
its own KV stream), so outputs do not change. Engine calls run on one long-lived thread
per engine (``engine_thread.EngineThread``), not through ``asyncio.to_thread``.
"""

from __future__ import annotations

import asyncio

import numpy as np

from edge_agent.runtime.engine import EngineError, StepInput
from edge_agent.split.engine_thread import EngineThread


class StepBatcher:
    """``await forward(step)`` -> that step's output rows; concurrent callers share engine calls."""

    def __init__(self, engine) -> None:
        self.engine = engine
        self._thread = EngineThread(f"engine-{engine.info.start}-{engine.info.end}")  # cheaper than to_thread per call
        self._pending: list[tuple[StepInput, asyncio.Future]] = []
        self._runner: asyncio.Task | None = None
        self.calls = 0  # engine calls made (telemetry: steps / calls is the mean batch)
        self.steps = 0

    async def forward(self, step: StepInput) -> np.ndarray:
        fut = asyncio.get_running_loop().create_future()
        self._pending.append((step, fut))
        if self._runner is None or self._runner.done():
            self._runner = asyncio.create_task(self._run())
        return await fut

    async def _run(self) -> None:
        while self._pending:
            batch, self._pending = self._pending, []
            self.calls += 1
            self.steps += len(batch)
            try:
                outs = await self._thread.run(self.engine.forward, [s for s, _ in batch])
                results = [(o.data, None) for o in outs]
            except EngineError:  # isolate the bad step: the others still get their answer
                results = [await self._alone(s) for s, _ in batch]
            except Exception as exc:  # noqa: BLE001 - an engine bug: every waiter hears of it
                results = [(None, exc)] * len(batch)
            for (_, fut), (data, exc) in zip(batch, results):
                if fut.done():  # its request was cancelled meanwhile
                    continue
                if exc is not None:
                    fut.set_exception(exc)
                else:
                    fut.set_result(data)

    def close(self) -> None:
        self._thread.close()

    async def _alone(self, step: StepInput) -> tuple[np.ndarray | None, Exception | None]:
        try:
            return (await self._thread.run(self.engine.forward, [step]))[0].data, None
        except Exception as exc:  # noqa: BLE001 - handed to that step's waiter
            return None, exc
