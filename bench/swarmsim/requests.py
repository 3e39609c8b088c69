"""Requests through the real split code over simulated links, in simulated time.

Each decode step runs the real ``StarStrategy.step``: the real ``Router`` calls every hop,
recovers a failed one (re-plan with the real ``plan_path``, replay the hop's stored inputs
so its KV state is rebuilt) and the real ``DeadlineTracker`` advises replacing late hops.
The only fake is the link: ``SimLink.request`` computes the hop at once and reports the
milliseconds the hop would have taken; the request's clock advances by them. Nothing
awaits real I/O, so each coroutine is driven to completion with one ``send`` (``run``).

The layers are a toy arithmetic with a KV state: a layer's output depends on every input
it saw before in this request, so a replay that misses or reorders an input changes the
output. The client computes the same layers alone as the reference ("unchanged output").
"""

from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass, field

import numpy as np

from edge_agent.split.deadlines import DeadlineConfig, DeadlineTracker
from edge_agent.split.links import Reply
from edge_agent.split.observe import HopRecord, Observers
from edge_agent.split.planner import NoRouteError, Plan, PlannerConfig, plan_path
from edge_agent.split.policy import PrivacyPolicy
from edge_agent.split.protocol import ErrorCode, HopFailed
from edge_agent.split.spread import is_trial
from edge_agent.split.star import StarStrategy
from edge_agent.split.strategy import RequestState, Router
from edge_agent.transport import Frame, MsgType

from .nodes import KV_MB_PER_LAYER, N_LAYER, Node, rtt_ms
from .view import GRADUATED_REPUTATION, GRADUATION_STEPS, Client

POLICY = PrivacyPolicy(k=1, m=1)
# trials: on every batch request newcomers weigh ~nothing, so it takes them wherever its target
# allows. spread stays 0: 0.2 did not raise completion in the overloaded runs (docs/benchmarks.md)
PLANNER = PlannerConfig(spread=0.0, trial_share=1.0, trial_weight=0.01)
DEADLINES = DeadlineConfig(overrun_factor=3.0, overrun_ms=50.0, negative_steps=3)  # ClientConfig's defaults
HOP_TIMEOUT_S, PREFILL_TIMEOUT_S, MAX_REROUTES = 10.0, 120.0, 8
PEER_TIMEOUT_S = 2.0  # transport heartbeat timeout: how long a crashed peer's link takes to fail
GOOD_STEP_FACTOR = 1.5  # a step counts towards history when the hop took at most this x what its claims predict
LOCAL_MS = 12.0  # the client's layers 0 and 79, norm, head, sampling
MOD = 8191
PREFILL_ROWS = 8


def run(coro):
    """Drive a coroutine that never waits on real I/O; return its value (or raise its error)."""
    try:
        coro.send(None)
    except StopIteration as stop:
        return stop.value
    coro.close()
    raise RuntimeError("a simulated hop waited on real I/O")


def layers(kv: dict, rid: bytes, x: np.ndarray, start: int, end: int) -> np.ndarray:
    """The toy layers ``[start, end)``: each mixes its running state (the "KV cache") into every
    position. ``kv[(rid, layer)] = (state, positions held)``; one number per position keeps it cheap."""
    values = [int(v) for v in x[:, 0]]
    for layer in range(start, end):
        state, held = kv.get((rid, layer), (0, 0))
        for i, v in enumerate(values):
            state = (state * 31 + v) % MOD
            values[i] = (v * 3 + layer + state) % MOD
        kv[(rid, layer)] = (state, held + len(values))
    return np.array(values, dtype=np.float32).reshape(-1, 1)


def position_error(kv: dict, rid: bytes, start: int, pos: int) -> str | None:
    """What the real engine (``runtime.engine``) refuses: a step that does not follow the positions held."""
    held = kv.get((rid, start))
    if held is None and pos != 0:
        return str(ErrorCode.UNKNOWN_REQUEST)
    if held is not None and held[1] != pos:
        return str(ErrorCode.POSITION)
    return None


def feasible(plan: Plan, caps, charge_memory: bool) -> bool:
    """The plan covers the remote range in order, each hop inside a range its peer advertises,
    and (for a fresh plan) each peer's layers fit its advertised memory."""
    by_id = {c.peer_id: c for c in caps}
    edge, used = POLICY.remote_range(N_LAYER)[0], {}
    for hop in plan.hops:
        peer = by_id.get(hop.peer_id)
        if peer is None or hop.start != edge or not peer.serves(hop.start, hop.end):
            return False
        edge, used[hop.peer_id] = hop.end, used.get(hop.peer_id, 0) + hop.n_layers
    if edge != POLICY.remote_range(N_LAYER)[1]:
        return False
    return not charge_memory or all(n <= by_id[p].capacity_layers() for p, n in used.items())


@dataclass
class Clock:
    t: float  # seconds, this request's own time while one of its steps runs


