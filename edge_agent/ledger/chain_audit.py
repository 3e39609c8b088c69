"""Chain-mode audits: recompute every hop of a chain from hop 0's inputs, judge each hop alone.

In chain mode the client sends hop 0's input and receives the last hop's output; the hops
forward the rest to each other. The auditor replays hop 0's inputs through its own engines
for the path's layer ranges, so it knows what every hop *should* have received and
returned. Each hop's commitment binds its input (``inputs_hash``, the bytes it received)
to a fingerprint of its output, so a chunk is judged like a star-mode audit:

- **exact input**: the hop's committed inputs_hash of this chunk and of every earlier one
  equals the hash of the auditor's recomputed input rows (same compute class upstream:
  bit-identical). The auditor then re-executed from the very input the node committed to,
  and the hop is held to its own tier's tolerance; a failure is the same self-verifying
  evidence as in star mode, naming that node alone.
- **inexact input** (an upstream hop of another class rounds differently, within its own
  tolerance): the auditor's input differs from the real one by what that upstream hop
  deviated. Such a chunk is judged only when every link into it is intact (a feeder chunk
  upstream committed ``outputs_hash`` = this chunk's ``inputs_hash``), every feeder passed,
  and the deviation they carry in (``carried``, their largest distance) is at most
  ``max_carried``; the tolerance is then ``sqrt(TOLERANCE² + carried²)`` (tier "cumulative"):
  a fault's own effect is independent of the deviation carried in and adds to it in
  quadrature. Above ``max_carried`` an honest hop can amplify what it was fed past that
  (measured on SmolLM2's position-0 chunks), so it is not judged: docs/accountability.md,
  "Chain mode".
  Chunks downstream of a failed or unjudged one are not judged: their input is not known.
- **broken link**: an upstream chunk over the same steps whose committed ``outputs_hash`` is
  not this chunk's committed ``inputs_hash`` means one of the two signed something other than
  what was forwarded. Which one cannot be told from the records: the outcome fails naming
  neither (``peer_id`` ""; both in the reason).

Pure functions over engines and records: ``ledger.audit.Auditor`` does the I/O.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

import numpy as np

from edge_agent.ledger.encoding import chunk_hash
from edge_agent.ledger.fingerprint import Accumulator, distance
from edge_agent.ledger.records import Commitment
from edge_agent.runtime.engine import StepInput
from edge_agent.split.observe import digest
from edge_agent.transport import Flag


@dataclass
class ChainHop:
    """One hop of a chain request: who, which layers, its verified commitments and which of
    them were chosen for audit. ``tolerance``/``tier``: its own tier's (``Auditor.tier``)."""

    peer_id: str
    start: int
    end: int
    commitments: list[Commitment]
    tolerance: float
    tier: str
    chosen: set[int] = field(default_factory=set)  # chunk indexes


@dataclass(frozen=True)
class Verdict:
    hop: ChainHop
    chunk: Commitment
    distance: float
    tolerance: float
    tier: str
    passed: bool
    fingerprint: bytes  # the auditor's
    reason: str = ""


def recompute(engines: dict[tuple[int, int], object], frames: list[tuple], last: int) -> dict[int, list[tuple[int, np.ndarray]]]:
    """Rows at every layer boundary of ``engines`` (consecutive ranges) for each of hop 0's
    ``frames`` (position, rows, flags) before position ``last``: boundary -> [(position, rows)]."""
    segments = sorted(engines)
    at: dict[int, list[tuple[int, np.ndarray]]] = {b: [] for seg in segments for b in seg}
    rid = f"chain-audit-{random.getrandbits(64):016x}"
    try:
        for pos, x, flags in frames:
            if pos >= last:
                break
            at[segments[0][0]].append((pos, x))
            for seg in segments:
                step = StepInput(rid, pos, x, rewind=bool(flags & Flag.REWIND), draft=bool(flags & Flag.DRAFT))
                x = engines[seg].forward([step])[0].data
                at[seg[1]].append((pos, x))
    finally:
        for engine in engines.values():
            engine.end_request(rid)
    return at


