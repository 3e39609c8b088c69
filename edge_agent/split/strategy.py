"""What star and chain share: a request's hops, one hop call, and recovery (written once).

A *strategy* moves one step of a request through its remote hops: request, position and
hidden state in, hidden state out (``Strategy.step``), and rebuilds the path after a
failure (``Strategy.rebuild``). ``star.StarStrategy`` calls each hop itself;
``chain.ChainStrategy`` lets the hops forward to each other. Both recover through the
same ``Router``: replace the failed hop (or every hop) with what the planner offers, and
replay the stored inputs in the chunks first sent, so the rebuilt KV caches are
bit-identical and the output does not change. A capacity refusal (``SlotWait``) is load,
not a fault: it costs the refusing peer a short cooldown, not its place for the request.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import dataclass, field
from typing import Awaitable, Callable, Protocol

import numpy as np

from edge_agent.split.deadlines import DeadlineTracker
from edge_agent.split.observe import HopRecord, Observers, digest
from edge_agent.split.planner import Hop, NoRouteError, Plan
from edge_agent.split.policy import PrivacyPolicy
from edge_agent.split.protocol import ErrorCode, HopFailed, activation, check_reply
from edge_agent.transport import Flag, Frame, MsgType

log = logging.getLogger(__name__)
STEP_FLAGS = int(Flag.REWIND | Flag.DRAFT)  # what a speculative step asks of every hop (runtime.engine.StepInput)


class Link(Protocol):
    """A request/reply link to one hop: ``links.PeerLink`` (a peer) or ``local.LocalLink`` (this device)."""

    peer_id: str

    def next_seq(self) -> int: ...

    async def request(self, frame: Frame, timeout_s: float | None): ...  # -> links.Reply

    async def send(self, frame: Frame) -> None: ...


@dataclass(eq=False)  # identity matters: states are kept across re-routes
class HopState:
    """One hop of one request, as the client sees it."""

    hop: Hop
    link: Link
    history: list[tuple[int, np.ndarray, int]] = field(default_factory=list)  # (pos, rows, flags) sent, in order (replay)
    compute_ms: float = 0.0
    transfer_ms: float = 0.0
    steps: int = 0

    def record(self, pos: int, x: np.ndarray, flags: int, compute_ms: float, wall_ms: float) -> None:
        self.history.append((pos, x, flags))
        self.compute_ms += compute_ms
        self.transfer_ms += max(0.0, wall_ms - compute_ms)
        self.steps += 1


@dataclass
class RequestState:
    """One request's path and what recovery needs to rebuild it."""

    rid: bytes
    plan: Plan
    tracker: DeadlineTracker
    hops: list[HopState]
    policy: PrivacyPolicy  # this request's own: every plan and link of it, re-routes included, obeys it
    excluded: set[str] = field(default_factory=set)
    reroutes: list[dict] = field(default_factory=list)
    step_index: int = 0
    routed: bool = False  # chain mode: the hops know their next hop
    histories_complete: bool = True  # False once a chain step ran: only hop 0's inputs are known
    chain_ms: float = 0.0
    faults: int = 0  # re-routes a fault caused (peer lost, error, bad reply, late): what max_reroutes bounds
    cooling: dict[str, float] = field(default_factory=dict)  # peer -> until when (Router.clock) it is planned around
    refusals: int = 0  # capacity refusals met (SlotWait.max_refusals bounds them)
    waited_s: float = 0.0  # time spent waiting for a free slot (SlotWait.max_wait_s bounds it)
    waits: int = 0

    def end_frame(self) -> Frame:
        return Frame(MsgType.END_REQUEST, request_id=self.rid)

    def avoid(self, now: float) -> set[str]:
        """Peers a plan for this request must not use now: excluded ones and those cooling down."""
        return self.excluded | {p for p, until in self.cooling.items() if until > now}


