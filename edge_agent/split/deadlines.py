"""Deadline budgets and slack for split inference; pure state, no I/O, no clock.

A request's target time-between-tokens minus the client's own local time is the
*remote budget* of one decode step. It is split over the hops in proportion to their
expected time (``split_budget``); ``slack = budget - expected``. During a step the time
upstream hops actually took moves the downstream deadlines (``step_budgets``): what is
left of the remote budget is shared by the remaining hops in proportion to their
planned budgets, so an early hop hands its spare time on and a late one takes it from
the hops after it. ``DeadlineTracker`` is fed observed per-hop milliseconds each step,
records slack and misses, and says which hop should be replaced. See README.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Collection, Optional, Sequence

if TYPE_CHECKING:  # planner imports this module; avoid a runtime cycle
    from .planner import Plan


def _finite_nonneg(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {type(value).__name__}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be finite and >= 0, got {value}")
    return float(value)


def split_budget(total_ms: float, expected_ms: Sequence[float], layers: Sequence[int]) -> list[float]:
    """Share ``total_ms`` over hops in proportion to their expected time.

    Falls back to layer counts when every hop expects 0 ms. The last share is
    ``total - sum(others)`` so the shares add up to the total (up to float rounding).
    """
    _finite_nonneg("total_ms", total_ms)
    if len(expected_ms) != len(layers):
        raise ValueError("expected_ms and layers must have the same length")
    n = len(expected_ms)
    if n == 0:
        return []
    weights = [float(e) for e in expected_ms]
    if math.fsum(weights) <= 0:
        weights = [float(max(1, n_l)) for n_l in layers]
    total_w = math.fsum(weights)
    shares = [total_ms * w / total_w for w in weights[:-1]]
    shares.append(max(0.0, total_ms - math.fsum(shares)))
    return shares


def step_budgets(planned_ms: Sequence[float], observed_ms: Sequence[Optional[float]] = ()) -> list[float]:
    """This step's deadline budget of every hop, given what the upstream hops took.

    Hop ``i`` gets ``(B - sum(observed[:i])) * planned[i] / sum(planned[i:])``, floored at
    0, where ``B = sum(planned)``. A hop not observed yet (index >= len(observed)) or
    observed as ``None`` (no answer) is counted as having used its whole step budget.
    With every upstream hop exactly on its planned budget the budgets are the planned ones.
    """
    if len(observed_ms) > len(planned_ms):
        raise ValueError("more observations than hops")
    total = math.fsum(planned_ms)
    used = 0.0
    out: list[float] = []
    for i, planned in enumerate(planned_ms):
        remaining_planned = math.fsum(planned_ms[i:])
        remaining = max(0.0, total - used)
        if i == len(planned_ms) - 1:
            budget = remaining
        elif remaining_planned > 0:
            budget = remaining * planned / remaining_planned
        else:
            budget = 0.0
        out.append(budget)
        obs = observed_ms[i] if i < len(observed_ms) else None
        used += budget if obs is None else obs
    return out


@dataclass(frozen=True)
class DeadlineConfig:
    """When the tracker advises replacing a hop.

    ``overrun_factor``/``overrun_ms``: replace at once when a hop took more than
    ``planned_budget * (1 + overrun_factor) + overrun_ms``.
    ``negative_steps``: replace when a hop's own slack (planned budget - observed) was
    negative this many steps in a row and an alternative peer exists.
    """

    overrun_factor: float = 1.0
    overrun_ms: float = 0.0
    negative_steps: int = 3

    def __post_init__(self) -> None:
        _finite_nonneg("overrun_factor", self.overrun_factor)
        _finite_nonneg("overrun_ms", self.overrun_ms)
        if isinstance(self.negative_steps, bool) or not isinstance(self.negative_steps, int):
            raise ValueError("negative_steps must be an int")
        if self.negative_steps < 1:
            raise ValueError(f"negative_steps must be >= 1, got {self.negative_steps}")


@dataclass(frozen=True)
class HopStepRecord:
    """One hop in one step. ``slack_ms`` is against this step's (shifted) budget;
    ``own_slack_ms`` against the hop's planned budget (used for blame)."""

    hop_index: int
    peer_id: str
    start: int
    end: int
    planned_budget_ms: float
    budget_ms: float
    observed_ms: Optional[float]  # None: no answer by the deadline
    slack_ms: Optional[float]
    own_slack_ms: Optional[float]
    missed: bool


@dataclass(frozen=True)
class ReplaceAdvice:
    """Replace this hop. ``reason``: "no_response", "overrun" or "negative_slack"."""

    hop_index: int
    peer_id: str
    start: int
    end: int
    reason: str


@dataclass(frozen=True)
class StepReport:
    step: int
    hops: tuple[HopStepRecord, ...]
    budget_ms: float  # the whole remote budget of the step
    total_ms: float  # observed remote time (a silent hop counts its step budget)
    slack_ms: float  # budget_ms - total_ms
    missed: bool  # total over budget, or a hop did not answer
    replace: tuple[ReplaceAdvice, ...]


@dataclass(frozen=True)
class HopTelemetry:
    hop_index: int
    peer_id: str
    start: int
    end: int
    planned_budget_ms: float
    expected_ms: float
    steps: int
    misses: int
    no_response: int
    last_ms: Optional[float]
    mean_ms: Optional[float]
    max_ms: Optional[float]
    last_slack_ms: Optional[float]
    min_slack_ms: Optional[float]
    negative_streak: int