def boundaries(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The consecutive layer ranges to re-execute: every hop's start and end is a cut (of every
    hop that ran chain steps, whether or not its commitments came)."""
    cuts = sorted({s for s, _ in ranges} | {e for _, e in ranges})
    return list(zip(cuts, cuts[1:]))


def chunk_members(frames: list[tuple[int, int]], start: int, end: int) -> list[int]:
    """Indexes of the frames, given as (position, rows), that make up the chunk over steps
    ``[start, end)``: a frame of several rows is a chunk of its own (``recorder.chunks_of``),
    single rows tile theirs. Position ranges alone do not say it: with speculative decoding
    a pass at P covers P..P+k and the single-row steps after it start again at P+a+1."""
    whole = [i for i, (p, n) in enumerate(frames) if n > 1 and p == start and p + n == end]
    return whole[-1:] if whole else [i for i, (p, n) in enumerate(frames) if n == 1 and start <= p < end]


def _rows(at: list[tuple[int, np.ndarray]], c: Commitment) -> list[tuple[int, np.ndarray]]:
    f = c.fields
    return [at[i] for i in chunk_members([(p, x.shape[0]) for p, x in at], f.step_start, f.step_end)]


def judge(hops: list[ChainHop], at: dict[int, list[tuple[int, np.ndarray]]], last: int, cumulative_tolerance: float,
          max_carried: float, unreported: set[int] = frozenset()) -> tuple[list[Verdict], list[tuple[int, str]]]:
    """Verdicts for every chunk recomputed (ending by ``last``), hops in chain order, and the
    broken links as (first position, description). ``unreported``: layer boundaries where a
    hop of the request ends whose commitments never came (a dead hop): a chunk there may have
    been fed by it, so a missing feeder is no broken link."""
    verdicts: list[Verdict] = []
    broken: list[tuple[int, str]] = []
    # (boundary, step_start, step_end) -> [(outputs_hash, verdict or None)] of the upstream chunks over those steps
    fed: dict[tuple[int, int, int], list[tuple[bytes, Verdict | None]]] = {}
    for hop in sorted(hops, key=lambda h: h.start):
        exact = known = True  # every chunk so far: input bit-identical to ours / fed by judged, passing chunks
        carried = 0.0
        for c in hop.commitments:
            f = c.fields
            if f.step_end > last:
                continue  # not recomputed (a later chunk of an earlier attempt may still be: a rebuild replays)
            rows_in = _rows(at[hop.start], c)
            exact = exact and bool(rows_in) and f.inputs_hash == chunk_hash([digest(x.tobytes()) for _, x in rows_in])
            upstream = fed.get((hop.start, f.step_start, f.step_end), [])
            feeders = [v for outputs_hash, v in upstream if outputs_hash == f.inputs_hash]
            if upstream and not feeders and hop.start not in unreported:
                broken.append((f.step_start, f"layers {hop.start}: no upstream chunk over steps {f.step_start}:{f.step_end} "
                                             f"committed the input {hop.peer_id[:12]} committed"))
            if not exact:
                known = known and bool(feeders) and all(v is not None and v.passed for v in feeders)
                carried = max([carried, *(v.distance for v in feeders if v is not None)])
                known = known and carried <= max_carried
            verdict = None
            if exact or known:
                acc = Accumulator()
                for p, y in _rows(at[hop.end], c):
                    acc.add(p, y)
                mine = acc.finish()
                tolerance, tier = (hop.tolerance, hop.tier) if exact else (math.hypot(cumulative_tolerance, carried), "cumulative")
                d = distance(f.fingerprint, mine)
                verdict = Verdict(hop, c, d, tolerance, tier, d <= tolerance, mine,
                                  "" if d <= tolerance else "re-execution differs" + ("" if exact else
                                                                                     " (from a recomputed input)"))
                verdicts.append(verdict)
            fed.setdefault((hop.end, f.step_start, f.step_end), []).append((f.outputs_hash, verdict))
    return verdicts, broken


def last_needed(hops: list[ChainHop]) -> int:
    """How far to recompute: the end of the last chosen chunk (0: none chosen)."""
    return max((c.fields.step_end for h in hops for i, c in enumerate(h.commitments) if i in h.chosen), default=0)


def frames_at_start(candidates: list[list[tuple]]) -> list[tuple[int, np.ndarray, int]]:
    """Hop 0's inputs (position, rows, flags): of the records at the chain's first layer, the
    list reaching furthest (the final path's first hop; a replay starts its list again)."""
    best = max(candidates, key=lambda fr: fr[-1][0] if fr else -1, default=[])
    return [(p, x, fl) for p, x, _, fl in best if x is not None]
