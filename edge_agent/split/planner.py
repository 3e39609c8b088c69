"""Split-inference path planner: peers' capabilities in, a path of hops with budgets out.

Pure and deterministic: no I/O, no clock, no randomness; ties are broken by peer id.
The remote range ``[k, n_layer - m)`` of the privacy policy is covered by contiguous
hops, each a peer serving (a superset of) its sub-range, by a shortest-path search over
layer boundaries that minimizes expected time per token (compute + transfer), lightly
penalized per hop and for low reputation, within each node's memory. See README.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Collection, Literal, Optional, Sequence

from .capacity import capacity_layers, check_number as _num

from .deadlines import split_budget
from .policy import LayerRange, PolicyError, PrivacyPolicy
from .spread import is_trial, peer_weights

Mode = Literal["star", "chain", "auto"]


class NoRouteError(LookupError):
    """No path covers the remote range. ``missing``: half-open ranges nobody can take."""

    def __init__(self, missing: Sequence[LayerRange], detail: str = "", what: str = "no peer serves") -> None:
        self.missing = tuple(missing)
        msg = f"{what} " + ", ".join(format_layers(r) for r in self.missing)
        super().__init__(msg + (f" ({detail})" if detail else ""))


def format_layers(r: LayerRange) -> str:
    """``(12, 18)`` -> ``"layers 12-17"`` (inclusive, as people count); ``(5, 6)`` -> ``"layer 5"``."""
    a, b = r
    return f"layer {a}" if b - a == 1 else f"layers {a}-{b - 1}"


@dataclass(frozen=True)
class PeerCapability:
    """What a peer advertises. ``ranges``: half-open layer ranges it serves; a hop must
    fit inside one of them. ``layer_bytes_mb``: memory one layer of one request needs
    there (None: unknown, memory unchecked; ``directory.PeerDirectory`` sets the KV cache of
    one request). ``reputation`` in [0, 1] or None (unknown; the ledger's to set)."""

    peer_id: str
    ranges: tuple[LayerRange, ...]
    free_memory_mb: float
    ms_per_layer: float  # per token
    rtt_ms: float  # client <-> peer round trip
    reputation: Optional[float] = None
    layer_bytes_mb: Optional[float] = None

    def __post_init__(self) -> None:
        if not isinstance(self.peer_id, str) or not self.peer_id:
            raise ValueError("peer_id must be a non-empty string")
        norm = []
        for r in self.ranges:
            try:
                a, b = r
            except (TypeError, ValueError):
                raise ValueError(f"peer {self.peer_id}: range {r!r} is not a (start, end) pair") from None
            if any(isinstance(x, bool) or not isinstance(x, int) for x in (a, b)) or not 0 <= a < b:
                raise ValueError(f"peer {self.peer_id}: bad layer range {r!r} (need ints 0 <= start < end)")
            norm.append((a, b))
        object.__setattr__(self, "ranges", tuple(norm))
        _num("free_memory_mb", self.free_memory_mb)
        _num("ms_per_layer", self.ms_per_layer)
        _num("rtt_ms", self.rtt_ms)
        if self.reputation is not None and not 0.0 <= _num("reputation", self.reputation) <= 1.0:
            raise ValueError(f"reputation must be in [0, 1], got {self.reputation}")
        if self.layer_bytes_mb is not None:
            _num("layer_bytes_mb", self.layer_bytes_mb, positive=True)

    def serves(self, start: int, end: int) -> bool:
        """True when one advertised range contains ``[start, end)``."""
        return any(a <= start and end <= b for a, b in self.ranges)

    def capacity_layers(self) -> Optional[int]:
        return capacity_layers(self.free_memory_mb, self.layer_bytes_mb)


@dataclass(frozen=True)
class Hop:
    peer_id: str
    start: int
    end: int
    budget_ms: float  # this hop's share of the remote budget
    expected_ms: float  # compute_ms + transfer_ms
    compute_ms: float = 0.0
    transfer_ms: float = 0.0

    @property
    def n_layers(self) -> int:
        return self.end - self.start

    @property
    def slack_ms(self) -> float:
        return self.budget_ms - self.expected_ms


@dataclass(frozen=True)
class Plan:
    """A path over the remote range. ``mode``: "star", "chain" or "local" (no hops)."""

    hops: tuple[Hop, ...]
    expected_ms: float  # remote time per token (sum over hops)
    slack_ms: float  # budget_ms - expected_ms
    mode: str
    budget_ms: float = 0.0  # max(0, target_tbt_ms - local_ms)
    local_ms: float = 0.0
    target_tbt_ms: float = 0.0
    start: int = 0  # the remote range this plan covers
    end: int = 0

    @property
    def meets_target(self) -> bool:
        return self.slack_ms >= 0

    @property
    def expected_tbt_ms(self) -> float:
        return self.local_ms + self.expected_ms

    @property
    def peer_ids(self) -> tuple[str, ...]:
        return tuple(h.peer_id for h in self.hops)


@dataclass(frozen=True)
class PlannerConfig:
    """Scoring knobs. A hop's score is ``expected * (1 + reputation_weight * (1 - rep))
    * weight + hop_penalty_ms``; unknown reputation counts as ``unknown_reputation``.
    ``weight`` is 1 unless ``plan_path`` gets a ``request_key`` (``spread.peer_weights``):
    ``spread`` draws each peer's ``1 + spread * u`` per request (load spread), and on the
    ``trial_share`` of trial-eligible requests newcomers (reputation None) weigh ``trial_weight``."""

    hop_penalty_ms: float = 0.5
    reputation_weight: float = 0.25
    unknown_reputation: float = 0.5
    spread: float = 0.0
    trial_share: float = 0.0
    trial_weight: float = 0.25

    def __post_init__(self) -> None:
        _num("hop_penalty_ms", self.hop_penalty_ms)
        _num("reputation_weight", self.reputation_weight)
        _num("spread", self.spread)
        for name in ("unknown_reputation", "trial_share", "trial_weight"):
            if not 0.0 <= _num(name, getattr(self, name)) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1]")