@dataclass(frozen=True)
class DeadlineTelemetry:
    steps: int
    step_misses: int
    budget_ms: float
    expected_ms: float
    last_total_ms: Optional[float]
    mean_total_ms: Optional[float]
    max_total_ms: Optional[float]
    hops: tuple[HopTelemetry, ...]


class _HopCounters:
    """Running counters of one hop (kept across a replan while the hop is unchanged)."""

    def __init__(self) -> None:
        self.steps = 0
        self.misses = 0
        self.no_response = 0
        self.answered = 0
        self.sum_ms = 0.0
        self.max_ms: Optional[float] = None
        self.last_ms: Optional[float] = None
        self.last_slack: Optional[float] = None
        self.min_slack: Optional[float] = None
        self.negative_streak = 0


class DeadlineTracker:
    """Per-request deadline bookkeeping across decode steps (pure; the caller times hops)."""

    def __init__(self, plan: "Plan", config: Optional[DeadlineConfig] = None) -> None:
        self.config = config or DeadlineConfig()
        self.step = 0
        self._step_misses = 0
        self._totals_sum = 0.0
        self._last_total: Optional[float] = None
        self._max_total: Optional[float] = None
        self._plan = plan
        self._hops = [_HopCounters() for _ in plan.hops]

    @property
    def plan(self) -> "Plan":
        return self._plan

    def adopt(self, plan: "Plan") -> None:
        """Switch to a replanned path; hops with the same (peer, start, end) keep their history."""
        old = {(h.peer_id, h.start, h.end): st for h, st in zip(self._plan.hops, self._hops)}
        self._hops = [old.get((h.peer_id, h.start, h.end)) or _HopCounters() for h in plan.hops]
        self._plan = plan

    def observe(
        self, observed_ms: Sequence[Optional[float]], alternatives: Collection[int] = ()
    ) -> StepReport:
        """Record one step: the milliseconds each hop took (``None``: it never answered).

        ``alternatives``: indexes of hops for which another peer could take over
        (see ``planner.has_alternative``); negative-slack replacement needs one.
        """
        hops = self._plan.hops
        if len(observed_ms) != len(hops):
            raise ValueError(f"expected {len(hops)} observations, got {len(observed_ms)}")
        for i, obs in enumerate(observed_ms):
            if obs is not None:
                _finite_nonneg(f"observed_ms[{i}]", obs)
        cfg = self.config
        budgets = step_budgets([h.budget_ms for h in hops], observed_ms)
        records: list[HopStepRecord] = []
        advice: list[ReplaceAdvice] = []
        for i, (hop, obs, budget) in enumerate(zip(hops, observed_ms, budgets)):
            st = self._hops[i]
            st.steps += 1
            if obs is None:
                slack = own = None
                missed = True
                st.no_response += 1
                st.negative_streak += 1
            else:
                obs = float(obs)
                slack, own = budget - obs, hop.budget_ms - obs
                missed = slack < 0
                st.answered += 1
                st.sum_ms += obs
                st.last_ms = obs
                st.max_ms = obs if st.max_ms is None else max(st.max_ms, obs)
                st.last_slack = own
                st.min_slack = own if st.min_slack is None else min(st.min_slack, own)
                st.negative_streak = st.negative_streak + 1 if own < 0 else 0
            st.misses += int(missed)
            records.append(
                HopStepRecord(i, hop.peer_id, hop.start, hop.end, hop.budget_ms, budget, obs, slack, own, missed)
            )
            reason = None
            if obs is None:
                reason = "no_response"
            elif obs > hop.budget_ms * (1.0 + cfg.overrun_factor) + cfg.overrun_ms:
                reason = "overrun"
            elif st.negative_streak >= cfg.negative_steps and i in alternatives:
                reason = "negative_slack"
            if reason is not None:
                advice.append(ReplaceAdvice(i, hop.peer_id, hop.start, hop.end, reason))
        total = math.fsum(b if o is None else o for o, b in zip(observed_ms, budgets))
        budget_total = self._plan.budget_ms
        missed_step = total > budget_total or any(o is None for o in observed_ms)
        self.step += 1
        self._step_misses += int(missed_step)
        self._totals_sum += total
        self._last_total = total
        self._max_total = total if self._max_total is None else max(self._max_total, total)
        return StepReport(
            self.step - 1, tuple(records), budget_total, total, budget_total - total, missed_step, tuple(advice)
        )

    def telemetry(self) -> DeadlineTelemetry:
        """Plain numbers for dashboards and logs."""
        hops = []
        for i, (hop, st) in enumerate(zip(self._plan.hops, self._hops)):
            hops.append(
                HopTelemetry(
                    i, hop.peer_id, hop.start, hop.end, hop.budget_ms, hop.expected_ms,
                    st.steps, st.misses, st.no_response, st.last_ms,
                    st.sum_ms / st.answered if st.answered else None,
                    st.max_ms, st.last_slack, st.min_slack, st.negative_streak,
                )
            )
        return DeadlineTelemetry(
            self.step, self._step_misses, self._plan.budget_ms, self._plan.expected_ms,
            self._last_total, self._totals_sum / self.step if self.step else None,
            self._max_total, tuple(hops),
        )
