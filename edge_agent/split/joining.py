"""Where a joining node should serve: pure, like the planner (no I/O).

A node started without ``--layers`` loads the span the swarm serves least (Petals' rule),
as much of it as its memory holds.
"""

from __future__ import annotations

from typing import Sequence

from .planner import PeerCapability
from .policy import LayerRange, PolicyError, PrivacyPolicy


def coverage(n_layer: int, peers: Sequence[PeerCapability]) -> list[int]:
    """How many distinct peers serve each layer ``0 .. n_layer - 1``."""
    counts = [0] * n_layer
    for p in peers:
        served = set()
        for a, b in p.ranges:
            served.update(range(max(0, a), min(b, n_layer)))
        for i in served:
            counts[i] += 1
    return counts


def choose_range_to_serve(
    n_layer: int, policy: PrivacyPolicy, existing_peers: Sequence[PeerCapability], my_capacity_layers: int
) -> LayerRange:
    """The span a joining node should load: as many layers as it can hold (at most the
    remote range), placed where the swarm is weakest. Like Petals, windows are compared
    by their sorted per-layer coverage counts (fewest-served layer first); ties go to
    the lowest start."""
    lo, hi = policy.remote_range(n_layer)
    if lo == hi:
        raise PolicyError("the policy leaves no remote layers to serve")
    if isinstance(my_capacity_layers, bool) or not isinstance(my_capacity_layers, int) or my_capacity_layers < 1:
        raise ValueError(f"my_capacity_layers must be an int >= 1, got {my_capacity_layers!r}")
    width = min(my_capacity_layers, hi - lo)
    counts = coverage(n_layer, existing_peers)[lo:hi]
    best = min(range(0, hi - lo - width + 1), key=lambda i: (sorted(counts[i:i + width]), i))
    return lo + best, lo + best + width