def hop_cost(peer: PeerCapability, start: int, end: int, mode: str, path: LayerRange) -> tuple[float, float]:
    """(compute_ms, transfer_ms) of ``peer`` running ``[start, end)`` on a path over ``path``.

    star: the client sends to and hears from every hop: one RTT per hop.
    chain: client -> first hop -> ... -> last hop -> client. Hop-to-hop latency is
    unknown, so a link between peers i, j is taken as (rtt_i + rtt_j) / 4 (the mean of
    their one-way latencies to the client). Each hop thus pays rtt/2, plus rtt/4 if it
    is the first hop and rtt/4 if it is the last (a single hop pays one RTT, as in star).
    """
    compute = float(peer.ms_per_layer) * (end - start)
    if mode == "star":
        return compute, float(peer.rtt_ms)
    ends = (start == path[0]) + (end == path[1])
    return compute, peer.rtt_ms * (0.5 + 0.25 * ends)


_Key = tuple[float, int, tuple[str, ...], tuple[int, ...]]  # score, hops, ids, hop ends


class _Candidate:
    __slots__ = ("peer", "ranges", "cap")

    def __init__(self, peer: PeerCapability, ranges: list[LayerRange], cap: Optional[int]) -> None:
        self.peer, self.ranges, self.cap = peer, ranges, cap


