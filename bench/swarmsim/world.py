"""The event loop: nodes join and leave, publish their records, clients refresh their
views and run requests; what it measured comes out as ``Results``.

Time is simulated (an event heap, no sleeping). Churn: every second, Poisson(n * rate / 60)
serving nodes are told to leave 10 s later (half gracefully, half by crashing) and as many
new ones join, so the swarm keeps its size. Departures are fixed 10 s ahead so a request
step, which runs at once but spans simulated time, always knows whether a hop was gone.
"""

from __future__ import annotations

import heapq
import itertools
import random
import statistics
from collections import Counter
from dataclasses import dataclass, field, replace

from edge_agent.split.joining import choose_range_to_serve
from edge_agent.split.planner import NoRouteError

from .dht import Dht
from .nodes import N_LAYER, Node, draw_node, seeded_identity
from .requests import PLANNER, POLICY, Driver, SimRequest
from .view import (NEWCOMER_TTL_S, RECORD_TTL_S, SEGMENT_BOUNDS, Client, bucket_count, newcomer_bucket_count,
                   newcomer_key, segment_key, segments_of)

PUBLISH_EVERY_S = 60.0
REFRESH_EVERY_S = 10.0
LEAVE_NOTICE_S = 10.0
REFILL_S = 5.0
LOOKUP_S = 0.3  # a few rounds of Kademlia queries at 1-100 ms each
WARMUP_S = 60.0  # control bytes are counted after the first publish round


@dataclass
class Config:
    nodes: int = 200
    churn_per_min: float = 0.05
    minutes: float = 3.0
    seed: int = 1
    sybils: int = 0
    clients: int = 0  # 0: one per 20 nodes, at least 5
    tokens: int = 32
    interactive_share: float = 0.7
    interactive_tbt_ms: float = 500.0
    batch_tbt_ms: float = 4000.0
    think_s: float = 5.0
    staked_joiners: bool = True
    spread: float = PLANNER.spread  # PlannerConfig knobs (trial_share 0: no newcomer trials, as before them)
    trial_share: float = PLANNER.trial_share
    newcomer_keys: bool = True  # joiners also announce themselves under the segments' newcomer keys
    full_for_s: float = float("inf")  # a refusal keeps the peer out of that client's plans this long (inf: until a newer record)


@dataclass
class Results:
    config: Config
    requests: int = 0  # finished or failed by the end (those still running are not counted)
    completed: int = 0
    exact: int = 0
    failures: Counter = field(default_factory=Counter)
    reroutes: int = 0
    plan_ms: list = field(default_factory=list)
    plan_cpu_ms: list = field(default_factory=list)
    candidates: list = field(default_factory=list)
    replan_ms: list = field(default_factory=list)
    infeasible: int = 0
    tbt_ms: list = field(default_factory=list)
    tbt_interactive_ms: list = field(default_factory=list)
    node_bytes_per_min: float = 0.0
    client_bytes_per_min: float = 0.0
    refills: int = 0  # out-of-turn view refreshes (a request found no route in the view)
    bytes_by_kind: dict = field(default_factory=dict)  # per serving node per minute (each message counted once)
    joined: list = field(default_factory=list)  # (kind, eligible, s to first in a view, offered to a planner, used)
    layer_steps: Counter = field(default_factory=Counter)  # (kind, interactive) -> layer-steps served
    sybil_interactive_hops: int = 0
    unknown_steps: Counter = field(default_factory=Counter)  # interactive -> layer-steps by staked peers with no history
    refusals: Counter = field(default_factory=Counter)  # error replies (engine refusals) by code
    record_bytes: list = field(default_factory=list)
    slot_use: list = field(default_factory=list)  # each second: share of the swarm's KV memory (request slots) in use
    slot_waits: list = field(default_factory=list)  # each wait of a request for a free slot (SlotWait), s


