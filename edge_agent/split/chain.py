"""Chain mode: the client sends the first hop's input; each hop forwards to the next.

The client registers a route on every hop (``CONTROL route``), then per step sends one
frame to the first hop and waits for the answer on the last hop's link, or an error on
any hop's link. It sees no middle activations, so after a failure it rebuilds every hop
from the first hop's inputs and runs that step in star mode; the chain resumes on the
next step. Deadlines are not tracked per hop here (the client sees only the total).
"""

from __future__ import annotations

import asyncio
import time

import numpy as np

from edge_agent.runtime.engine import ContextFullError
from edge_agent.split.observe import HopRecord, digest
from edge_agent.split.protocol import ErrorCode, HopFailed, activation, check_reply, control_frame, parse_error, route_message
from edge_agent.split.strategy import RequestState, Router, Strategy, is_refusal, step_timeout
from edge_agent.transport import Flag, FrameError, MsgType, PeerLostError


class ChainStrategy(Strategy):
    def __init__(self, router: Router, address, fallback: Strategy, *, hop_timeout_s: float, prefill_timeout_s: float):
        super().__init__(router)
        self.address = address  # peer_id -> (host, port) of its TLS listener (where a hop forwards to)
        self.fallback = fallback  # star: runs the step that failed, after the rebuild
        self.hop_timeout_s, self.prefill_timeout_s = hop_timeout_s, prefill_timeout_s

    async def _set_routes(self, req: RequestState) -> None:
        for i, hs in enumerate(req.hops):
            nxt = None
            if i + 1 < len(req.hops):
                h = req.hops[i + 1].hop
                host, port = self.address(h.peer_id)
                nxt = {"peer_id": h.peer_id, "host": host, "port": port, "start": h.start, "end": h.end}
            await hs.link.request(control_frame(route_message(req.rid, nxt), hs.link.next_seq()), self.hop_timeout_s)
        req.routed = True

    async def step(self, req: RequestState, pos: int, x: np.ndarray, flags: int = 0) -> np.ndarray:
        first, last = req.hops[0], req.hops[-1]
        seq = first.link.next_seq()
        key = (req.rid, seq)
        futs = {hs.link.peer_id: hs.link.expect(key) for hs in req.hops}
        frame = activation(req.rid, pos, x, first.hop.start, first.hop.end, seq, int(Flag.CHAIN) | flags)
        timeout = step_timeout(x.shape[0], flags, self.hop_timeout_s, self.prefill_timeout_s)
        t0 = time.perf_counter()
        blamed, reason, refused = None, "chain step timed out", False
        try:
            if not req.routed:
                await self._set_routes(req)
            await first.link.post(frame)
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
                    if code == ErrorCode.CONTEXT_FULL:
                        raise ContextFullError(f"the request outgrew the context of the peers: {message}")
                    idx = next(i for i, h in enumerate(req.hops) if h.link.peer_id == peer_id)
                    if code == ErrorCode.NEXT_HOP_UNREACHABLE and idx + 1 < len(req.hops):
                        idx += 1
                    blamed, reason, refused = req.hops[idx].hop.peer_id, f"{code}: {message}", code == ErrorCode.CAPACITY
                    break
                if peer_id != last.link.peer_id:
                    blamed, reason = peer_id, "chain reply from a hop that is not the last"
                    break
                out = check_reply(peer_id, f, pos, last.hop.start, last.hop.end, x.shape)
                first.history.append((pos, x, flags))
                req.histories_complete = len(req.hops) == 1
                wall_ms = (time.perf_counter() - t0) * 1000.0
                req.chain_ms += wall_ms
                if self.router.observers.callbacks:
                    self._observe(req, len(req.hops), pos, x, flags, wall_ms, f, out)
                return out
        except HopFailed as exc:
            blamed, reason, refused = exc.peer_id, f"{exc.code}: {exc.reason}", is_refusal(exc)
        except (PeerLostError, FrameError) as exc:
            blamed, reason = first.hop.peer_id, f"peer_lost: {exc}"
        finally:
            for hs in req.hops:
                hs.link.forget(key)
        if blamed:
            if not refused:  # a refusal costs the peer a cooldown only (Router.recover, SlotWait)
                req.excluded.add(blamed)
            if self.router.observers.callbacks:  # the hops before the blamed one computed this step too
                ran = next((i for i, h in enumerate(req.hops) if h.hop.peer_id == blamed), 0)
                self._observe(req, ran, pos, x, flags, (time.perf_counter() - t0) * 1000.0)
        await self.rebuild(req, reason, pos, blamed or "", refused)
        return await self.fallback.step(req, pos, x, flags)  # this step in star mode; chain resumes next step

    def _observe(self, req: RequestState, ran: int, pos: int, x: np.ndarray, flags: int, wall_ms: float, reply=None,
                 out: np.ndarray | None = None) -> None:
        """One client HopRecord (flagged CHAIN) per hop that ran a chain step, the first ``ran``:
        hop 0's input and the last hop's ``reply`` are what this device sent and received; what it
        never saw has an empty digest and no rows. The ledger checks what is known; the auditor
        recomputes the rest. A failed step is recorded for the hops before the blamed one: they
        computed it, and their commitments count it."""
        for i, hs in enumerate(req.hops[:ran]):
            first, last = i == 0, reply is not None and i == len(req.hops) - 1
            self.router.observers.emit(HopRecord(
                "client", req.rid.hex(), hs.link.peer_id, hs.hop.start, hs.hop.end, pos, x.shape[0],
                digest(x.tobytes()) if first else b"", digest(reply.payload) if last else b"",
                reply.compute_us / 1000.0 if last else 0.0, wall_ms, flags=flags | int(Flag.CHAIN),
                input=x if first else None, output=out if last else None))