def _route(lo: int, hi: int, path: LayerRange, cands: list[_Candidate], mode: str, cfg: PlannerConfig,
           weights: dict[str, float], tracked: tuple[str, ...] = ()):
    """Best (key, [(peer_id, a, b)]) over ``[lo, hi)``, or None: a DP over layer boundaries.

    ``tracked`` peers have their layers summed in the DP state, so their memory holds
    over all their hops together (exact; the state grows with their capacities).
    """
    slot = {pid: i for i, pid in enumerate(tracked)}
    states: list[dict[tuple[int, ...], _Key]] = [{} for _ in range(hi - lo + 1)]
    states[0][(0,) * len(tracked)] = (0.0, 0, (), ())
    factors = [(1.0 + cfg.reputation_weight * (1.0 - (cfg.unknown_reputation if c.peer.reputation is None
                                                      else c.peer.reputation))) * weights.get(c.peer.peer_id, 1.0)
               for c in cands]
    for a in range(lo, hi):
        for usage, cur in states[a - lo].items():
            for c, factor in zip(cands, factors):
                t = slot.get(c.peer.peer_id)
                for s, e in c.ranges:
                    if not s <= a < e:
                        continue
                    top = min(e, hi) if c.cap is None else min(e, hi, a + c.cap - (usage[t] if t is not None else 0))
                    for b in range(a + 1, top + 1):
                        comp, tran = hop_cost(c.peer, a, b, mode, path)
                        key = (cur[0] + (comp + tran) * factor + cfg.hop_penalty_ms, cur[1] + 1,
                               cur[2] + (c.peer.peer_id,), cur[3] + (b,))
                        nu = usage if t is None else usage[:t] + (usage[t] + b - a,) + usage[t + 1:]
                        old = states[b - lo].get(nu)
                        if old is None or key < old:
                            states[b - lo][nu] = key
    if not states[hi - lo]:
        return None
    final = min(states[hi - lo].values())
    starts = (lo,) + final[3][:-1]
    return final, list(zip(final[2], starts, final[3]))


def _candidates(peers: Sequence[PeerCapability], lo: int, hi: int, banned: Collection[str],
                used: dict[str, int], only: dict[str, Optional[LayerRange]]) -> list[_Candidate]:
    out = []
    for p in sorted(peers, key=lambda p: p.peer_id):
        if p.peer_id in banned:
            continue
        cap = p.capacity_layers()
        if cap is not None:
            cap -= used.get(p.peer_id, 0)
            if cap <= 0:
                continue
        ranges = p.ranges
        if p.peer_id in only:
            r = only[p.peer_id]
            if r is None:
                continue
            ranges = (r,)
        clipped = [(max(a, lo), min(b, hi)) for a, b in ranges if max(a, lo) < min(b, hi)]
        if clipped:
            out.append(_Candidate(p, clipped, cap))
    return out


def _uncovered(lo: int, hi: int, cands: list[_Candidate]) -> list[LayerRange]:
    covered = [False] * (hi - lo)
    for c in cands:
        for a, b in c.ranges:
            for i in range(a, b):
                covered[i - lo] = True
    runs: list[LayerRange] = []
    for i, ok in enumerate(covered):
        if not ok:
            if runs and runs[-1][1] == lo + i:
                runs[-1] = (runs[-1][0], lo + i + 1)
            else:
                runs.append((lo + i, lo + i + 1))
    return runs


_MAX_WORK = 2_000_000  # DP edge relaxations allowed for exact memory tracking


def _route_with_memory(peers, lo, hi, path, banned, used, mode, cfg, weights):
    """Route; while some peer's hops together exceed its memory, track that peer's layer
    sum in the DP state (exact). Past ``_MAX_WORK``, repair greedily instead: pin the
    peer to one of its hops' ranges, or drop it, whichever routes best."""
    only: dict[str, Optional[LayerRange]] = {}
    cands = _candidates(peers, lo, hi, banned, used, only)
    missing = _uncovered(lo, hi, cands)
    if missing:
        raise NoRouteError(missing, _why_missing(peers, missing, banned))
    caps = {c.peer.peer_id: c.cap for c in cands}
    edges = sum(min(e - s, c.cap or e - s) * (e - s) for c in cands for s, e in c.ranges)
    tracked: tuple[str, ...] = ()
    result = _route(lo, hi, path, cands, mode, cfg, weights)
    for _ in range(2 * len(cands) + 1):
        if result is None:
            break
        totals: dict[str, list[LayerRange]] = {}
        for pid, a, b in result[1]:
            totals.setdefault(pid, []).append((a, b))
        over = [pid for pid, rs in sorted(totals.items())
                if caps[pid] is not None and sum(b - a for a, b in rs) > caps[pid]]
        if not over:
            return result[1]
        pid = over[0]
        if not only and edges * math.prod(caps[t] + 1 for t in tracked + (pid,)) <= _MAX_WORK:
            tracked += (pid,)
            result = _route(lo, hi, path, cands, mode, cfg, weights, tracked)
            continue
        options = []
        for pin in totals[pid] + [None]:
            trial = dict(only, **{pid: pin})
            r = _route(lo, hi, path, _candidates(peers, lo, hi, banned, used, trial), mode, cfg, weights)
            if r is not None:
                options.append((r[0], pin is None, pin or (0, 0), r, trial))
        if not options:
            break
        _, _, _, result, only = min(options, key=lambda o: o[:3])
    raise NoRouteError([(lo, hi)], what="not enough free memory among peers serving")