class World:
    def __init__(self, cfg: Config) -> None:
        self.cfg, self.rng = cfg, random.Random(cfg.seed)
        self.planner = replace(PLANNER, spread=cfg.spread, trial_share=cfg.trial_share)
        self.dht = Dht(self.rng)
        self.nodes: dict[int, Node] = {}  # live (or leaving) serving nodes
        self.by_id: dict[str, Node] = {}  # everyone ever, for links to departed nodes
        self.events: list = []
        self.seq = itertools.count()
        self.ids = itertools.count()
        self.now = 0.0
        self.out = Results(cfg)
        self.driver = Driver(self)
        self.joiners: list[Node] = []
        for _ in range(cfg.nodes):
            node = self._add(draw_node(next(self.ids), self.rng, 0.0))
            node.reputation = round(self.rng.uniform(0.6, 1.0), 3)  # the established swarm has history
        for _ in range(cfg.sybils):
            self._add(draw_node(next(self.ids), self.rng, 0.0, sybil=True))
        for node in self.nodes.values():
            self._publish(node, first=True)
        n_clients = cfg.clients or max(5, cfg.nodes // 20)
        self.clients = [Client(next(self.ids), seeded_identity(self.rng).agent_id, (self.rng.random(), self.rng.random()),
                               self.rng, cfg.full_for_s) for _ in range(n_clients)]
        for c in self.clients:
            self._refresh(c)
            self.at(self.rng.uniform(0, REFRESH_EVERY_S), "refresh", c)
            self.at(self.rng.uniform(0, cfg.think_s), "arrive", c)
        self.at(1.0, "tick", None)
        self.at(WARMUP_S, "warm", None)

    def at(self, t: float, kind: str, obj) -> None:
        heapq.heappush(self.events, (t, next(self.seq), kind, obj))

    def _add(self, node: Node) -> Node:
        self.nodes[node.idx] = node
        self.by_id[node.agent_id] = node
        self.dht.join(node.dht_id, node.idx)
        self.out.record_bytes.append(node.record_bytes)
        return node

    # -- membership ------------------------------------------------------------------------
    def _publish(self, node: Node, first: bool = False) -> None:
        """Store the record under each segment it overlaps; once a minute, with one routing-table refresh."""
        if not node.alive(self.now) and not first:
            return
        buckets = bucket_count(len(self.nodes))
        free = node.kv_capacity_mb - node.kv_used_mb
        for s in segments_of(node.span):
            self.dht.publish(node.idx, node.dht_id, segment_key(s, node.dht_id % buckets), node.record_bytes,
                             (node, free), self.now)
        self.dht.lookup(node.idx, node.dht_id, self.rng.getrandbits(64))
        self.at(self.now + PUBLISH_EVERY_S * (self.rng.uniform(0.0, 1.0) if first else 1.0), "publish", node)

    def _fetch(self, idx: int, dht_id: int, segments) -> list[tuple]:
        buckets = bucket_count(len(self.nodes))
        got = []
        for s in segments:
            key = segment_key(s, self.rng.randrange(buckets))
            got += [(payload[0], t, payload[1]) for t, payload in self.dht.fetch(idx, dht_id, key, self.now, RECORD_TTL_S)]
        return got

    def _refresh(self, client: Client) -> None:
        got = self._fetch(client.idx, client.dht_id, range(len(SEGMENT_BOUNDS)))
        if self.cfg.newcomer_keys:  # half the segments' newcomer keys each time: each one every 20 s
            buckets = newcomer_bucket_count(len(self.nodes))
            client.refreshes += 1
            for s in range(client.refreshes % 2, len(SEGMENT_BOUNDS), 2):
                key = newcomer_key(s, self.rng.randrange(buckets))
                got += [(p[0], t, p[1]) for t, p in self.dht.fetch(client.idx, client.dht_id, key, self.now, NEWCOMER_TTL_S)]
        client.merge(got, self.now)

    def refill(self, client: Client, clock) -> bool:
        """A refresh out of turn when a request finds no route in the view (at most every REFILL_S)."""
        if clock.t - client.refilled_at < REFILL_S:
            return False
        client.refilled_at = clock.t
        self.out.refills += 1
        self._refresh(client)
        clock.t += LOOKUP_S  # one round of lookups and gets
        return True

    def _join(self, node: Node) -> None:
        self._add(node)
        node.staked = self.cfg.staked_joiners
        self._publish(node)
        if self.cfg.newcomer_keys:  # once, at join: the entry expires after NEWCOMER_TTL_S
            buckets = newcomer_bucket_count(len(self.nodes))
            for s in segments_of(node.span):
                self.dht.publish(node.idx, node.dht_id, newcomer_key(s, node.dht_id % buckets), node.record_bytes,
                                 (node, node.kv_capacity_mb), self.now)
        self.joiners.append(node)

    def _choose_span(self, idx: int, dht_id: int):
        """A joining node learns the coverage from one bucket per segment, then places its layers."""
        seen = [n.capability(50.0, 0.0, None) for n, _, _ in self._fetch(idx, dht_id, range(len(SEGMENT_BOUNDS)))]
        return lambda width: choose_range_to_serve(N_LAYER, POLICY, seen, width)

    def _churn(self) -> None:
        live = [x for x in self.nodes.values() if not x.sybil and x.gone_at == float("inf")]
        for node in self.rng.sample(live, min(len(live), self._poisson(len(live) * self.cfg.churn_per_min / 60.0))):
            node.gone_at = self.now + LEAVE_NOTICE_S + self.rng.random()
            node.graceful = self.rng.random() < 0.5
            self.at(node.gone_at, "leave", node)
            idx = next(self.ids)
            probe_id = self.rng.getrandbits(64)
            joiner = draw_node(idx, self.rng, self.now + self.rng.random(), choose_span=self._choose_span(idx, probe_id))
            self.at(joiner.joined_at, "join", joiner)

    def _poisson(self, lam: float) -> int:
        k, p, limit = 0, 1.0, pow(2.718281828459045, -lam)
        while True:
            p *= self.rng.random()
            if p <= limit:
                return k
            k += 1

    def served(self, node: Node, layers: int, interactive: bool, t: float) -> None:
        if node.first_used is None:
            node.first_used = t
        self.out.layer_steps[(node.kind if not node.on_probation or node.sybil else "newcomer", interactive)] += layers
        self.out.sybil_interactive_hops += node.sybil and interactive
        if node.reputation is None and not node.on_probation:
            self.out.unknown_steps[interactive] += layers

    # -- requests --------------------------------------------------------------------------
    def _arrive(self, client: Client) -> None:
        cfg = self.cfg
        interactive = self.rng.random() < cfg.interactive_share
        target = cfg.interactive_tbt_ms if interactive else cfg.batch_tbt_ms
        try:
            sreq = self.driver.start(client, self.now, interactive, target, cfg.tokens)
        except NoRouteError as exc:
            self._failed(client, None, exc)
            return
        self.at(self.now, "step", sreq)

    def _step(self, sreq: SimRequest) -> None:
        try:
            more = self.driver.step(sreq)
        except NoRouteError as exc:
            self._failed(sreq.client, sreq, exc)
            return
        if more:
            self.at(sreq.clock.t, "step", sreq)
            return
        self.driver.end(sreq)
        self.out.requests += 1
        self.out.completed += 1
        self.out.exact += sreq.exact
        self.out.reroutes += len(sreq.state.reroutes)
        self.out.tbt_ms += sreq.tbt
        if sreq.interactive:
            self.out.tbt_interactive_ms += sreq.tbt
        self.at(sreq.clock.t + self.rng.expovariate(1.0 / self.cfg.think_s), "arrive", sreq.client)

    def _failed(self, client: Client, sreq: SimRequest | None, exc: Exception) -> None:
        self.out.requests += 1
        self.out.failures[str(exc).split(":")[0][:60]] += 1
        t = self.now
        if sreq is not None:
            self.driver.end(sreq)
            t = sreq.clock.t
        self.at(t + self.rng.expovariate(1.0 / self.cfg.think_s), "arrive", client)

    # -- the loop --------------------------------------------------------------------------
    def run(self) -> Results:
        end = self.cfg.minutes * 60.0
        warm_bytes: dict[int, float] = {}
        warm_kinds: dict[str, float] = {}
        while self.events and self.events[0][0] <= end:
            self.now, _, kind, obj = heapq.heappop(self.events)
            if kind == "step":
                self._step(obj)
            elif kind == "arrive":
                self._arrive(obj)
            elif kind == "refresh":
                self._refresh(obj)
                self.at(self.now + REFRESH_EVERY_S, "refresh", obj)
            elif kind == "publish":
                self._publish(obj)
            elif kind == "join":
                self._join(obj)
            elif kind == "leave":
                self.nodes.pop(obj.idx, None)
                self.dht.leave(obj.dht_id)
            elif kind == "tick":
                self._churn()
                live = [x for x in self.nodes.values() if x.alive(self.now)]
                self.out.slot_use.append(sum(x.kv_used_mb for x in live) / max(1e-9, sum(x.kv_capacity_mb for x in live)))
                self.at(self.now + 1.0, "tick", None)
            elif kind == "warm":
                warm_bytes, warm_kinds = dict(self.dht.bytes), dict(self.dht.by_kind)
        return self._finish(end, warm_bytes, warm_kinds)

    def _finish(self, end: float, warm_bytes: dict[int, float], warm_kinds: dict[str, float]) -> Results:
        out, minutes = self.out, max(1e-9, (end - WARMUP_S) / 60.0)
        client_ids = {c.idx for c in self.clients}
        grown = {i: b - warm_bytes.get(i, 0.0) for i, b in self.dht.bytes.items()}
        out.client_bytes_per_min = sum(grown.get(i, 0.0) for i in client_ids) / len(client_ids) / minutes
        out.node_bytes_per_min = sum(b for i, b in grown.items() if i not in client_ids) / len(self.nodes) / minutes
        d = self.driver
        out.plan_ms, out.plan_cpu_ms, out.replan_ms, out.infeasible = d.plan_ms, d.plan_cpu_ms, d.replan_ms, d.infeasible
        out.candidates, out.slot_waits = d.candidates, d.slot_waits
        out.bytes_by_kind = {k: (v - warm_kinds.get(k, 0.0)) / len(self.nodes) / minutes for k, v in self.dht.by_kind.items()}
        for c in self.clients:
            out.refusals.update(c.refusals)
        for node in self.joiners:
            if node.joined_at <= end - 30.0:
                since = [None if t is None else t - node.joined_at for t in (node.first_seen, node.first_offered, node.first_used)]
                # the 30 s target's joiners: staked (so not on probation) and serving for all of those 30 s
                eligible = node.staked and node.gone_at - node.joined_at >= 30.0
                out.joined.append((node.kind, eligible, *since))
        return out


def median(xs) -> float:
    return statistics.median(xs) if xs else float("nan")