class SimLink:
    """A link to a simulated node: it answers at once and says how long the hop took."""

    def __init__(self, node: Node, client: Client, clock: Clock, jitter) -> None:
        self.peer_id, self.node, self.client, self.clock, self.jitter = node.agent_id, node, client, clock, jitter
        self.seq = 0

    def next_seq(self) -> int:
        self.seq += 1
        return self.seq

    def _lost(self, timeout_s: float) -> HopFailed:
        node, rtt = self.node, rtt_ms(self.client.pos, self.node.pos)
        wait = rtt / 1000 if node.graceful else min(timeout_s, max(rtt / 1000, node.gone_at + PEER_TIMEOUT_S - self.clock.t))
        self.clock.t += wait
        self.client.dead.add(node.idx)  # the peer table drops a peer its transport saw die
        return HopFailed(self.peer_id, "connection lost", ErrorCode.PEER_LOST)

    async def request(self, frame: Frame, timeout_s: float | None) -> Reply:
        node, rid, (a, b) = self.node, frame.request_id, (frame.layer_start, frame.layer_end)
        if not node.alive(self.clock.t):
            raise self._lost(timeout_s or HOP_TIMEOUT_S)
        rtt = rtt_ms(self.client.pos, node.pos)
        refused = position_error(node.kv, rid, a, frame.step)
        if refused is None and frame.step == 0:  # first step here: the KV cache is allocated
            need = (b - a) * KV_MB_PER_LAYER
            if node.kv_used_mb + need > node.kv_capacity_mb:
                refused = str(ErrorCode.CAPACITY)
            else:
                node.kv_used_mb += need
                node.holds[rid] = node.holds.get(rid, 0.0) + need
        if refused is not None:  # an ERROR reply: links.PeerLink raises it as a permanent HopFailed
            self.clock.t += rtt / 1000
            self.client.refusals[refused] += 1
            if refused == str(ErrorCode.CAPACITY):
                self.client.full(node, self.clock.t)
            raise HopFailed(self.peer_id, "refused", refused)
        rows = frame.n_positions
        compute = node.ms_per_layer * (b - a) * max(1.0, rows / 4) * self.jitter()
        wall = compute + rtt
        if node.gone_at < self.clock.t + wall / 1000:  # it left while computing
            self.clock.t = node.gone_at
            raise self._lost(timeout_s or HOP_TIMEOUT_S)
        self.clock.t += wall / 1000
        out = layers(node.kv, rid, frame.array(), a, b)
        reply = Frame.from_array(MsgType.ACTIVATION, out, request_id=rid, step=frame.step, n_positions=rows,
                                 layer_start=a, layer_end=b, seq=frame.seq, compute_us=int(compute * 1000))
        return Reply(reply, wall)

    async def send(self, frame: Frame) -> None:  # END_REQUEST: the node frees the request on every shard (serve.py)
        held = self.node.holds.pop(frame.request_id, 0.0)
        self.node.kv_used_mb -= held
        for key in [k for k in self.node.kv if k[0] == frame.request_id]:
            del self.node.kv[key]


@dataclass
class SimRequest:
    client: Client
    interactive: bool
    target_ms: float
    tokens_left: int
    clock: Clock
    state: RequestState | None = None
    strategy: StarStrategy | None = None
    x: np.ndarray | None = None
    ref_kv: dict = field(default_factory=dict)
    pos: int = 0
    exact: bool = True
    tbt: list = field(default_factory=list)
    probation: Node | None = None  # the one peer without stake or history this request may use
    rid: bytes = b""  # the request id: the planner's key for spread and trials
    trial: bool = False  # newcomers are tried on this (batch) request


