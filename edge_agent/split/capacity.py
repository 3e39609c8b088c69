"""What a peer can hold, and the number checks of its advertised capability (pure, no I/O)."""

from __future__ import annotations

import math
from typing import Optional


def check_number(name: str, value: object, *, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if value < 0 or (positive and value == 0):
        raise ValueError(f"{name} must be {'> 0' if positive else '>= 0'}, got {value}")
    return float(value)


def capacity_layers(free_memory_mb: float, layer_bytes_mb: Optional[float]) -> Optional[int]:
    """Most layers with ``n * layer_bytes_mb <= free_memory_mb``; None means unlimited."""
    if layer_bytes_mb is None:
        return None
    n = int(free_memory_mb // layer_bytes_mb) + 1
    while n > 0 and n * layer_bytes_mb > free_memory_mb:  # guard float rounding of //
        n -= 1
    return n