@dataclass(frozen=True)
class SlotWait:
    """What a capacity refusal (``ErrorCode.CAPACITY``: the peer has no free request slot now)
    costs a request. It is load, not a fault: under load every client ranks the same best
    peers first and learns that one is full only when it refuses, so banning it for the
    request and spending a re-route on it ran requests out of re-routes and of peers while
    half the swarm's slots were free (docs/discovery.md, "Stale free memory under load").

    A refusing peer is planned around for ``cooldown_s`` of the request's time; the re-route
    around it spends no ``max_reroutes``. When no other peer can take the layers, the request
    waits (backoff from ``backoff_s``, doubling up to ``max_backoff_s``, jittered down to half
    so that refused clients do not return together) and plans again; at position 0 it first
    ends its other hops, so it holds no slot that other waiting requests need. Both are bounded: after
    ``max_refusals`` refusals or ``max_wait_s`` of waiting a refusal is a fault again (peer
    excluded, re-route spent) and a plan that finds no peer fails the request."""

    cooldown_s: float = 0.5
    backoff_s: float = 0.25
    max_backoff_s: float = 2.0
    max_refusals: int = 64
    max_wait_s: float = 15.0


def is_refusal(exc: HopFailed) -> bool:
    """A peer that answered it has no free slot now (not that it failed)."""
    return exc.code == ErrorCode.CAPACITY


PlanFn = Callable[..., Plan]  # (policy, previous=, exclude=, replace_hops=) -> Plan, or NoRouteError
LinkFn = Callable[[str, PrivacyPolicy], Awaitable[Link]]  # refuses a peer the policy does not admit