class Driver:
    """Starts and steps requests for the world (``world.World``), recording what happened."""

    def __init__(self, world) -> None:
        self.world = world
        self.plan_ms: list[float] = []  # wall time of each first plan (candidates + plan_path)
        self.plan_cpu_ms: list[float] = []  # the same in this process's CPU time (the machine may be shared)
        self.replan_ms: list[float] = []
        self.candidates: list[int] = []
        self.infeasible = 0  # plans the checker refused (must stay 0)
        self.slot_waits: list[float] = []  # each wait of a request for a free slot, s

    def _plan_fn(self, sreq: SimRequest):
        def plan(policy: PrivacyPolicy, previous: Plan | None = None, exclude=(), replace_hops=()) -> Plan:
            t0, c0 = time.perf_counter(), time.process_time()
            keep = tuple(self.world.by_id[h.peer_id] for h in previous.hops) if previous is not None else ()
            # a trial is the first plan's: a repair (often of a newcomer that refused, busy with
            # another client's trial) fills its gap on merit, so one request does not queue at several
            trial = sreq.trial and previous is None
            kw = dict(target_tbt_ms=sreq.target_ms, local_ms=LOCAL_MS, previous=previous, exclude=exclude,
                      replace_hops=replace_hops, mode="star", config=self.world.planner, request_key=sreq.rid,
                      trial_eligible=trial)
            caps = sreq.client.candidates(sreq.clock.t, exclude, keep, sreq.probation, trial)
            try:
                out = plan_path(N_LAYER, policy, caps, **kw)
            except NoRouteError:  # the view ran dry (peers gone or full): fetch afresh from the DHT, once
                if not self.world.refill(sreq.client, sreq.clock):
                    raise
                caps = sreq.client.candidates(sreq.clock.t, exclude, keep, sreq.probation, trial)
                out = plan_path(N_LAYER, policy, caps, **kw)
            if previous is None:
                self.plan_ms.append((time.perf_counter() - t0) * 1000)
                self.plan_cpu_ms.append((time.process_time() - c0) * 1000)
                self.candidates.append(len(caps))
            else:
                self.replan_ms.append((time.perf_counter() - t0) * 1000)
            self.infeasible += not feasible(out, caps, charge_memory=previous is None)
            return out
        return plan

    def _observe(self, sreq: SimRequest, rec: HopRecord) -> None:
        node = self.world.by_id[rec.peer_id]
        steps = rec.end - rec.start
        if not sreq.interactive:
            sreq.client.batch_layer_steps += steps
        self.world.served(node, steps, sreq.interactive, sreq.clock.t)
        if sreq.trial and node.reputation is None:
            sreq.client.tried.add(node.idx)
        if rec.replay or rec.n_positions != 1:
            return
        expected = next((h.expected_ms for h in sreq.state.plan.hops
                         if (h.peer_id, h.start, h.end) == (rec.peer_id, rec.start, rec.end)), None)
        if expected is not None and rec.wall_ms <= GOOD_STEP_FACTOR * expected + 5.0:  # as fast as it claimed
            node.good_steps += 1
            if node.reputation is None and node.good_steps >= GRADUATION_STEPS:
                node.reputation = GRADUATED_REPUTATION

    def start(self, client: Client, now: float, interactive: bool, target_ms: float, tokens: int) -> SimRequest:
        sreq = SimRequest(client, interactive, target_ms, tokens, Clock(now))
        sreq.rid = uuid.UUID(int=self.world.rng.getrandbits(128)).bytes
        sreq.trial = not interactive and is_trial(sreq.rid, self.world.planner.trial_share)
        sreq.probation = client.probation_pick(interactive, PREFILL_ROWS + tokens)
        observers = Observers()
        observers.add(lambda rec: self._observe(sreq, rec))
        jitter = lambda: math.exp(self.world.rng.gauss(0.0, 0.1))  # noqa: E731
        router = Router(self._plan_fn(sreq), lambda pid, policy: self._link(pid, sreq, jitter), observers,
                        max_reroutes=MAX_REROUTES, replay_timeout_s=PREFILL_TIMEOUT_S,
                        clock=lambda: sreq.clock.t, sleep=lambda s: self._wait(sreq, s), rng=self.world.rng)
        sreq.strategy = StarStrategy(router, lambda policy: client.candidates(sreq.clock.t, sreq.state.excluded, (), sreq.probation),
                                     hop_timeout_s=HOP_TIMEOUT_S,
                                     prefill_timeout_s=PREFILL_TIMEOUT_S)
        plan = router.plan(POLICY)  # NoRouteError: the request fails
        sreq.state = RequestState(sreq.rid, plan,
                                  DeadlineTracker(plan, DEADLINES), run(router.open(plan, {}, POLICY)), POLICY)
        sreq.x = np.array([[self.world.rng.randrange(MOD)] for _ in range(PREFILL_ROWS)], dtype=np.float32)
        return sreq

    async def _wait(self, sreq: SimRequest, seconds: float) -> None:
        """The Router waiting for a free slot: the request's own time passes (``SlotWait``)."""
        sreq.clock.t += seconds
        self.slot_waits.append(seconds)

    async def _link(self, peer_id: str, sreq: SimRequest, jitter) -> SimLink:
        return SimLink(self.world.by_id[peer_id], sreq.client, sreq.clock, jitter)

    def step(self, sreq: SimRequest) -> bool:
        """One step (the prefill, then one token); False when the request is done. Raises NoRouteError."""
        t0 = sreq.clock.t
        y = run(sreq.strategy.step(sreq.state, sreq.pos, sreq.x))
        ref = layers(sreq.ref_kv, b"ref", sreq.x, *POLICY.remote_range(N_LAYER))
        sreq.exact &= bool(np.array_equal(y, ref))
        sreq.clock.t += LOCAL_MS / 1000
        if sreq.pos:
            sreq.tbt.append((sreq.clock.t - t0) * 1000)
        sreq.pos += sreq.x.shape[0]
        sreq.state.step_index += 1
        sreq.x = (y[-1:] % 97).astype(np.float32)  # "sampling": the next input follows from this output
        sreq.tokens_left -= 1
        return sreq.tokens_left >= 0

    def end(self, sreq: SimRequest) -> None:
        if sreq.state is not None:
            run(sreq.strategy.router.end(sreq.state, sreq.state.hops))

