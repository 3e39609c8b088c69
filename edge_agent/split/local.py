"""Local fallback: the client runs a hop's layers itself when no peer can (or may) take them.

``LocalLink`` answers hop requests with an in-process engine, through the same
request/reply interface as ``PeerLink``, so the client's routing, replay and stats treat
"this device" as one more peer.
"""

from __future__ import annotations

import asyncio
import time

from edge_agent.runtime.engine import EngineError, StepInput
from edge_agent.split.links import Reply
from edge_agent.split.protocol import HopFailed, engine_error_code
from edge_agent.transport import Flag, Frame, MsgType

LOCAL_PEER_ID = "local"


class LocalLink:
    peer_id = LOCAL_PEER_ID
    alive = True
    rtt_ms = 0.0

    def __init__(self, load_engine):
        self._load = load_engine  # (start, end) -> Engine
        self._engines: dict[tuple[int, int], object] = {}
        self._seq = 0

    def next_seq(self) -> int:
        self._seq += 1
        return self._seq

    async def request(self, frame: Frame, timeout_s: float | None) -> Reply:
        key = (frame.layer_start, frame.layer_end)
        t0 = time.perf_counter()
        try:
            engine = self._engines.get(key)
            if engine is None:
                engine = self._engines[key] = await asyncio.to_thread(self._load, *key)
            step = StepInput(frame.request_id.hex(), frame.step, frame.array(), rewind=bool(frame.flags & Flag.REWIND),
                             draft=bool(frame.flags & Flag.DRAFT))
            out = (await asyncio.to_thread(engine.forward, [step]))[0]
        except EngineError as exc:
            raise HopFailed(LOCAL_PEER_ID, str(exc), engine_error_code(exc)) from None
        reply = Frame.from_array(MsgType.ACTIVATION, out.data, request_id=frame.request_id, step=frame.step,
                                 n_positions=frame.n_positions, layer_start=frame.layer_start, layer_end=frame.layer_end,
                                 seq=frame.seq, compute_us=int(out.compute_ms * 1000))
        return Reply(reply, (time.perf_counter() - t0) * 1000.0)

    async def send(self, frame: Frame) -> None:
        if frame.type == MsgType.END_REQUEST:
            for engine in self._engines.values():
                engine.end_request(frame.request_id.hex())

    def close(self) -> None:
        for engine in self._engines.values():
            engine.close()
        self._engines.clear()
