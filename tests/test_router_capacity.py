"""A capacity refusal is load, not a fault (``strategy.SlotWait``): the real Router, planner,
StarStrategy and DeadlineTracker, with links that stand in for hop servers.

The links are a fake: a peer that refuses for want of a slot exactly N times, or for
ever, at a chosen moment, cannot be caused on demand with real engines in one process
(tests/test_router_capacity_swarm.py causes the real refusal with a real `join` peer).
Time is a fake clock: the Router's ``sleep`` advances it, so waits take no wall time.
"""

from __future__ import annotations

import asyncio
import random

import numpy as np
import pytest

from edge_agent.split.deadlines import DeadlineConfig, DeadlineTracker
from edge_agent.split.links import Reply
from edge_agent.split.observe import Observers
from edge_agent.split.planner import NoRouteError, PeerCapability, plan_path
from edge_agent.split.policy import PrivacyPolicy
from edge_agent.split.protocol import ErrorCode, HopFailed
from edge_agent.split.star import StarStrategy
from edge_agent.split.strategy import RequestState, Router, SlotWait
from edge_agent.transport import Frame, MsgType

N_LAYER, POLICY = 8, PrivacyPolicy(k=1, m=1)  # remote layers 1..7
MAX_REROUTES = 3


def toy_layers(x: np.ndarray, start: int, end: int) -> np.ndarray:
    """Layer by layer, so any split of the layers gives the same output (the real hop's arithmetic
    is not the point here: which peer ran which step is)."""
    for layer in range(start, end):
        x = x * 2.0 + layer
    return x


class Peer:
    """A hop server: ``refuse`` first steps of new requests answered CAPACITY (None: every one);
    ``broken``: every step fails with a fault (a lost connection)."""

    def __init__(self, peer_id: str, refuse: int | None = 0, broken: bool = False, layers=(1, 7)) -> None:
        self.peer_id, self.refuse, self.broken, self.layers = peer_id, refuse, broken, layers
        self.requests = self.refusals = self.ends = 0

    def capability(self, ms: float) -> PeerCapability:
        return PeerCapability(self.peer_id, (self.layers,), 1e6, ms, 1.0)


class Link:
    def __init__(self, peer: Peer) -> None:
        self.peer, self.peer_id, self.seq = peer, peer.peer_id, 0

    def next_seq(self) -> int:
        self.seq += 1
        return self.seq

    async def request(self, frame: Frame, timeout_s: float | None) -> Reply:
        peer = self.peer
        peer.requests += 1
        if peer.broken:
            raise HopFailed(peer.peer_id, "connection lost", ErrorCode.PEER_LOST)
        if frame.step == 0 and (peer.refuse is None or peer.refusals < peer.refuse):
            peer.refusals += 1
            raise HopFailed(peer.peer_id, "all 1 request slots are busy", ErrorCode.CAPACITY)
        out = toy_layers(frame.array(), frame.layer_start, frame.layer_end)
        reply = Frame.from_array(MsgType.ACTIVATION, out, request_id=frame.request_id, step=frame.step,
                                 n_positions=frame.n_positions, layer_start=frame.layer_start,
                                 layer_end=frame.layer_end, seq=frame.seq, compute_us=1000)
        return Reply(reply, 2.0)

    async def send(self, frame: Frame) -> None:  # END_REQUEST
        self.peer.ends += 1


class Harness:
    """One request through ``peers`` (faster first: the planner prefers the first)."""

    def __init__(self, *peers: Peer, slot_wait: SlotWait = SlotWait()) -> None:
        self.peers = {p.peer_id: p for p in peers}
        self.caps = [p.capability(1.0 + i) for i, p in enumerate(peers)]
        self.now, self.sleeps = 100.0, []

        def plan(policy, previous=None, exclude=(), replace_hops=()):
            return plan_path(N_LAYER, policy, self.caps, target_tbt_ms=1000.0, previous=previous, exclude=exclude,
                             replace_hops=replace_hops, mode="star")

        async def link(peer_id, policy):
            return Link(self.peers[peer_id])

        self.router = Router(plan, link, Observers(), max_reroutes=MAX_REROUTES, replay_timeout_s=5.0,
                             slot_wait=slot_wait, clock=lambda: self.now, sleep=self._sleep, rng=random.Random(1))
        self.star = StarStrategy(self.router, lambda policy: self.caps, hop_timeout_s=5.0, prefill_timeout_s=5.0)

    async def _sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds

    def run(self, steps: int = 3) -> tuple[RequestState, list[np.ndarray]]:
        async def go():
            plan = self.router.plan(POLICY)
            req = RequestState(b"r" * 16, plan, DeadlineTracker(plan, DeadlineConfig()),
                               await self.router.open(plan, {}, POLICY), POLICY)
            outs, x, pos = [], np.arange(4, dtype=np.float32).reshape(4, 1), 0  # a 4-position prefill, then decode
            for _ in range(steps):
                y = await self.star.step(req, pos, x)
                outs.append(y)
                pos, x = pos + x.shape[0], y[-1:] % 7
                req.step_index += 1
            return req, outs
        return asyncio.run(go())