def _why_missing(peers: Sequence[PeerCapability], missing: list[LayerRange], banned: Collection[str]) -> str:
    def hits(p: PeerCapability) -> bool:
        return any(a < y and x < b for a, b in p.ranges for x, y in missing)

    excl = sorted(p.peer_id for p in peers if p.peer_id in banned and hits(p))
    short = sorted(p.peer_id for p in peers if p.peer_id not in banned and hits(p))
    parts = ([f"excluded: {', '.join(excl)}"] if excl else []) + (
        [f"short of memory: {', '.join(short)}"] if short else [])
    return "; ".join(parts)


def _build(hops: list[tuple[str, int, int]], peers_by_id: dict[str, PeerCapability], mode: str,
           lo: int, hi: int, budget: float, local_ms: float, target: float) -> Plan:
    costs = [hop_cost(peers_by_id[pid], a, b, mode, (lo, hi)) for pid, a, b in hops]
    expected = [c + t for c, t in costs]
    budgets = split_budget(budget, expected, [b - a for _, a, b in hops])
    out = tuple(Hop(pid, a, b, bud, exp, c, t)
                for (pid, a, b), bud, exp, (c, t) in zip(hops, budgets, expected, costs))
    total = math.fsum(expected)
    return Plan(out, total, budget - total, mode, budget, local_ms, target, lo, hi)


def _replan_gaps(previous: Plan, peers: Sequence[PeerCapability], peers_by_id: dict[str, PeerCapability],
                 excluded: set[str], replace_hops: set[int], use_mode: str, cfg: PlannerConfig,
                 weights: dict[str, float]) -> list[tuple[str, int, int]]:
    """Keep the previous plan's healthy hops; route each maximal run of dropped hops anew."""
    lo, hi = previous.start, previous.end
    keep: list[bool] = []
    for i, h in enumerate(previous.hops):
        p = peers_by_id.get(h.peer_id)
        keep.append(i not in replace_hops and p is not None and h.peer_id not in excluded
                    and p.serves(h.start, h.end))
    # segments: kept hops as (peer_id, a, b); maximal runs of dropped hops as (None, a, b, banned)
    segments: list[tuple] = []
    for i, h in enumerate(previous.hops):
        if keep[i]:
            segments.append((h.peer_id, h.start, h.end))
            continue
        banned = excluded | ({h.peer_id} if i in replace_hops else set())
        if segments and segments[-1][0] is None:
            segments[-1] = (None, segments[-1][1], h.end, segments[-1][3] | banned)
        else:
            segments.append((None, h.start, h.end, banned))
    missing: list[LayerRange] = []  # check every gap first, so the error names them all
    for seg in segments:
        if seg[0] is None:
            missing += _uncovered(seg[1], seg[2], _candidates(peers, seg[1], seg[2], seg[3], {}, {}))
    if missing:
        all_banned = set().union(*(seg[3] for seg in segments if seg[0] is None))
        raise NoRouteError(missing, _why_missing(peers, missing, all_banned))
    hops: list[tuple[str, int, int]] = []
    used: dict[str, int] = {}  # layers charged by earlier gaps (kept hops hold theirs already)
    for seg in segments:
        if seg[0] is not None:
            hops.append(seg)
            continue
        for pid, x, y in _route_with_memory(peers, seg[1], seg[2], (lo, hi), seg[3], used, use_mode, cfg, weights):
            hops.append((pid, x, y))
            used[pid] = used.get(pid, 0) + (y - x)
    return hops


