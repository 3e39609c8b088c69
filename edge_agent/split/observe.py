"""The one place where each hop's work is observed.

Both sides of a hop report here: the node after it computed a step, the client after it
accepted one. Today this feeds telemetry; the next wave's ledger subscribes to the same
records to commit, sign and countersign each step (ODSI's commitments and receipts), so
nothing on the inference plane has to change for it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Callable


@dataclass(frozen=True)
class HopRecord:
    side: str  # "node" (work done) or "client" (work accepted)
    request_id: str
    peer_id: str  # the node that did the work
    start: int
    end: int
    step: int  # position of the first row
    n_positions: int
    input_digest: bytes  # blake2b-128 of the input activation bytes
    output_digest: bytes
    compute_ms: float
    wall_ms: float = 0.0  # client side: round trip including transfer
    budget_ms: float | None = None
    replay: bool = False
    flags: int = 0  # a speculative step's REWIND / DRAFT bits (an auditor re-executes it the same way)
    output: object = None  # the output rows (numpy; node: sent, client: received), for fingerprints; never stored
    input: object = None  # client side: the input rows sent (numpy), kept by an auditor for re-execution


Observer = Callable[[HopRecord], None]


def digest(data: bytes | memoryview) -> bytes:
    return hashlib.blake2b(data, digest_size=16).digest()


@dataclass
class Observers:
    """A small fan-out; an observer that raises is dropped from this call, never the hop."""

    callbacks: list[Observer] = field(default_factory=list)

    def add(self, cb: Observer) -> None:
        self.callbacks.append(cb)

    def emit(self, record: HopRecord) -> None:
        for cb in list(self.callbacks):
            try:
                cb(record)
            except Exception:  # noqa: BLE001 - observers must never break the inference plane
                pass
