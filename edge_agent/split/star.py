"""Star mode: the client sends each hop its input and waits for its output, hop by hop.

It keeps every input it sent, per hop, so any one hop can be rebuilt alone, and it sees
each hop's time, so it tracks per-hop deadlines: after a decode step a hop that ran late
(``split/deadlines.py``) loses its place on this request's path when another peer could
take its layers.
"""

from __future__ import annotations

import numpy as np

from edge_agent.runtime.engine import ContextFullError
from edge_agent.split.planner import has_alternative
from edge_agent.split.protocol import ErrorCode, HopFailed
from edge_agent.split.strategy import RequestState, Router, Strategy, is_refusal, step_timeout


class StarStrategy(Strategy):
    def __init__(self, router: Router, capabilities, *, hop_timeout_s: float, prefill_timeout_s: float):
        super().__init__(router)
        self.capabilities = capabilities  # (policy) -> [PeerCapability]: who could replace a late hop
        self.hop_timeout_s, self.prefill_timeout_s = hop_timeout_s, prefill_timeout_s

    async def step(self, req: RequestState, pos: int, x: np.ndarray, flags: int = 0) -> np.ndarray:
        decode = x.shape[0] == 1
        # a silent hop is replaced after hop_timeout_s; a merely late one after the step (deadlines)
        timeout = step_timeout(x.shape[0], flags, self.hop_timeout_s, self.prefill_timeout_s)
        x0, observed, i = x, [], 0
        while i < len(req.hops):
            hs = req.hops[i]
            try:
                y, compute_ms, wall_ms = await self.router.call(req, hs, pos, x, timeout, flags=flags)
            except HopFailed as exc:
                if exc.code == ErrorCode.CONTEXT_FULL:  # no other peer has a bigger context to offer
                    raise ContextFullError(f"the request outgrew the context of the peers: {exc.reason}") from None
                if await self.router.recover(req, f"{exc.code}: {exc.reason}", pos, index=i, permanent=exc.permanent,
                                             refused=is_refusal(exc)):
                    x, observed, i = x0, [], 0  # every hop was rebuilt up to this step: run it again from hop 0
                continue  # retry the same layers on the replacement
            hs.record(pos, x, flags, compute_ms, wall_ms)
            observed.append(wall_ms)
            x, i = y, i + 1
        if decode and req.hops and len(observed) == len(req.hops):
            await self._replace_late_hop(req, observed, pos + 1)
        return x

    async def _replace_late_hop(self, req: RequestState, observed: list[float], next_pos: int) -> None:
        alts: list[int] = []
        if any(o > hs.hop.budget_ms for o, hs in zip(observed, req.hops)):  # only a late hop can be replaced
            caps = self.capabilities(req.policy)
            avoid = req.avoid(self.router.clock())
            alts = [j for j in range(len(req.hops)) if has_alternative(req.plan, j, caps, avoid)]
        report = req.tracker.observe(observed, alts)
        advice = next((a for a in report.replace if a.hop_index in alts), None)
        if advice is not None:  # one per step: indexes change once the path does
            # a slow peer loses its hop for this request; it stays usable for others
            await self.router.recover(req, f"deadline: {advice.reason}", next_pos, index=advice.hop_index)