def plan_path(
    n_layer: int,
    policy: PrivacyPolicy,
    peers: Sequence[PeerCapability],
    *,
    target_tbt_ms: float,
    local_ms: float = 0.0,
    previous: Optional[Plan] = None,
    exclude: Collection[str] = (),
    replace_hops: Collection[int] = (),
    mode: Mode = "auto",
    config: Optional[PlannerConfig] = None,
    request_key: Optional[bytes] = None,
    trial_eligible: bool = False,
) -> Plan:
    """Choose the hops that run ``policy.remote_range(n_layer)`` and their deadline budgets.

    ``previous``: the request's current plan; its hops are kept unless their peer is
    excluded, gone or no longer serves the range, or their index is in ``replace_hops``
    (a late hop: its peer is not reused for that gap). Only the gaps are re-planned, in
    the previous plan's mode. ``mode="auto"`` picks star or chain, whichever expects less.
    ``request_key`` (the request id) turns on ``config.spread`` and, when the caller says
    the request is not latency-critical (``trial_eligible``), newcomer trials on
    ``config.trial_share`` of requests; a trial plan that misses the target is dropped for
    the plan without it. Raises NoRouteError naming the layers nobody can take.
    """
    cfg = config or PlannerConfig()
    if not isinstance(policy, PrivacyPolicy):
        raise PolicyError("policy must be a PrivacyPolicy")
    lo, hi = policy.remote_range(n_layer)
    target = _num("target_tbt_ms", target_tbt_ms)
    local = _num("local_ms", local_ms)
    if mode not in ("star", "chain", "auto"):
        raise ValueError(f"mode must be 'star', 'chain' or 'auto', got {mode!r}")
    peers_by_id: dict[str, PeerCapability] = {}
    for p in peers:
        if p.peer_id in peers_by_id:
            raise ValueError(f"duplicate peer id {p.peer_id!r}")
        peers_by_id[p.peer_id] = p
    budget = max(0.0, target - local)
    if lo == hi:
        return Plan((), 0.0, budget, "local", budget, local, target, lo, hi)
    excluded = set(exclude)
    if previous is not None and previous.hops:
        if (previous.start, previous.end) != (lo, hi):
            raise ValueError(f"previous plan covers [{previous.start}, {previous.end}), not [{lo}, {hi})")
        bad = [i for i in replace_hops if not 0 <= i < len(previous.hops)]
        if bad:
            raise ValueError(f"replace_hops {bad} out of range for {len(previous.hops)} hops")
    if request_key is not None and not isinstance(request_key, bytes):
        raise ValueError("request_key must be bytes (the request id) or None")

    def attempt(trial: bool) -> Plan:
        weights = peer_weights([(p.peer_id, p.reputation) for p in peers], request_key, cfg.spread, trial,
                               cfg.trial_weight)
        if previous is not None and previous.hops:
            use_mode = previous.mode if mode == "auto" else mode
            hops = _replan_gaps(previous, peers, peers_by_id, excluded, set(replace_hops), use_mode, cfg, weights)
            return _build(hops, peers_by_id, use_mode, lo, hi, budget, local, target)
        plans = []
        for m in (("star", "chain") if mode == "auto" else (mode,)):
            hops = _route_with_memory(peers, lo, hi, (lo, hi), excluded, {}, m, cfg, weights)
            plans.append(_build(hops, peers_by_id, m, lo, hi, budget, local, target))
        return min(plans, key=lambda pl: (pl.expected_ms, len(pl.hops)))  # stable: star wins ties

    trial = (trial_eligible and is_trial(request_key, cfg.trial_share)
             and any(p.reputation is None and p.peer_id not in excluded for p in peers))
    if trial:
        plan = attempt(True)
        if plan.meets_target:
            return plan
    return attempt(False)


def has_alternative(plan: Plan, hop_index: int, peers: Sequence[PeerCapability], exclude: Collection[str] = ()) -> bool:
    """True when peers other than the hop's own (and not excluded) can cover its range."""
    hop = plan.hops[hop_index]
    banned = set(exclude) | {hop.peer_id}
    cands = _candidates(peers, hop.start, hop.end, banned, {}, {})
    return not _uncovered(hop.start, hop.end, cands)
