"""A client: its view of the swarm (records fetched from the DHT, pre-selected per layer
segment) and the rule for peers with no stake and no history.

The planner's dynamic program costs O(layers x candidates x span), so it is handed at
most ``TOP_PER_SEGMENT`` peers per segment (plus one probation peer), not the swarm:
ranked by their cost per layer of the segment (claimed ms/layer + RTT shared over the
layers they hold there, weighted by reputation as the planner weighs it), skipping peers
that advertise no free slot, and topped up until every layer has ``COVER`` of them. The
view keeps ``KEEP_PER_SEGMENT`` (or more, for cover) per segment, so it is O(1) in n.

Newcomer rule (docs/discovery.md, "Planning at swarm scale"): a peer with neither stake
nor history is on *probation* (a staked newcomer is planned like any peer of unknown
reputation). Interactive requests never see probation peers. A batch request may get one,
drawn uniformly at random (claims are not ranked: they are what a Sybil lies about),
whose worst case (all its layers at every position) is charged to this client's quota
up front and must fit in ``PROBATION_SHARE`` of its batch layer-steps: probation peers'
share of batch traffic is bounded whatever their number or claims. History: ``GRADUATION_STEPS``
decode steps served at most 1.5x as slow as the peer's own claims predict give it
reputation ``GRADUATED_REPUTATION`` (the ledger's job once it lands; here an oracle). A
budget is no yardstick: a loose target leaves even a peer 50x slower than it claims room.

Newcomers with stake (reputation still unknown) compete on merit like any peer, and the
view also keeps ``NEWCOMERS_PER_SEGMENT`` of them per segment (untried by this client,
then the longest known), whoever ranks above them; the world fetches them from the segments'
newcomer keys too (``newcomer_key``). On a trial request (the planner's ``trial_share``
of batch requests, drawn from the request id) ``TRIAL_CANDIDATES`` of them join the
candidates, untried ones first, in an order of this client's own, each restricted to a
slice of its layers no other of them holds (``trial_slices``: joiners pile up on the same
weakest windows, and one path can use only one peer per layer), and the planner prefers
them where the request's target allows: they are used, and earn history, within seconds
of joining rather than only when they beat the best.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from dataclasses import replace

from edge_agent.split.planner import PeerCapability

from .dht import BUCKET_RECORDS, key_of
from .nodes import KV_MB_PER_LAYER, MODEL_HASH, REMOTE, Node, rtt_ms

SEGMENTS = 8
TOP_PER_SEGMENT = 4
KEEP_PER_SEGMENT = 8
NEWCOMERS_PER_SEGMENT = 8  # staked peers with no history kept in the view besides the best
TRIAL_CANDIDATES = 4  # of them handed to the planner on a trial request, each on its own slice of layers
COVER = 2  # peers per layer the candidates must include (when the view has them): one may fail
RECORD_TTL_S = 150.0  # records are republished every 60 s; a departed node's record lingers this long
NEWCOMER_TTL_S = 30.0  # a joiner's entry under its segments' newcomer keys: stored once, at join
PROBATION_SHARE = 0.10
PROBATION_REPUTATION = 0.0  # what the planner is told about a probation peer
GRADUATION_STEPS = 50
GRADUATED_REPUTATION = 0.5
REPUTATION_WEIGHT, UNKNOWN_REPUTATION = 0.25, 0.5  # PlannerConfig's defaults


def segment_bounds() -> list[tuple[int, int]]:
    lo, hi = REMOTE
    cuts = [lo + round((hi - lo) * i / SEGMENTS) for i in range(SEGMENTS + 1)]
    return list(zip(cuts, cuts[1:]))


SEGMENT_BOUNDS = segment_bounds()


def segments_of(span: tuple[int, int]) -> list[int]:
    return [s for s, (a, b) in enumerate(SEGMENT_BOUNDS) if a < span[1] and span[0] < b]


def bucket_count(n_live: int, segments_per_node: float = 2.5) -> int:
    """Buckets per segment key so that each holds ~BUCKET_RECORDS records: a power of two,
    from the node's estimate of n (Kademlia's estimate from its routing table; here exact)."""
    need = n_live * segments_per_node / (SEGMENTS * BUCKET_RECORDS)
    return 1 << max(0, math.ceil(math.log2(max(1.0, need))))


def segment_key(segment: int, bucket: int) -> int:
    return key_of(MODEL_HASH, segment, bucket)


def newcomer_bucket_count(n_live: int) -> int:
    """Buckets per segment's newcomer key: 1/32 of the segment key's. A newcomer key holds the
    last NEWCOMER_TTL_S of joiners, ~n x churn/min / 2 x 2.5 / 8 records per segment, so
    ~20 per bucket at 5% churn per minute and ~40 at 10%, at any n."""
    return max(1, bucket_count(n_live) // 32)


def newcomer_key(segment: int, bucket: int) -> int:
    return key_of(MODEL_HASH, segment, "new", bucket)


def _covering(ranked: list[Node], bounds: tuple[int, int], at_least: int) -> list[Node]:
    """The first ``at_least`` of ``ranked``, and after them any that covers a layer of
    ``bounds`` fewer than COVER of the chosen cover: good peers, and no layer left to one."""
    a, b = bounds
    count = [0] * (b - a)
    out = []
    for node in ranked:
        layers = range(max(a, node.span[0]) - a, min(b, node.span[1]) - a)
        if len(out) < at_least or any(count[i] < COVER for i in layers):
            out.append(node)
            for i in layers:
                count[i] += 1
        if len(out) >= at_least and min(count) >= COVER:
            break
    return out


class Client:
    """A requesting device: a DHT client with its own view and probation quota."""

    def __init__(self, idx: int, agent_id: str, pos: tuple[float, float], rng: random.Random,
                 full_for_s: float = math.inf) -> None:
        self.idx, self.agent_id, self.pos, self.rng = idx, agent_id, pos, rng
        self.full_for_s = full_for_s  # how long a refusal keeps a peer out of this client's plans
        self.full_until: dict[int, float] = {}
        self.dht_id = int(agent_id[:16], 16)
        self.entries: dict[int, tuple[Node, float, float, float]] = {}  # idx -> node, published, free MB, rtt
        self.top: list[list[Node]] = [[] for _ in SEGMENT_BOUNDS]
        self.probation: list[list[Node]] = [[] for _ in SEGMENT_BOUNDS]
        self.newcomers: list[list[Node]] = [[] for _ in SEGMENT_BOUNDS]
        self.seen_at: dict[int, float] = {}  # idx -> when this client first fetched its record
        self.tried: set[int] = set()  # newcomers a trial request of this client has used
        self.refreshes = 0
        self.dead: set[int] = set()
        self.refilled_at = -math.inf
        self.batch_layer_steps = self.probation_layer_steps = 0  # the quota's ledger (probation: charged up front)
        self.refusals: Counter = Counter()  # error replies seen, by code

    def merge(self, fetched: list[tuple[Node, float, float]], now: float) -> None:
        """Add fetched records (node, published_at, advertised free MB); re-rank; forget the rest."""
        for node, published, free in fetched:
            old = self.entries.get(node.idx)
            if node.first_seen is None:
                node.first_seen = now
            self.seen_at.setdefault(node.idx, now)
            if old is None or old[1] < published:
                self.entries[node.idx] = (node, published, free, rtt_ms(self.pos, node.pos))
        self.entries = {i: e for i, e in self.entries.items() if now - e[1] <= RECORD_TTL_S and i not in self.dead}
        keep: set[int] = set()
        for s, (a, b) in enumerate(SEGMENT_BOUNDS):
            ranked, fresh, unknown = [], [], []
            for node, _, free, rtt in self.entries.values():
                lo, hi = max(a, node.span[0]), min(b, node.span[1])
                if lo >= hi:
                    continue
                if node.on_probation:
                    fresh.append(node)
                elif free >= (node.span[1] - node.span[0]) * KV_MB_PER_LAYER and self.full_until.get(node.idx, -1.0) <= now:
                    if node.reputation is None:
                        unknown.append((node.idx in self.tried, self.seen_at[node.idx],
                                        key_of(self.agent_id, node.agent_id), node))
                    rep = UNKNOWN_REPUTATION if node.reputation is None else node.reputation
                    per_layer = (node.claimed_ms + rtt / (hi - lo)) * (1 + REPUTATION_WEIGHT * (1 - rep))
                    ranked.append((per_layer, node.agent_id, node))
            ranked.sort(key=lambda r: r[:2])
            self.top[s] = _covering([n for _, _, n in ranked], (a, b), KEEP_PER_SEGMENT)
            self.probation[s] = self.rng.sample(fresh, min(len(fresh), KEEP_PER_SEGMENT))
            self.newcomers[s] = [n for *_, n in sorted(unknown, key=lambda r: r[:3])[:NEWCOMERS_PER_SEGMENT]]
            keep.update(n.idx for n in self.top[s] + self.probation[s] + self.newcomers[s])
        self.entries = {i: e for i, e in self.entries.items() if i in keep}
        self.seen_at = {i: t for i, t in self.seen_at.items() if i in keep}
        self.tried.intersection_update(keep)
        self.dead.intersection_update(n.idx for n, *_ in self.entries.values())
        self.full_until = {i: t for i, t in self.full_until.items() if i in keep and t > now}

    def full(self, node: Node, now: float) -> None:
        """It refused for want of a free slot: plan around it for ``full_for_s``, or (inf) until
        a newer record says otherwise."""
        entry = self.entries.get(node.idx)
        if entry is not None and math.isinf(self.full_for_s):
            self.entries[node.idx] = (entry[0], entry[1], 0.0, entry[3])
        elif entry is not None:
            self.full_until[node.idx] = now + self.full_for_s

    def has_room(self, node: Node, now: float) -> bool:
        """Its record advertises a free slot for its whole span, and it has not refused lately."""
        return (self.entries[node.idx][2] >= (node.span[1] - node.span[0]) * KV_MB_PER_LAYER
                and self.full_until.get(node.idx, -math.inf) <= now)

    def probation_pick(self, interactive: bool, positions: int) -> Node | None:
        """The one probation peer a request may use, or None. Its worst case (all its layers at
        every position) is charged to the quota up front, so probation peers' share of this
        client's batch layer-steps never exceeds PROBATION_SHARE, however the request turns out."""
        pool = {n.idx: n for seg in self.probation for n in seg if n.idx not in self.dead}
        if interactive or not pool:
            return None
        pick = pool[self.rng.choice(sorted(pool))]
        worst = (pick.span[1] - pick.span[0]) * positions
        if self.probation_layer_steps + worst > PROBATION_SHARE * (self.batch_layer_steps + worst):
            return None
        self.probation_layer_steps += worst
        return pick

    def candidates(self, now: float, exclude=(), keep: tuple[Node, ...] = (), probation: Node | None = None,
                   trial: bool = False) -> list[PeerCapability]:
        """What the planner gets for one request: the best few per segment (``exclude``: peer ids
        this request gave up on), its probation peer if any (``probation_pick``), on a trial
        request up to TRIAL_CANDIDATES newcomers on slices of their own, and ``keep``: the peers of the path
        being repaired, which the planner keeps where they still serve."""
        chosen: dict[int, Node] = {n.idx: n for n in keep}
        for bounds, ranked in zip(SEGMENT_BOUNDS, self.top):
            live = [n for n in ranked if n.idx not in self.dead and not n.on_probation and n.agent_id not in exclude
                    and self.has_room(n, now)]
            chosen.update((n.idx, n) for n in _covering(live, bounds, TOP_PER_SEGMENT))
        if probation is not None and probation.idx not in self.dead and probation.agent_id not in exclude:
            chosen[probation.idx] = probation
        if trial:
            fresh = {n.idx: n for seg in self.newcomers for n in seg if n.reputation is None and n.idx not in self.dead
                     and n.agent_id not in exclude and self.has_room(n, now)}
            # untried first, then in an order of this client's own, so clients that see the same
            # newcomers (from the newcomer keys) do not all queue at the same one
            order = sorted(fresh.values(), key=lambda n: (n.idx in self.tried, key_of(self.agent_id, n.agent_id)))
            slices = trial_slices(order[:TRIAL_CANDIDATES])
            chosen.update((n.idx, n) for n in order if n.idx in slices)
        else:
            slices = {}
        out = []
        for node in chosen.values():
            if node.first_offered is None:
                node.first_offered = now
            _, _, free, rtt = self.entries.get(node.idx, (node, 0.0, 0.0, rtt_ms(self.pos, node.pos)))
            rep = PROBATION_REPUTATION if node.on_probation else node.reputation  # None: the planner's unknown
            cap = node.capability(rtt, free, rep)
            out.append(replace(cap, ranges=(slices[node.idx],)) if node.idx in slices else cap)
        return out


def trial_slices(newcomers: list[Node]) -> dict[int, tuple[int, int]]:
    """A slice of its layers for each newcomer (in priority order) that no other holds, so one
    trial path can use them all: the widest run of its span nobody claimed yet, or else the
    front half of the slice it overlaps that starts where its span does (joiners pile up at
    the same weakest windows); a newcomer with no room left waits for the next trial."""
    slices: dict[int, tuple[int, int]] = {}
    for n in newcomers:
        lo, hi = n.span
        claimed = sorted((max(a, lo), min(b, hi)) for a, b in slices.values() if a < hi and lo < b)
        runs, edge = [], lo
        for a, b in claimed:
            runs.append((edge, a))
            edge = max(edge, b)
        runs.append((edge, hi))
        best = max(runs, key=lambda r: (r[1] - r[0], -r[0]))
        if best[1] > best[0]:
            slices[n.idx] = best
            continue
        for other, (a, b) in list(slices.items()):
            if a == lo and min(b, hi) - a >= 2:  # share it: the newcomer takes the front half of the overlap
                mid = (a + min(b, hi)) // 2
                slices[n.idx], slices[other] = (a, mid), (mid, b)
                break
    return slices
