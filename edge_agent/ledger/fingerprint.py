"""Activation fingerprints: a 256-byte summary of a chunk's output rows that stays close
under honest numeric noise and moves far when a node cheats.

Why a random projection rather than TOPLOC's top-k: honest peers here differ in the
*values* of every coordinate by about 1-4 % relative RMS (CPU vs GPU, instruction sets,
ONNX vs llama.cpp), and quantized GGUF hidden states have a few huge outlier dimensions,
so the top-k *indices* are stable but carry little of the signal a downgrade changes.
A Johnson-Lindenstrauss projection keeps the quantity the calibration is stated in:
``distance(fp(A), fp(B))`` estimates ``||A - B|| / ||B||`` over the chunk, with a relative
error of about ``1 / sqrt(2 m)`` (m = 126 projections: ~6 %). See docs/accountability.md.

Layout (``FINGERPRINT_SIZE`` = 256 bytes, little-endian): f32 scale, then 126 float16
values ``y / scale``, where ``y = sum_r S(pos_r) P x_r / sqrt(rows)``: ``P`` is a fixed
Gaussian m x n_embd matrix (seeded by n_embd, identical everywhere) and ``S(pos)`` a
diagonal of +-1 per (position, projection). The signs come *after* the projection so that
every projection sums the chunk's rows with its own random signs: rows of a residual
stream are nearly parallel (shared outlier dimensions), and one sign per row would
collapse them into one random sample. All zeros means "no fingerprint". Cost: one
(rows x n_embd) @ (n_embd x 126) product.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np

from edge_agent.ledger.encoding import FINGERPRINT_SIZE

N_PROJECTIONS = (FINGERPRINT_SIZE - 4) // 2  # 126
NO_FINGERPRINT = bytes(FINGERPRINT_SIZE)
_SEED = 0xEA14


@lru_cache(maxsize=8)
def _projection(n_embd: int) -> np.ndarray:
    rng = np.random.default_rng([_SEED, n_embd])
    return (rng.standard_normal((n_embd, N_PROJECTIONS)) / math.sqrt(N_PROJECTIONS)).astype(np.float32)


_BLOCK = 256


@lru_cache(maxsize=64)
def _sign_block(block: int) -> np.ndarray:
    return _signs(np.arange(block * _BLOCK, (block + 1) * _BLOCK))


def _signs_for(first_pos: int, rows: int) -> np.ndarray:
    """Decode steps come one row at a time: their signs come from a cached block (hashing
    126 values per row would cost 3x the projection itself)."""
    if rows == 1:
        return _sign_block(first_pos // _BLOCK)[first_pos % _BLOCK][None, :]
    return _signs(np.arange(first_pos, first_pos + rows))


def _signs(positions: np.ndarray) -> np.ndarray:
    """(rows, m) of +-1 from a fixed integer hash of (position, projection): the same on every machine."""
    keys = positions.astype(np.uint64)[:, None] * np.uint64(N_PROJECTIONS) + np.arange(N_PROJECTIONS, dtype=np.uint64)
    with np.errstate(over="ignore"):
        x = (keys + np.uint64(0x9E3779B97F4A7C15)) * np.uint64(0xBF58476D1CE4E5B9)
        x ^= x >> np.uint64(31)
        x *= np.uint64(0x94D049BB133111EB)
        x ^= x >> np.uint64(29)
    return np.where(x & np.uint64(1), 1.0, -1.0).astype(np.float32)


class Accumulator:
    """The running projection of one chunk: ``add`` each frame's rows, ``finish`` at close."""

    __slots__ = ("sum", "rows")

    def __init__(self) -> None:
        self.sum: np.ndarray | None = None
        self.rows = 0

    def add(self, first_pos: int, rows: np.ndarray) -> None:
        rows = np.asarray(rows, dtype=np.float32).reshape(-1, rows.shape[-1])
        signs = _signs_for(first_pos, rows.shape[0])
        with np.errstate(all="ignore"):  # garbage may overflow: it then fingerprints as non-finite
            part = np.sum(signs * (rows @ _projection(rows.shape[1])), axis=0)
        self.sum = part if self.sum is None else self.sum + part
        self.rows += rows.shape[0]

    def finish(self) -> bytes:
        if self.sum is None:
            return NO_FINGERPRINT
        return encode(self.sum / math.sqrt(self.rows))


def encode(y: np.ndarray) -> bytes:
    y = np.asarray(y, dtype=np.float64)
    if not np.all(np.isfinite(y)):
        # non-finite outputs: a marker that is far from every finite fingerprint
        return np.float32(np.inf).tobytes() + np.ones(N_PROJECTIONS, "<f2").tobytes()
    scale = float(np.max(np.abs(y))) or 1.0
    return np.float32(scale).tobytes() + (y / scale).astype("<f2").tobytes()


def decode(fp: bytes) -> np.ndarray | None:
    """The projection vector, or None for "no fingerprint" (all zeros); inf for non-finite."""
    if len(fp) != FINGERPRINT_SIZE:
        raise ValueError(f"a fingerprint is {FINGERPRINT_SIZE} bytes, got {len(fp)}")
    if fp == NO_FINGERPRINT:
        return None
    scale = np.frombuffer(fp[:4], "<f4")[0].astype(np.float64)
    return np.frombuffer(fp[4:], "<f2").astype(np.float64) * scale


def fingerprint(first_pos: int, rows: np.ndarray) -> bytes:
    """The fingerprint of one frame's rows (a chunk of one frame)."""
    acc = Accumulator()
    acc.add(first_pos, rows)
    return acc.finish()


def distance(committed: bytes, reference: bytes) -> float:
    """Estimated relative RMS difference ``||A - B|| / ||B||`` of the two chunks (B: the
    reference, e.g. the auditor's re-execution); 0 identical, ~1 unrelated, inf when either
    is non-finite or missing while the other is not (a node that commits nothing is not honest)."""
    a, b = decode(committed), decode(reference)
    if a is None or b is None:
        return 0.0 if a is None and b is None else math.inf
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
        return math.inf
    norm = float(np.linalg.norm(b))
    if norm == 0.0:
        return 0.0 if not np.any(a) else math.inf
    return float(np.linalg.norm(a - b)) / norm
