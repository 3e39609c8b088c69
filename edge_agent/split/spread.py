"""Per-request score weights for the planner: load spread over near-equal peers, and
trials that give newcomers (peers with no history yet) a bounded share of batch work.

Pure and deterministic: every draw is a hash of the request's key (its request id) and a
label, so a request plans the same path each time it is planned (re-plans, replays), two
clients with the same view plan the same for the same request, and different requests
spread. See README.md, "Spread and newcomer trials".
"""

from __future__ import annotations

import hashlib
from typing import Optional, Sequence


def unit_draw(request_key: bytes, label: str) -> float:
    """A uniform number in [0, 1) fixed by ``(request_key, label)``."""
    digest = hashlib.blake2b(request_key + b"\x00" + label.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


def is_trial(request_key: Optional[bytes], trial_share: float) -> bool:
    """True for about ``trial_share`` of request keys: the requests newcomers are tried on
    (when the caller says the request is not latency-critical)."""
    return request_key is not None and trial_share > 0.0 and unit_draw(request_key, "trial") < trial_share


def peer_weights(peer_ids_and_reputations: Sequence[tuple[str, Optional[float]]], request_key: Optional[bytes],
                 spread: float, trial: bool, trial_weight: float) -> dict[str, float]:
    """Multipliers on each peer's hop score for one request (peers not named: 1.0).

    ``spread``: ``1 + spread * u`` with ``u`` the request's own uniform draw for that peer,
    so a peer at most ``spread`` worse than the best still wins some requests and clients
    holding the same stale view do not all pile on the same near-best peer.
    ``trial``: newcomers (reputation None) score ``trial_weight * u`` of their cost, so the
    path takes them wherever they serve (the caller checks the target still holds), and
    newcomers that overlap take turns from request to request rather than the same one
    always winning.
    """
    if request_key is None:
        return {}
    out: dict[str, float] = {}
    for peer_id, reputation in peer_ids_and_reputations:
        u = unit_draw(request_key, peer_id)
        if trial and reputation is None:
            out[peer_id] = trial_weight * u
        elif spread > 0.0:
            out[peer_id] = 1.0 + spread * u
    return out
