"""The privacy split: which decoder layers never leave the client.

The client always keeps the token embedding, the first ``k`` decoder layers, the last
``m`` decoder layers, the final norm, the LM head and sampling. Raw token ids therefore
never leave the device (peers only see hidden states after ``k`` layers) and neither do
logits (peers stop ``m`` layers before the head). Only ``[k, n_layer - m)`` may run
remotely; when ``k + m == n_layer`` that range is empty and the whole model runs locally.

A request carries its policy object (``for_level``: the user's ``--privacy`` choice):
``open`` routes to any peer of the swarm, ``trusted`` only to the peers in ``trusted`` (the
allow-list, ``discovery.trust``) and fails rather than route elsewhere, ``local`` admits no
peer: the middle layers run on this device too, no activation is sent anywhere. What a peer can still recover from the hidden states it sees is
measured in docs/privacy.md: nearly everything.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

LayerRange = tuple[int, int]  # half-open [start, end) in the source model's numbering


PRIVACY_LEVELS = ("open", "trusted", "local")


class PolicyError(ValueError):
    """The policy is malformed or cannot apply to a model of this depth."""


def _check_int(name: str, value: object, minimum: int) -> int:
    # bool is an int subclass; True as a layer count is a bug, not a 1.
    if isinstance(value, bool) or not isinstance(value, int):
        raise PolicyError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise PolicyError(f"{name} must be >= {minimum}, got {value}")
    return value


@dataclass(frozen=True)
class PrivacyPolicy:
    """How many decoder layers the client keeps at each end of the model.

    ``k``: first layers kept locally (>= 1, so token ids never leave the client).
    ``m``: last layers kept locally (>= 1, so logits never leave the client).
    ``name``: label of the policy (a seam for the next wave's policies).
    ``allow_remote``: False forces the whole model to run locally.
    ``trusted``: the only peer ids that may see activations (None: any peer of the swarm).
    """

    k: int = 1
    m: int = 1
    name: str = "split"
    allow_remote: bool = True
    trusted: frozenset[str] | None = None

    @classmethod
    def for_level(cls, level: str, k: int = 1, m: int = 1, trusted: Iterable[str] | None = None) -> "PrivacyPolicy":
        """The policy of ``--privacy level``; ``trusted``: the allow-list (None under ``trusted``:
        every peer that passed the private swarm's handshake)."""
        if level == "open":
            return cls(k, m, name="open")
        if level == "trusted":
            return cls(k, m, name="trusted", trusted=None if trusted is None else frozenset(trusted))
        if level == "local":  # no peer admitted: the middle layers run on this device (split.local)
            return cls(k, m, name="local", trusted=frozenset())
        raise PolicyError(f"--privacy must be one of {', '.join(PRIVACY_LEVELS)}, got {level!r}")

    def admits(self, peer_id: str) -> bool:
        """May ``peer_id`` see this request's activations?"""
        return self.allow_remote and (self.trusted is None or peer_id in self.trusted)

    @property
    def strict(self) -> bool:
        """A request that cannot be routed within the policy fails (no local fallback, which would
        hide that the policy's peers are missing)."""
        return self.name == "trusted"

    def __post_init__(self) -> None:
        _check_int("k", self.k, 1)
        _check_int("m", self.m, 1)
        if not isinstance(self.name, str) or not self.name:
            raise PolicyError("name must be a non-empty string")
        if not isinstance(self.allow_remote, bool):
            raise PolicyError("allow_remote must be a bool")
        if self.trusted is not None and not (isinstance(self.trusted, frozenset) and all(isinstance(p, str) for p in self.trusted)):
            raise PolicyError("trusted must be a frozenset of peer ids or None")

    def validate(self, n_layer: int) -> None:
        """Raise PolicyError unless this policy fits a model with ``n_layer`` layers."""
        _check_int("n_layer", n_layer, 1)
        if self.k + self.m > n_layer:
            raise PolicyError(
                f"policy keeps k={self.k} + m={self.m} layers locally, "
                f"but the model has only {n_layer} decoder layers"
            )

    def client_ranges(self, n_layer: int) -> tuple[LayerRange, LayerRange]:
        """The client's (head, tail) layer ranges: ``[0, k)`` and ``[n_layer - m, n_layer)``."""
        self.validate(n_layer)
        return (0, self.k), (n_layer - self.m, n_layer)

    def remote_range(self, n_layer: int) -> LayerRange:
        """``[k, n_layer - m)``: the layers peers may run. Empty (start == end) means none."""
        self.validate(n_layer)
        if not self.allow_remote:
            return (self.k, self.k)
        return (self.k, n_layer - self.m)

    def is_local_only(self, n_layer: int) -> bool:
        """True when no layer may run remotely, so the client runs the whole model."""
        start, end = self.remote_range(n_layer)
        return start == end

    def local_ranges(self, n_layer: int) -> tuple[LayerRange, ...]:
        """Every range the client runs itself (one ``(0, n_layer)`` when local-only)."""
        if self.is_local_only(n_layer):
            return ((0, n_layer),)
        return self.client_ranges(n_layer)


def request_policy(default: PrivacyPolicy, level: str | None,
                   policy_for: Callable[[str], PrivacyPolicy] | None = None) -> PrivacyPolicy:
    """The policy of one request at ``level`` (None: the default's): it may tighten the client's
    ``default`` (open < trusted < local), never loosen it; PolicyError otherwise. ``policy_for``
    resolves a level with the client's k and m (the trust list read per request); without it a
    request can only keep the default or go local."""
    if level is None and (policy_for is None or default.name not in PRIVACY_LEVELS):
        return default
    level = level or default.name
    if level not in PRIVACY_LEVELS:
        raise PolicyError(f"privacy must be one of {', '.join(PRIVACY_LEVELS)}, got {level!r}")
    if default.name in PRIVACY_LEVELS and PRIVACY_LEVELS.index(level) < PRIVACY_LEVELS.index(default.name):
        raise PolicyError(f"privacy {level!r} would loosen this agent's {default.name!r}: "
                          f"a request may only tighten it ({' < '.join(PRIVACY_LEVELS)})")
    if policy_for is not None:
        return policy_for(level)
    if level == default.name or (level == "open" and default.allow_remote and default.trusted is None):
        return default
    if level == "local":
        return PrivacyPolicy.for_level("local", default.k, default.m)
    raise PolicyError(f"privacy {level!r} needs a trust list, which this client was not given")
