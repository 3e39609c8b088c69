"""Knobs that make a node misbehave on purpose, so tests can cause failures that a healthy
node never shows (a slow node, one that over-promises, one that lies about its model).

They live in one object, and a node refuses them unless the process runs with
``EDGE_AGENT_TEST_HOOKS=1``: a user cannot turn a node into a liar by mistake.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields

ENABLE_ENV = "EDGE_AGENT_TEST_HOOKS"


@dataclass(frozen=True)
class TestHooks:
    __test__ = False  # not a pytest test class

    delay_ms: float = 0.0  # sleep this long before each compute round (a slow node)
    advertise_ms: float | None = None  # advertise this ms per layer instead of the measured one
    claim_model_hash: str | None = None  # advertise this model hash (a node with tampered weights)

    @property
    def active(self) -> bool:
        return any(getattr(self, f.name) != f.default for f in fields(self))

    def check_enabled(self) -> None:
        """Raise ValueError when a hook is set but tests did not enable hooks."""
        if self.active and os.environ.get(ENABLE_ENV) != "1":
            raise ValueError(f"--test-* options are for the test suite only (set {ENABLE_ENV}=1 to allow them)")
