"""What one request asks of the peers planned for it, besides its privacy policy: the key of
the planner's draws, whether its steps speculate, whether newcomers may be tried on it.

Why a context variable: ``strategy.Router`` re-plans and re-links a request after a failure
with its policy alone (``plan(policy, previous=, exclude=, replace_hops=)``, ``link(peer,
policy)``). The request's needs ride in the task that runs it, so its re-routes and replays
obey them as its first plan did: a speculating request never sends a step with REWIND or
DRAFT to a node that does not advertise them (an older node refuses unknown flags, which
would read as a failure and cost a re-route).
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

from edge_agent.split.joining import coverage
from edge_agent.split.planner import PeerCapability


@dataclass(frozen=True)
class RequestNeeds:
    key: bytes | None = None  # the request id: the planner's spread and trial draws (split.spread)
    speculates: bool = False  # its steps carry REWIND/DRAFT: only peers that serve them
    batch: bool = False  # not latency-critical: its first plan may try staked newcomers


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


def admit(caps: Sequence[PeerCapability], needs: RequestNeeds, speculates: Callable[[str], bool]) -> list[PeerCapability]:
    """The peers a request with ``needs`` may be planned over."""
    return [c for c in caps if speculates(c.peer_id)] if needs.speculates else list(caps)


def speculation_loses_layers(remote: tuple[int, int], caps: Sequence[PeerCapability],
                             speculates: Callable[[str], bool]) -> list[str]:
    """The peers that alone serve some layer of the ``remote`` range among ``caps`` and do not
    serve speculative steps (empty: a speculating request can be planned wherever a plain one can)."""
    lo, hi = remote
    able = coverage(hi, [c for c in caps if speculates(c.peer_id)])
    lost = [i for i, n in enumerate(coverage(hi, caps)) if i >= lo and n and not able[i]]
    return sorted({c.peer_id for c in caps if not speculates(c.peer_id)
                   and any(a <= i < b for a, b in c.ranges for i in lost)})
