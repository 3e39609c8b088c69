"""A node facing a hostile or broken peer over a real TLS channel: errors, never a dead node."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest

from edge_agent.discovery.identity import Identity, SwarmKey
from edge_agent.runtime.engine import EngineOptions
from edge_agent.runtime.llamacpp import LlamaCppEngine
from edge_agent.split.links import PeerLink
from edge_agent.split.protocol import HopFailed, parse_error
from edge_agent.split.serve import HopServer
from edge_agent.transport import DType, Flag, Frame, MsgType, tls

RID = b"q" * 16


def act(link, x, step=0, start=1, end=4, rid=RID, flags=0):
    return Frame.from_array(MsgType.ACTIVATION, x, request_id=rid, step=step, n_positions=x.shape[0], layer_start=start,
                            layer_end=end, seq=link.next_seq(), flags=flags)


def control(link, body: bytes):
    return Frame.from_bytes(MsgType.CONTROL, body, seq=link.next_seq())


async def with_node(tiny_model, body, cache_dir):
    from edge_agent.split.weights import WeightSource

    ident, swarm = Identity.generate(), SwarmKey.from_secret(None)
    engine = LlamaCppEngine.from_model(tiny_model, 1, 4, EngineOptions(n_ctx_per_request=64, max_requests=2))
    # chain supported (connect), but the routes below are refused before any use
    server = HopServer([engine], ident.agent_id, connect=lambda *a: None, weights=WeightSource(tiny_model, cache_dir))
    await server.start()
    srv = await tls.listen(ident, swarm, "127.0.0.1", 0, server.handle)
    links = [PeerLink(ident.agent_id, await tls.connect(Identity.generate(), swarm, "127.0.0.1", srv.port)) for _ in range(2)]
    try:
        return await body(links)
    finally:
        for link in links:
            await link.close()
        srv.close()
        await server.stop()
        engine.close()


def test_hostile_frames_get_errors_and_the_node_keeps_serving(tiny_model, tmp_path):
    x = np.zeros((2, 64), dtype=np.float32)

    async def body(links):
        a, b = links
        codes = []
        for frame in (
            control(a, b"[" * 60000),  # deeply nested JSON
            control(a, json.dumps({"op": "route", "request": "ab" * 16, "next": {"peer_id": 5, "host": "h", "port": "x",
                                                                                "start": "a", "end": None}}).encode()),
            control(a, json.dumps({"weights": {"op": "chunk", "start": 1e309}}).encode()),
            act(a, np.zeros((2, 63), dtype=np.float32)),  # wrong hidden size
            act(a, np.zeros((100, 64), dtype=np.float32)),  # longer than the context
            act(a, x, start=7, end=9),  # layers not served
            act(a, x.astype(np.float16)),  # f16 would change the arithmetic
            act(a, x, step=5, rid=b"z" * 16),  # unknown request, not at position 0
        ):
            with pytest.raises(HopFailed) as err:
                await a.request(frame, 10)
            codes.append(err.value.code)
        # the same node still computes, for this peer and another one
        ok = await a.request(act(a, x), 10)
        assert ok.frame.dtype == DType.F32 and ok.frame.array().shape == (2, 64)
        ok_b = await b.request(act(b, x, rid=b"w" * 16), 10)
        # a peer that did not send a request's work cannot end it, nor rewind it (speculative steps)
        await b.send(Frame(MsgType.END_REQUEST, request_id=RID))
        rewinds = int(Flag.REWIND | Flag.DRAFT)
        for sender, frame in ((b, act(b, x[:1], step=0, flags=rewinds)),  # another peer's rewind
                              (a, act(a, np.zeros((17, 64), np.float32), step=2, flags=rewinds))):  # a draft of 17 rows
            with pytest.raises(HopFailed) as err:
                await sender.request(frame, 10)
            codes.append(err.value.code)
        again = await a.request(act(a, x[:1], step=2), 10)
        # the owner may: drop position 2, draft again from there
        redo = await a.request(act(a, x, step=2, flags=rewinds), 10)
        return codes, ok_b, again, redo

    codes, ok_b, again, redo = asyncio.run(with_node(tiny_model, body, tmp_path))
    assert codes[-2:] == ["bad_frame", "InputShapeError"]
    assert redo.frame.step == 2 and redo.frame.array().shape == (2, 64)
    codes = codes[:-2]
    assert codes == ["bad_control", "bad_route", "weights", "InputShapeError", "InputShapeError", "no_shard",
                     "bad_dtype", "UnknownRequestError"]
    assert ok_b.frame.array().shape == (2, 64) and again.frame.step == 2


def test_parse_error_tolerates_junk():
    assert parse_error(Frame.from_bytes(MsgType.ERROR, b"[" * 60000))[0] == "error"
    assert parse_error(Frame.from_bytes(MsgType.ERROR, b"\xff\xfe"))[0] == "error"
