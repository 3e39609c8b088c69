"""Chain mode: the client sends the first hop's input; each hop forwards to the next.

The client registers a route on every hop (``CONTROL route``), then per step sends one
frame to the first hop and waits for the answer on the last hop's link, or an error on
any hop's link. It sees no middle activations, so after a failure it rebuilds every hop
from the first hop's inputs (``SwarmClient.rebuild_all``) and runs that step in star mode.
Deadlines are not tracked per hop here (the client sees only the total).
"""

from __future__ import annotations

import asyncio
import json
import time

import numpy as np

from edge_agent.split.links import HopFailed
from edge_agent.split.serve import parse_error
from edge_agent.transport import DType, Flag, Frame, FrameError, MsgType, PeerLostError


async def set_routes(client, req) -> None:
    for i, hs in enumerate(req.hops):
        nxt = None
        if i + 1 < len(req.hops):
            h = req.hops[i + 1].hop
            host, port = client.peers.address(h.peer_id)
            nxt = {"peer_id": h.peer_id, "host": host, "port": port, "start": h.start, "end": h.end}
        body = json.dumps({"op": "route", "request": req.rid.hex(), "next": nxt}).encode()
        await hs.link.request(Frame.from_bytes(MsgType.CONTROL, body, seq=hs.link.next_seq()), 10.0)
    req.routed = True

async def remote_chain(client, req, pos: int, x: np.ndarray) -> np.ndarray:
    """Chain mode: send to the first hop; each hop forwards; the last answers us."""
    first, last = req.hops[0], req.hops[-1]
    seq = first.link.next_seq()
    key = (req.rid, seq)
    futs = {hs.link.peer_id: hs.link.expect(key) for hs in req.hops}
    flags = Flag.CHAIN | (Flag.PREFILL if x.shape[0] > 1 else 0)
    frame = Frame.from_array(MsgType.ACTIVATION, x, request_id=req.rid, step=pos, n_positions=x.shape[0],
                             layer_start=first.hop.start, layer_end=first.hop.end, seq=seq, flags=int(flags))
    timeout = client.config.prefill_timeout_s if x.shape[0] > 1 else max(client.config.hop_timeout_s, req.plan.budget_ms / 1000)
    t0 = time.perf_counter()
    blamed, reason = None, "chain step timed out"
    try:
        if not req.routed:
            await set_routes(client, req)
        await first.link.channel.send(frame)
        done, _ = await asyncio.wait(futs.values(), timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        for peer_id, fut in futs.items():
            if fut not in done:
                continue
            if fut.exception() is not None:
                blamed, reason = peer_id, str(fut.exception())
                break
            f = fut.result()
            if f.type == MsgType.ERROR:
                code, message = parse_error(f)
                idx = next(i for i, h in enumerate(req.hops) if h.link.peer_id == peer_id)
                if code == "next_hop_unreachable" and idx + 1 < len(req.hops):
                    idx += 1
                blamed, reason = req.hops[idx].hop.peer_id, f"{code}: {message}"
                break
            out = f.array()
            if peer_id == last.link.peer_id and (f.layer_start, f.layer_end) == (last.hop.start, last.hop.end) \
                    and f.dtype == DType.F32 and f.step == pos and out.shape == x.shape and np.isfinite(out).all():
                first.history.append((pos, x))
                req.histories_complete = len(req.hops) == 1
                req.chain_ms += (time.perf_counter() - t0) * 1000.0
                return np.array(out)
            blamed, reason = peer_id, "chain reply does not match the request"
    except HopFailed as exc:
        blamed, reason = exc.peer_id, f"{exc.code}: {exc.reason}"
    except (PeerLostError, FrameError) as exc:
        blamed, reason = first.hop.peer_id, f"peer_lost: {exc}"
    finally:
        for hs in req.hops:
            hs.link.forget(key)
    if blamed:
        req.excluded.add(blamed)
    await client.rebuild_all(req, reason, pos, blamed or "")
    return await client.run_star(req, pos, x)  # this step in star mode; chain resumes next step