class Router:
    """Hop calls and recovery, shared by both strategies."""

    def __init__(self, plan: PlanFn, link: LinkFn, observers: Observers, *, max_reroutes: int, replay_timeout_s: float,
                 slot_wait: SlotWait = SlotWait(), clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep, rng: random.Random | None = None):
        self.plan, self.link, self.observers = plan, link, observers
        self.max_reroutes, self.replay_timeout_s = max_reroutes, replay_timeout_s
        # clock and sleep: a simulation (bench/swarmsim) runs this code in its own time
        self.slot_wait, self.clock, self.sleep, self.rng = slot_wait, clock, sleep, rng or random.Random()

    async def open(self, plan: Plan, keep: dict[tuple[str, int, int], HopState], policy: PrivacyPolicy) -> list[HopState]:
        """States for ``plan``'s hops: kept ones where (peer, layers) match, new links otherwise."""
        states = []
        for hop in plan.hops:
            old = keep.get((hop.peer_id, hop.start, hop.end))
            states.append(old if old is not None else HopState(hop, await self.link(hop.peer_id, policy)))
            states[-1].hop = hop
        return states

    async def call(self, req: RequestState, hs: HopState, pos: int, x: np.ndarray, timeout_s: float,
                   replay: bool = False, flags: int = 0) -> tuple[np.ndarray, float, float]:
        """One hop, one step: (output rows, compute ms the node reported, round trip ms).
        ``flags``: ``STEP_FLAGS`` bits of a speculative step (REWIND, DRAFT)."""
        frame = activation(req.rid, pos, x, hs.hop.start, hs.hop.end, hs.link.next_seq(),
                           flags | (int(Flag.REPLAY) if replay else 0))
        reply = await hs.link.request(frame, timeout_s)
        out = check_reply(hs.link.peer_id, reply.frame, pos, hs.hop.start, hs.hop.end, x.shape)
        compute_ms = reply.frame.compute_us / 1000.0
        if self.observers.callbacks:
            self.observers.emit(HopRecord("client", req.rid.hex(), hs.link.peer_id, hs.hop.start, hs.hop.end, pos, x.shape[0],
                                          digest(x.tobytes()), digest(reply.frame.payload), compute_ms, reply.wall_ms,
                                          hs.hop.budget_ms, replay, flags, input=x, output=out))
        return out, compute_ms, reply.wall_ms

    async def end(self, req: RequestState, states) -> None:
        for st in states:
            await st.link.send(req.end_frame())

    def _cool(self, req: RequestState, peer_id: str) -> bool:
        """Note a capacity refusal by ``peer_id``: it cools down (True) while the request's
        refusal budget lasts; False once it is spent (then the refusal is a fault)."""
        req.refusals += 1
        if req.refusals > self.slot_wait.max_refusals or req.waited_s >= self.slot_wait.max_wait_s:
            return False
        req.cooling[peer_id] = self.clock() + self.slot_wait.cooldown_s
        return True

    def _may_wait(self, req: RequestState) -> bool:
        """A request with no plan now waits for a slot when peers refused it for want of one
        and its refusal budget (count and time) is not spent; no wait makes a route otherwise."""
        return 0 < req.refusals <= self.slot_wait.max_refusals and req.waited_s < self.slot_wait.max_wait_s

    async def _wait_for_slot(self, req: RequestState) -> None:
        """Wait for a slot to free: backoff with jitter (refused clients do not come back
        together), at least until a refused peer's cooldown ends, within the time budget."""
        sw = self.slot_wait
        now = self.clock()
        delay = min(sw.max_backoff_s, sw.backoff_s * 2 ** min(req.waits, 16)) * self.rng.uniform(0.5, 1.0)
        soonest = min((until - now for until in req.cooling.values() if until > now), default=0.0)
        delay = min(sw.max_wait_s - req.waited_s, max(delay, soonest))
        await self.sleep(delay)
        req.waited_s += delay
        req.waits += 1

    async def recover(self, req: RequestState, reason: str, pos: int, *, index: int | None = None, blamed: str = "",
                      permanent: bool = True, refused: bool = False) -> bool:
        """Replace hop ``index`` with new peer(s) for its layers, or (``index`` None) rebuild every
        hop from hop 0's inputs before ``pos``; replay the inputs so the KV caches match again.

        A single hop becomes a full rebuild when its inputs are not known (after chain steps)
        or the new plan changes more than that hop's layers. Returns True after a full
        rebuild: the caller restarts the current step at hop 0. ``refused``: the failed hop
        (or ``blamed``) refused for want of a free slot (``is_refusal``; ``SlotWait``).
        """
        failed = req.hops[index] if index is not None else None
        if failed is not None:
            blamed = failed.hop.peer_id
        fault = not (refused and blamed and self._cool(req, blamed))
        # a refused hop's peer may take its layers again once it cools down; a failed one may not
        replace = [index] if failed is not None and fault else []
        if failed is not None:
            if (permanent and not refused) or (refused and fault):
                req.excluded.add(blamed)
            # END_REQUEST frees the request on every shard of that node: not while it holds another hop of
            # ours; then its stale cache for these layers stays, so it may not take them again
            if any(h.hop.peer_id == blamed for i, h in enumerate(req.hops) if i != index):
                req.excluded.add(blamed)
            else:
                await failed.link.send(req.end_frame())
            if not req.histories_complete:
                failed = None
        elif refused and fault:
            req.excluded.add(blamed)
        if failed is None:
            await self.end(req, req.hops)
        while True:
            if req.faults >= self.max_reroutes:
                raise NoRouteError([(req.plan.start, req.plan.end)], f"gave up after {req.faults} re-routes")
            try:
                plan = self.plan(req.policy, previous=req.plan if failed else None, exclude=req.avoid(self.clock()),
                                 replace_hops=replace if failed else ())
            except NoRouteError as exc:
                if self._may_wait(req):
                    if failed is not None and pos == 0:
                        # the kept hops would hold their slots through the wait, which other requests need (under
                        # load they all wait): free them and rebuild the path after it; only this step is recomputed
                        failed = None
                        await self.end(req, req.hops)
                    await self._wait_for_slot(req)
                    continue
                who = f"peer {blamed[:12]} failed" if blamed else "after"
                excluded = ", ".join(sorted(p[:12] for p in req.excluded)) or "none"
                waited = f"; waited {req.waited_s:.1f} s for a slot after {req.refusals} refusals" if req.waits else ""
                raise NoRouteError(exc.missing, f"{who}: {reason}; excluded: {excluded}{waited}; {exc}",
                                   what="no replacement: no other peer serves") from None
            if failed is not None:
                keep = {(h.hop.peer_id, h.hop.start, h.hop.end): h for i, h in enumerate(req.hops) if i != index}
                fresh = [h for h in plan.hops if (h.peer_id, h.start, h.end) not in keep]
                if len(plan.hops) - len(fresh) != len(keep) or not fresh or \
                        (fresh[0].start, fresh[-1].end) != (failed.hop.start, failed.hop.end):
                    failed = None  # more than that hop changed: rebuild every hop
                    await self.end(req, req.hops)
                    continue
                inputs, layers, to_note = failed.history, f"{failed.hop.start}:{failed.hop.end}", ""
            else:
                keep = {}
                inputs = [h for h in req.hops[0].history if h[0] < pos]
                layers, to_note = f"{req.plan.start}:{req.plan.end}", "rebuild all hops: "
            new: list[HopState] = []
            try:
                states = await self.open(plan, keep, req.policy)
                new = [st for st in states if all(st is not k for k in keep.values())]
                req.faults += int(fault)  # a re-route around a refusal spends none of max_reroutes
                req.reroutes.append({"step": req.step_index, "layers": layers, "from": blamed,
                                     "to": [st.hop.peer_id for st in new], "reason": to_note + reason})
                log.info("re-route %s: layers %s from %s (%s) to %s", req.rid.hex()[:8], layers, blamed[:12], reason,
                         [st.hop.peer_id[:12] for st in new])
                await self._replay(req, inputs, new)
            except HopFailed as exc:  # the replacement failed too: route around it as well
                reason = f"replacement failed: {exc.code}: {exc.reason}"
                fault = not (is_refusal(exc) and self._cool(req, exc.peer_id))
                if fault:
                    req.excluded.add(exc.peer_id)
                await self.end(req, new)  # replayed ones must start clean next time
                continue
            req.plan, req.hops = plan, states
            req.tracker.adopt(plan)
            if failed is None:
                req.routed, req.histories_complete = False, True
            return failed is None

    async def _replay(self, req: RequestState, inputs: list[tuple[int, np.ndarray, int]], new: list[HopState]) -> None:
        """Re-send inputs, in the chunks and with the flags first sent (a speculative step's
        rewind and row-exact drafts), through the new hop(s) in order."""
        for st in new:
            outs = []
            for pos, x, flags in inputs:
                y, _, _ = await self.call(req, st, pos, x, self.replay_timeout_s, replay=True, flags=flags)
                st.history.append((pos, x, flags))
                outs.append((pos, y, flags))
            inputs = outs


def step_timeout(rows: int, flags: int, hop_timeout_s: float, prefill_timeout_s: float) -> float:
    """How long a silent hop may take: a decode step's timeout per row of drafts (each may be
    its own decode there), a prefill chunk's otherwise."""
    if flags & Flag.DRAFT:
        return hop_timeout_s * rows
    return hop_timeout_s if rows == 1 else prefill_timeout_s


class Strategy:
    """One step of a request through its remote hops, and a rebuild after a failure."""

    def __init__(self, router: Router):
        self.router = router

    async def step(self, req: RequestState, pos: int, x: np.ndarray, flags: int = 0) -> np.ndarray:
        """Rows ``pos ..`` through every remote hop; ``flags``: STEP_FLAGS of a speculative step."""
        raise NotImplementedError

    async def rebuild(self, req: RequestState, reason: str, pos: int, blamed: str = "", refused: bool = False) -> None:
        """Every hop anew, from hop 0's inputs before ``pos`` (the only inputs always known);
        ``refused``: ``blamed`` refused for want of a free slot."""
        await self.router.recover(req, reason, pos, blamed=blamed, refused=refused)