def reference(steps: int = 3) -> list[np.ndarray]:
    return Harness(Peer("ok")).run(steps)[1]


def test_a_refusal_cools_the_peer_down_instead_of_excluding_it_or_spending_a_reroute():
    busy, other = Peer("busy", refuse=1), Peer("other")
    req, outs = Harness(busy, other).run()
    assert all(np.array_equal(a, b) for a, b in zip(outs, reference()))
    assert req.excluded == set() and req.faults == 0 and req.refusals == 1
    assert "busy" in req.cooling and len(req.reroutes) == 1  # re-routed to the other peer, at no cost
    assert [h.hop.peer_id for h in req.hops] == ["other"]


def test_with_no_other_peer_the_request_waits_for_a_slot_with_backoff_and_completes():
    only = Peer("only", refuse=5)
    h = Harness(only)
    req, outs = h.run()
    assert all(np.array_equal(a, b) for a, b in zip(outs, reference()))
    assert req.faults == 0 and req.excluded == set() and req.refusals == 5
    assert len(h.sleeps) >= 5 and req.waited_s == pytest.approx(sum(h.sleeps))
    sw = SlotWait()
    # jittered exponential backoff, never shorter than the refused peer's cooldown, capped
    assert all(sw.cooldown_s * 0.999 <= s <= sw.max_backoff_s for s in h.sleeps)
    assert h.sleeps[-1] > h.sleeps[0]


def test_a_request_waiting_at_its_first_step_holds_no_slot_meanwhile():
    """The hop before the refusing one ran the prefill; while the request waits it is ended
    (its slot is free for others) and the path is rebuilt after the wait."""
    first, second = Peer("first", layers=(1, 4)), Peer("second", refuse=2, layers=(4, 7))
    h = Harness(first, second)
    req, outs = h.run()
    assert all(np.array_equal(a, b) for a, b in zip(outs, reference()))
    assert first.ends >= 1 and req.waits >= 1 and req.faults == 0
    assert [hs.hop.peer_id for hs in req.hops] == ["first", "second"]
    assert any(r["reason"].startswith("rebuild all hops") for r in req.reroutes)


def test_a_peer_that_never_has_a_slot_fails_the_request_in_bounded_count_and_time():
    sw = SlotWait(max_refusals=6, max_wait_s=3.0)
    only = Peer("only", refuse=None)
    h = Harness(only, slot_wait=sw)
    with pytest.raises(NoRouteError, match="waited .* for a slot"):
        h.run()
    assert sum(h.sleeps) <= sw.max_wait_s + 1e-9
    assert only.requests <= sw.max_refusals + 1  # each attempt followed a wait; then the refusal became a fault


def test_refusals_past_their_budget_count_as_faults_again():
    sw = SlotWait(max_refusals=2, max_wait_s=60.0)
    peers = [Peer(f"p{i}", refuse=None) for i in range(6)]
    h = Harness(*peers, slot_wait=sw)
    with pytest.raises(NoRouteError):
        h.run()
    req_refusals = sum(p.refusals for p in peers)
    assert req_refusals <= sw.max_refusals + MAX_REROUTES + 1


def test_a_fault_still_excludes_the_peer_and_spends_a_reroute():
    broken, good = Peer("broken", broken=True), Peer("good")
    req, outs = Harness(broken, good).run()
    assert all(np.array_equal(a, b) for a, b in zip(outs, reference()))
    assert req.excluded == {"broken"} and req.faults == 1 and req.refusals == 0 and req.waits == 0


def test_faults_alone_give_up_after_max_reroutes():
    peers = [Peer(f"b{i}", broken=True) for i in range(MAX_REROUTES + 2)]
    h = Harness(*peers)
    with pytest.raises(NoRouteError, match=f"gave up after {MAX_REROUTES} re-routes"):
        h.run()
    assert h.sleeps == []  # faults are never waited for
