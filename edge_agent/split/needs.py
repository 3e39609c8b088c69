"""What one request asks of the peers planned for it, besides its privacy policy: the key of
the planner's draws, whether its steps speculate, whether newcomers may be tried on it, and
which peer on probation (if any) it may use (``ProbationQuota``).

Why a context variable: ``strategy.Router`` re-plans and re-links a request after a failure
with its policy alone (``plan(policy, previous=, exclude=, replace_hops=)``, ``link(peer,
policy)``). The request's needs ride in the task that runs it, so its re-routes and replays
obey them as its first plan did: a speculating request never sends a step with REWIND or
DRAFT to a node that does not advertise them (an older node refuses unknown flags, which
would read as a failure and cost a re-route).
"""

from __future__ import annotations

import random
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, replace
from typing import Callable, Iterator, Sequence

from edge_agent.split.joining import coverage
from edge_agent.split.planner import PeerCapability
from edge_agent.split.policy import LayerRange

# docs/discovery.md, "Rule for newcomers and Sybils" (the swarm simulation's values, bench/swarmsim/view.py)
PROBATION_SHARE = 0.10  # most of this client's batch layer-steps that peers on probation may serve
PROBATION_REPUTATION = 0.0  # what the planner is told of the one a batch request may use


@dataclass(frozen=True)
class RequestNeeds:
    key: bytes | None = None  # the request id: the planner's spread and trial draws (split.spread)
    speculates: bool = False  # its steps carry REWIND/DRAFT: only peers that serve them
    batch: bool = False  # not latency-critical: its first plan may try staked newcomers
    probation: str | None = None  # the one peer on probation this batch request may use (``ProbationQuota.pick``)
    probation_layers: int = 0  # that peer's remote layers: what each turn charges the quota per position


_CURRENT: ContextVar[RequestNeeds] = ContextVar("edge_agent_request_needs", default=RequestNeeds())


def current() -> RequestNeeds:
    """The needs of the request the running task serves (none outside a request)."""
    return _CURRENT.get()


@contextmanager
def serving(needs: RequestNeeds) -> Iterator[RequestNeeds]:
    """Run a request's code under ``needs`` (restored after, also on cancellation)."""
    token = _CURRENT.set(needs)
    try:
        yield needs
    finally:
        _CURRENT.reset(token)


def admit(caps: Sequence[PeerCapability], needs: RequestNeeds, speculates: Callable[[str], bool],
          on_probation: Callable[[str], bool]) -> list[PeerCapability]:
    """The peers a request with ``needs`` may be planned over: none on probation but its own
    pick, whose claims the planner weighs at ``PROBATION_REPUTATION``."""
    out = []
    for c in caps:
        if needs.speculates and not speculates(c.peer_id):
            continue
        if c.peer_id == needs.probation:
            out.append(replace(c, reputation=PROBATION_REPUTATION))
        elif not on_probation(c.peer_id):
            out.append(c)
    return out


def probation_peers(caps: Sequence[PeerCapability], needs: RequestNeeds, speculates: Callable[[str], bool],
                    on_probation: Callable[[str], bool], within: Sequence[LayerRange] | None = None) -> list[PeerCapability]:
    """The peers on probation among ``caps`` that serve what ``needs`` asks, but for the one the
    request picked (``admit`` has it), each cut to the layers it holds ``within`` those ranges
    (None: all of them)."""
    out = []
    for c in caps:
        if (needs.speculates and not speculates(c.peer_id)) or not on_probation(c.peer_id) or c.peer_id == needs.probation:
            continue
        ranges = c.ranges if within is None else tuple(
            (max(a, s), min(b, e)) for a, b in c.ranges for s, e in within if max(a, s) < min(b, e))
        if ranges:
            out.append(c if ranges == c.ranges else replace(c, ranges=ranges))
    return out


class ProbationQuota:
    """One client's account of the work it gives peers on probation (neither stake nor history:
    what a Sybil is), kept as the swarm simulation keeps it. A batch request gets at most one,
    drawn uniformly (their claims are what a Sybil lies about, so they are not ranked); its worst
    case, all its remote layers at every position the request may reach, is charged before the
    request runs, and the pick stands only while the charges stay within ``share`` of the batch
    layer-steps this client has had served (theirs included). So probation peers serve at most
    that share of this client's batch traffic, however many identities there are and whatever
    they claim. Layer-steps count positions (a rejected draft row is not one)."""

    def __init__(self, share: float = PROBATION_SHARE) -> None:
        self.share = share
        self.batch_layer_steps = 0  # remote layers x positions of this client's batch requests, as served
        self.probation_layer_steps = 0  # charged up front

    def charge(self, layer_steps: int) -> bool:
        """Charge a probation peer's worst case for one turn; False (nothing charged): over the quota."""
        if self.probation_layer_steps + layer_steps > self.share * (self.batch_layer_steps + layer_steps):
            return False
        self.probation_layer_steps += layer_steps
        return True

    def served(self, layer_steps: int) -> None:
        """A batch turn ended: the remote layer-steps it was served, by any peer."""
        self.batch_layer_steps += layer_steps

    def charge_turn(self, needs: RequestNeeds, positions: int) -> bool:
        """A kept request's next turn pays again for its peer on probation; False: no room left."""
        return needs.probation is None or self.charge(needs.probation_layers * positions)

    def pick(self, needs: RequestNeeds, candidates: Sequence[PeerCapability], remote: LayerRange,
             positions: int) -> RequestNeeds:
        """``needs`` with the probation peer a batch request may use, drawn from ``candidates`` and
        charged for ``positions``; unchanged when there is none or no room for the one drawn."""
        if not candidates:
            return needs
        chosen = random.Random(needs.key).choice(sorted(candidates, key=lambda c: c.peer_id))
        lo, hi = remote
        layers = sum(max(0, min(b, hi) - max(a, lo)) for a, b in chosen.ranges)
        if not layers or not self.charge(layers * positions):
            return needs
        return replace(needs, probation=chosen.peer_id, probation_layers=layers)


def speculation_loses_layers(remote: tuple[int, int], caps: Sequence[PeerCapability],
                             speculates: Callable[[str], bool]) -> list[str]:
    """The peers that alone serve some layer of the ``remote`` range among ``caps`` and do not
    serve speculative steps (empty: a speculating request can be planned wherever a plain one can)."""
    lo, hi = remote
    able = coverage(hi, [c for c in caps if speculates(c.peer_id)])
    lost = [i for i, n in enumerate(coverage(hi, caps)) if i >= lo and n and not able[i]]
    return sorted({c.peer_id for c in caps if not speculates(c.peer_id)
                   and any(a <= i < b for a, b in c.ranges for i in lost)})
