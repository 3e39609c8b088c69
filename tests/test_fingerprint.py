"""Activation fingerprints: size, and that the distance estimates relative RMS difference."""

from __future__ import annotations

import math

import numpy as np

from edge_agent.ledger.encoding import FINGERPRINT_SIZE
from edge_agent.ledger.fingerprint import NO_FINGERPRINT, Accumulator, distance, fingerprint


def _chunk(rng, rows=32, n_embd=576):
    x = rng.standard_normal((rows, n_embd)).astype(np.float32)
    x[:, 7] *= 40.0  # an outlier dimension, as real residual streams have
    return x


def _fp_rows(x, first=100):
    acc = Accumulator()
    for i, row in enumerate(x):
        acc.add(first + i, row[None, :])
    return acc.finish()


def test_size_and_determinism():
    x = _chunk(np.random.default_rng(1))
    fp = _fp_rows(x)
    assert len(fp) == FINGERPRINT_SIZE <= 300
    assert fp == _fp_rows(x.copy()) and distance(fp, fp) == 0.0
    # a decode chunk (rows one at a time) equals the same rows in one frame
    assert distance(fingerprint(100, x), fp) < 1e-3


def test_distance_estimates_relative_rms_within_the_projection_error():
    rng = np.random.default_rng(2)
    for level in (0.01, 0.036, 0.12, 0.5):
        ratios = []
        for _ in range(40):
            x = _chunk(rng)
            noise = rng.standard_normal(x.shape).astype(np.float32)
            noisy = x + noise * (level * np.linalg.norm(x) / np.linalg.norm(noise))
            ratios.append(distance(_fp_rows(noisy), _fp_rows(x)) / level)
        assert 0.65 < min(ratios) and max(ratios) < 1.4, (level, min(ratios), max(ratios))


def test_garbage_missing_and_shifted_rows_are_far():
    rng = np.random.default_rng(3)
    x = _chunk(rng)
    ref = _fp_rows(x)
    assert distance(_fp_rows(np.full_like(x, np.nan)), ref) == math.inf
    assert distance(NO_FINGERPRINT, ref) == math.inf and distance(NO_FINGERPRINT, NO_FINGERPRINT) == 0.0
    assert distance(_fp_rows(rng.standard_normal(x.shape).astype(np.float32) * 5), ref) > 0.5
    stale = np.vstack([x[:1], x[:-1]])  # every row one step late
    assert distance(_fp_rows(stale), ref) > 0.5
