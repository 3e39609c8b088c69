"""Knobs that make a node misbehave on purpose, so tests can cause failures that a healthy
node never shows (a slow node, one that over-promises, one that lies about its model, one
that cheats on its results).

They live in one object, and a node refuses them unless the process runs with
``EDGE_AGENT_TEST_HOOKS=1`` (``EDGE_AGENT_TEST_FAULTS=1`` for ``fault``): a user cannot turn
a node into a liar by mistake.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, fields

import numpy as np

ENABLE_ENV = "EDGE_AGENT_TEST_HOOKS"
FAULTS_ENV = "EDGE_AGENT_TEST_FAULTS"
# downgrade and skip-layer compute with another engine (node.py loads it); the others change outputs
FAULTS = ("downgrade", "skip-layer", "stale", "noise", "garbage")
OUTPUT_FAULTS = ("stale", "noise", "garbage")  # these take KIND@POSITION: honest before that position
HONEST_LEVEL = 0.012  # relative RMS of honest variation (CPU vs CUDA, Q8_0; docs/accountability.md): noise is 10x this


@dataclass(frozen=True)
class TestHooks:
    __test__ = False  # not a pytest test class

    delay_ms: float = 0.0  # sleep this long before each compute round (a slow node)
    advertise_ms: float | None = None  # advertise this ms per layer instead of the measured one
    claim_model_hash: str | None = None  # advertise this model hash (a node with tampered weights)
    fault: str | None = None  # one of FAULTS (an output fault may say KIND@POSITION): a node that cheats on its results
    hide_features: bool = False  # advertise no step features (as a node older than them: docs/discovery.md)

    @property
    def active(self) -> bool:
        return any(getattr(self, f.name) != f.default for f in fields(self) if f.name != "fault")

    def check_enabled(self) -> None:
        """Raise ValueError when a hook is set but tests did not enable hooks."""
        if self.active and os.environ.get(ENABLE_ENV) != "1":
            raise ValueError(f"--test-* options are for the test suite only (set {ENABLE_ENV}=1 to allow them)")
        if self.fault is not None:
            kind, at, position = self.fault.partition("@")
            if kind not in FAULTS or (at and (kind not in OUTPUT_FAULTS or not position.isdigit())):
                raise ValueError(f"unknown --test-fault {self.fault!r} (one of {', '.join(FAULTS)}; "
                                 f"{', '.join(OUTPUT_FAULTS)} may end in @POSITION)")
            if os.environ.get(FAULTS_ENV) != "1":
                raise ValueError(f"--test-fault is for the test suite only (set {FAULTS_ENV}=1 to allow it)")


class OutputFault:
    """The output-changing faults: stale (the request's previous output), noise, garbage;
    ``KIND@POSITION`` answers honestly for steps before POSITION (a node that turns later)."""

    def __init__(self, spec: str, seed: int | None = None) -> None:
        self.kind, _, after = spec.partition("@")
        self.after = int(after or 0)
        self.last: dict[str, np.ndarray] = {}
        self.rng = np.random.default_rng(seed)

    @classmethod
    def of(cls, spec: str | None) -> "OutputFault | None":
        return cls(spec) if spec is not None and spec.partition("@")[0] in OUTPUT_FAULTS else None

    def apply(self, request_id: str, out: np.ndarray, pos: int = 0) -> np.ndarray:
        if pos < self.after:
            self.last[request_id] = out
            return out
        if self.kind == "stale":
            prev = self.last.get(request_id)
            self.last[request_id] = out
            while len(self.last) > 4096:
                self.last.pop(next(iter(self.last)))
            return prev if prev is not None and prev.shape == out.shape else out
        rms = math.sqrt(float(np.mean(np.square(out, dtype=np.float64)))) or 1.0
        if self.kind == "noise":
            return (out + self.rng.standard_normal(out.shape) * (10 * HONEST_LEVEL * rms)).astype(np.float32)
        if self.kind == "garbage":
            return (self.rng.standard_normal(out.shape) * rms).astype(np.float32)
        return out


def fault_engine(kind: str | None, load, model, work_dir):
    """For the faults that compute with other weights: (start, end) -> the cheating engine.
    ``load(model_path, start, end)`` loads an engine. None for the other faults."""
    from pathlib import Path

    if kind == "skip-layer":  # the range's last layer is never run
        return lambda start, end: load(model, start, max(start + 1, end - 1))
    if kind != "downgrade":
        return None

    def downgraded(start: int, end: int):
        dst = Path(work_dir) / f"downgraded-{Path(model).stem}.q4_0.gguf"
        if not dst.is_file():
            _requantize(Path(model), dst, "q4_0")
        return load(dst, start, end)

    return downgraded


def _requantize(src, dst, ftype: str) -> None:
    """llama.cpp's quantizer, allowed to re-quantize already quantized weights (a Q8_0 model)."""
    import ctypes

    import llama_cpp as lc

    from edge_agent.runtime.llamacpp import init_backend
    from edge_agent.runtime.synthetic import FTYPES

    init_backend()
    params = lc.llama_model_quantize_default_params()
    params.ftype = FTYPES[ftype]
    params.allow_requantize = True
    dst.parent.mkdir(parents=True, exist_ok=True)
    partial = dst.with_suffix(".partial")
    if lc.llama_model_quantize(str(src).encode(), str(partial).encode(), ctypes.byref(params)) != 0:
        raise RuntimeError(f"re-quantizing {src} to {ftype} failed")
    partial.rename(dst)
