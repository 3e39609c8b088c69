"""Audits: re-execute a sample of a hop's chunks locally and compare activation fingerprints.

The client keeps the inputs it sent each hop (star mode: it sent all of them), and the
hop's commitments bind those inputs (``inputs_hash``, checked by the receipt flow) to the
fingerprint of the outputs the node returned. With probability ``rate`` per chunk the
auditor replays the hop's inputs up to that chunk on its own engine for the same layers,
fingerprints its outputs and compares: a distance above the tolerance is a failed audit,
stored as self-verifying evidence naming exactly the node that signed the commitment.
The tolerance is tiered by compute class (``runtime.compute_class``, advertised by each node,
calibrated in docs/accountability.md): ``TIGHT_TOLERANCE`` when the node's class equals the
auditor's and both run llama.cpp on the CPU (measured bit-exact across threads and batching),
else ``TOLERANCE`` (other hardware, builds or runtimes: up to a few percent honestly), with
a higher audit rate for such a node (what claiming a class nobody shares buys a cheater:
docs/accountability.md). Two different signed commitments from one node for the same chunk
are evidence too (equivocation). Every chunk's committed fingerprint is also
checked against the fingerprint of the outputs the client actually received (``CONSISTENCY``):
a node cannot send one thing and commit the fingerprint of another.

Nothing here is on the token path: inputs are kept by reference (the strategy keeps them
anyway for replay), and audits run after the request's receipts, in a worker thread.
"""

from __future__ import annotations

import asyncio
import logging
import random
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

import numpy as np

from edge_agent.discovery.identity import Identity
from edge_agent.ledger.chain_audit import ChainHop, boundaries, chunk_members, frames_at_start, judge, last_needed, recompute
from edge_agent.ledger.evidence import AuditStatement, Evidence
from edge_agent.ledger.fingerprint import Accumulator, distance
from edge_agent.ledger.records import Commitment
from edge_agent.runtime.compute_class import ComputeClass
from edge_agent.runtime.engine import StepInput
from edge_agent.transport import Flag

log = logging.getLogger(__name__)
TOLERANCE = 0.08  # estimated relative RMS distance across compute classes; calibration and false-flag bound: docs/accountability.md
# Same class, llama.cpp CPU: honest re-execution is bit-exact (threads, batching: distance 0), so this only has
# to clear the fingerprint's own float/fp16 rounding (<= 0.00013 measured); a skipped layer of a 22-layer SmolLM2
# hop measured >= 0.016. No tolerance this tight survives one ulp of honest difference (amplified to ~1.5 % on
# SmolLM2), which is why the class pins the build (runtime.compute_class). docs/accountability.md.
TIGHT_TOLERANCE = 0.005
CROSS_CLASS_RATE_FACTOR = 3  # audit rate multiplier for a node of another (or unknown) class than the auditor's
DEFAULT_RATE = 0.03
MAX_KEPT = 256  # hops whose inputs are kept awaiting their commitments
CONSISTENCY = 0.01  # committed vs received fingerprint: the same bytes, only float rounding may differ
# Chain mode: the largest upstream deviation a hop is judged after (from the auditor's recomputed input, at
# sqrt(TOLERANCE^2 + carried^2)); beyond it an honest SmolLM2 hop amplified its position-0 chunk past that
# tolerance. ledger.chain_audit, docs/accountability.md "Chain mode".
MAX_CARRIED = 0.03


class AuditIncomplete(RuntimeError):
    """A chunk chosen for audit could not be audited (its inputs were dropped, or time ran out)."""


class UnattributableFault(AuditIncomplete):
    """The earliest fault is a broken chain link: one of two nodes lied, the records cannot say which."""


@dataclass(frozen=True)
class AuditOutcome:
    peer_id: str
    request_id: str
    start: int
    end: int
    chunk: int
    distance: float
    passed: bool
    evidence_id: bytes | None = None
    reason: str = ""  # why it failed
    step_start: int = 0  # the chunk's first position: where a failed chunk's corruption begins
    tier: str = ""  # "same-class" or "cross-class": which tolerance applied (the statement signs its value)


@dataclass(frozen=True)
class Tier:
    name: str
    tolerance: float
    rate: float


def _shape(frame: tuple) -> tuple[int, int]:
    """(position, rows) of a kept frame; a chain hop's middle records carry no rows (then 1:
    their chunks are not checked here, the chain audit recomputes them)."""
    rows = next((a for a in frame[1:3] if a is not None), None)
    return frame[0], rows.shape[0] if rows is not None else 1


def _consistency(peer_id: str, request_id: str, start: int, end: int, frames, commitments: list[Commitment]) -> list:
    """Failed outcomes for chunks whose committed fingerprint is not that of the outputs the
    client received. Not self-verifying evidence (a third party would need the activations),
    but the client knows the node sent them: ``outputs_hash`` binds the bytes it received."""
    failed = []
    for c in commitments:
        f = c.fields
        outs = [(frames[i][0], frames[i][2]) for i in chunk_members([_shape(fr) for fr in frames], f.step_start, f.step_end)]
        if not outs or any(out is None for _, out in outs):
            continue  # a chain hop's output this device never received: the chain audit recomputes it
        acc = Accumulator()
        for pos, out in outs:
            acc.add(pos, out)
        d = distance(f.fingerprint, acc.finish())
        if d > CONSISTENCY:
            failed.append(AuditOutcome(peer_id, request_id, start, end, f.chunk, d, False,
                                       reason="committed fingerprint is not that of the outputs sent", step_start=f.step_start))
    return failed


def reexecute(engine, frames: list[tuple], chunks: list[tuple[int, int]]) -> list[bytes]:
    """Fingerprints of ``chunks`` (step ranges) from replaying ``frames`` (position, input rows
    and optionally step flags, in send order) on ``engine``, from position 0 up to the last
    chunk's end. A speculative step's flags rewind past rejected drafts and keep its rows
    exact, as on the hop."""
    shapes = [_shape(f) for f in frames]
    members = [set(chunk_members(shapes, start, end)) for start, end in chunks]
    last = max((i for m in members for i in m), default=-1)
    accumulators = [Accumulator() for _ in chunks]
    rid = f"audit-{random.getrandbits(64):016x}"
    try:
        for i, (pos, x, *flags) in enumerate(frames[:last + 1]):
            flags = flags[0] if flags else 0
            step = StepInput(rid, pos, x, rewind=bool(flags & Flag.REWIND), draft=bool(flags & Flag.DRAFT))
            out = engine.forward([step])[0].data
            for m, acc in zip(members, accumulators):
                if i in m:
                    acc.add(pos, out)
    finally:
        engine.end_request(rid)
    return [acc.finish() for acc in accumulators]


class Auditor:
    """The client's auditor. ``engine_for(start, end)`` loads an engine for a layer range (kept
    for the next audits); ``store`` receives the evidence (None: outcomes only). ``own_class``:
    the class of the auditor's engines; ``class_of(peer id)``: the class a peer advertises (None:
    unknown). Without both, every node is audited at the cross-class tier."""

    def __init__(self, identity: Identity, store, engine_for: Callable[[int, int], object], rate: float = DEFAULT_RATE,
                 seed: int | None = None, own_class: ComputeClass | None = None,
                 class_of: Callable[[str], str | None] | None = None) -> None:
        if not 0.0 <= rate <= 1.0:
            raise ValueError("--audit-rate must be between 0 and 1")
        self.identity, self.store, self.engine_for = identity, store, engine_for
        self.rate, self.own_class, self.class_of = rate, own_class, class_of
        self.rng = random.Random(seed)
        # (request, peer, start, end) -> [(position, input rows, received output rows)]
        self.inputs: OrderedDict[tuple[str, str, int, int], list[tuple[int, np.ndarray, np.ndarray]]] = OrderedDict()
        self.outcomes: list[AuditOutcome] = []
        self.seen: dict[tuple, Commitment] = {}  # (node, request, start, end, chunk) -> first commitment seen
        self._engines: dict[tuple[int, int], object] = {}
        self._lock = threading.Lock()  # one re-execution at a time: the auditor's engines are not shared
        self._tasks: set[asyncio.Task] = set()
        self._by_request: dict[str, set[asyncio.Task]] = {}
        self.unaudited: dict[str, list[str]] = {}  # request -> hops chosen for audit whose inputs were not kept
        self.chained: dict[str, set[tuple]] = {}  # request -> keys of its hops that ran chain steps
        self.chain_commitments: dict[str, list[tuple[str, int, int, list[Commitment]]]] = {}  # request -> its chain hops'

    def tier(self, peer_id: str) -> Tier:
        """The tolerance and audit rate for ``peer_id``'s chunks, from its advertised class.
        A node that claims our class but computes otherwise is held to the tight tolerance and
        flagged; one that claims another class gets the loose one and is audited more often."""
        theirs = self.class_of(peer_id) if self.class_of is not None else None
        if self.own_class is not None and self.own_class.exact and theirs == self.own_class.to_text():
            return Tier("same-class", TIGHT_TOLERANCE, self.rate)
        return Tier("cross-class", TOLERANCE, min(1.0, self.rate * CROSS_CLASS_RATE_FACTOR))

    def observe(self, rec) -> None:
        """A client HopRecord: keep the hop's input and output rows (references, not copies).
        A chain step's records (flagged CHAIN) know only hop 0's input and the last hop's output:
        the hop is then audited by the chain audit (``on_settled``)."""
        chain = bool(rec.flags & Flag.CHAIN)
        if rec.side != "client" or self.rate == 0.0 or (not chain and (rec.input is None or rec.output is None)):
            return
        key = (rec.request_id, rec.peer_id, rec.start, rec.end)
        if chain:
            self.chained.setdefault(rec.request_id, set()).add(key)
            while len(self.chained) > MAX_KEPT:
                self.chained.pop(next(iter(self.chained)))
        frames = self.inputs.setdefault(key, [])
        if frames and rec.step <= frames[-1][0]:  # replayed from rec.step (a rebuilt path): same inputs again
            frames[:] = [f for f in frames if f[0] < rec.step]
        frames.append((rec.step, rec.input, rec.output, rec.flags))
        while len(self.inputs) > MAX_KEPT:
            self.inputs.popitem(last=False)

    def on_commitments(self, request_id: str, peer_id: str, start: int, end: int, commitments: list[Commitment]) -> None:
        """A hop's verified commitments (the receipt flow checked them): check equivocation,
        pick chunks to audit and audit them in the background."""
        evidence = [e for c in commitments if (e := self._equivocation(c)) is not None]
        if evidence and self.store is not None:
            self.store.add(evidence=evidence)
        if (request_id, peer_id, start, end) in self.chained.get(request_id, ()):
            self.chain_commitments.setdefault(request_id, []).append((peer_id, start, end, commitments))
            return  # audited with the rest of its chain once the request settled
        frames = self.inputs.pop((request_id, peer_id, start, end), None)
        tier = self.tier(peer_id)
        chosen = [c for c in commitments if self.rng.random() < tier.rate]
        if not frames:
            if chosen:  # dropped (MAX_KEPT) or never seen (chain mode): a verified answer must not count it as passed
                self.unaudited.setdefault(request_id, []).append(f"{peer_id[:12]} {start}:{end}")
            return
        self._start(request_id, self._audit(request_id, f"{peer_id[:12]} {start}:{end}", bool(chosen),
                                            lambda: self._run(request_id, peer_id, start, end, frames, commitments, chosen, tier)))

    def _start(self, request_id: str, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        self._by_request.setdefault(request_id, set()).add(task)
        task.add_done_callback(lambda t: self._forget(request_id, t))

    def _forget(self, request_id: str, task: asyncio.Task) -> None:
        pending = self._by_request.get(request_id)
        if pending is not None:
            pending.discard(task)
            if not pending:
                del self._by_request[request_id]

    async def fault(self, request_id: str, timeout_s: float = 120.0) -> tuple[str, int] | None:
        """After this request's audits: (peer id, first position) of its earliest failed chunk,
        or None when every audit that was chosen ran and passed. The request's receipts must be
        in (their commitments start the audits). AuditIncomplete when a chosen audit could not
        run or did not finish within ``timeout_s``: never a pass by default."""
        tasks = self._by_request.pop(request_id, set())
        if tasks:
            _, pending = await asyncio.wait(list(tasks), timeout=timeout_s)
            if pending:
                raise AuditIncomplete(f"{len(pending)} audits of request {request_id[:8]} did not finish in {timeout_s:.0f} s")
        unaudited = self.unaudited.pop(request_id, None)
        if unaudited:
            raise AuditIncomplete(f"the inputs of {', '.join(unaudited)} were not kept for their audit")
        failed = [o for o in self.outcomes if o.request_id == request_id and not o.passed]
        if not failed:
            return None
        first = min(failed, key=lambda o: (o.step_start, not o.peer_id))
        if not first.peer_id:
            raise UnattributableFault(first.reason)
        return first.peer_id, first.step_start

    def _equivocation(self, c: Commitment) -> Evidence | None:
        f = c.fields
        key = (f.node, f.request_id, f.layer_start, f.layer_end, f.chunk)
        first = self.seen.setdefault(key, c)
        if len(self.seen) > 100_000:
            self.seen.clear()
        return Evidence.equivocation(first, c) if first.body != c.body else None

    async def _audit(self, request_id: str, what: str, chosen: bool, work: Callable[[], tuple[list, list]]) -> None:
        """Run ``work`` (-> outcomes, evidence) off the event loop; keep its outcomes, store its evidence."""
        try:
            outcomes, evidence = await asyncio.to_thread(work)
        except Exception as exc:  # noqa: BLE001 - an audit that cannot run is logged, never a crash
            log.warning("audit of %s failed to run: %r", what, exc)
            if chosen:
                self.unaudited.setdefault(request_id, []).append(f"{what} ({exc!r})")
            return
        self.outcomes.extend(outcomes)
        if evidence and self.store is not None:
            await asyncio.wrap_future(self.store.add(evidence=evidence))
        for o in outcomes:
            if not o.passed:
                log.warning("audit failed: %s layers %d:%d chunk %d distance %.4f (%s): %s", o.peer_id[:12] or "-", o.start,
                            o.end, o.chunk, o.distance, o.tier, o.reason)

    def _run(self, request_id, peer_id, start, end, frames, commitments, chosen, tier: Tier):
        consistency = _consistency(peer_id, request_id, start, end, frames, commitments)
        if not chosen:
            return consistency, []
        with self._lock:
            engine = self._engines.get((start, end))
            if engine is None:
                engine = self._engines[(start, end)] = self.engine_for(start, end)
            mine = reexecute(engine, [(p, x, f) for p, x, _, f in frames], [(c.fields.step_start, c.fields.step_end) for c in chosen])
        outcomes, evidence = [], []
        now = int(time.time() * 1000)
        for c, fp in zip(chosen, mine):
            d = distance(c.fields.fingerprint, fp)
            passed, ev = d <= tier.tolerance, None
            if not passed:
                statement = AuditStatement.sign(self.identity, c.id, fp, d, tier.tolerance, now)
                ev = Evidence.failed_audit(c, statement)
                evidence.append(ev)
            outcomes.append(AuditOutcome(peer_id, request_id, start, end, c.fields.chunk, d, passed,
                                         ev.id if ev is not None else None, "" if passed else "re-execution differs",
                                         c.fields.step_start, tier.name))
        return consistency + outcomes, evidence

    def on_settled(self, request_id: str) -> None:
        """Every hop's commitments of this request were checked: audit its chain hops together
        (``ledger.chain_audit``: recompute from hop 0's inputs, judge each hop alone)."""
        keys = self.chained.pop(request_id, None)
        reported = self.chain_commitments.pop(request_id, [])
        if not keys:
            return
        frames = {k: self.inputs.pop(k, []) for k in keys}
        s0 = min(k[2] for k in keys)
        hops = []
        for peer_id, start, end, commitments in reported:
            tier = self.tier(peer_id)
            hops.append(ChainHop(peer_id, start, end, commitments, tier.tolerance, tier.name,
                                 {i for i in range(len(commitments)) if self.rng.random() < tier.rate}))
        reported_keys = {(request_id, h.peer_id, h.start, h.end) for h in hops}
        unreported = {k[3] for k in keys if k not in reported_keys}
        hop0 = frames_at_start([fr for k, fr in frames.items() if k[2] == s0])
        segments = boundaries([(k[2], k[3]) for k in keys])
        self._start(request_id, self._audit(request_id, "its chain", any(h.chosen for h in hops),
                                            lambda: self._run_chain(request_id, hops, hop0, frames, segments, unreported)))

    def _run_chain(self, request_id: str, hops: list[ChainHop], hop0, frames: dict, segments, unreported: set[int]):
        consistency = []  # the last hop's outputs reached this device: they must be what it committed
        for h in hops:
            consistency += _consistency(h.peer_id, request_id, h.start, h.end,
                                        frames.get((request_id, h.peer_id, h.start, h.end), []), h.commitments)
        last = last_needed(hops)
        if not last:
            return consistency, []
        if not hop0:
            raise AuditIncomplete("hop 0's inputs were not kept")
        with self._lock:
            for seg in segments:
                if seg not in self._engines:
                    self._engines[seg] = self.engine_for(*seg)
            at = recompute({seg: self._engines[seg] for seg in segments}, hop0, last)
        verdicts, broken = judge(hops, at, last, TOLERANCE, MAX_CARRIED, unreported)
        outcomes, evidence = [], []
        now = int(time.time() * 1000)
        judged = set()
        for v in verdicts:
            f = v.chunk.fields
            judged.add((v.hop.peer_id, v.hop.start, f.chunk))
            if v.passed and f.chunk not in v.hop.chosen:
                continue  # recomputed on the way to a chosen chunk: only failures are worth reporting
            ev = None
            if not v.passed:
                ev = Evidence.failed_audit(v.chunk, AuditStatement.sign(self.identity, v.chunk.id, v.fingerprint, v.distance,
                                                                        v.tolerance, now))
                evidence.append(ev)
            outcomes.append(AuditOutcome(v.hop.peer_id, request_id, v.hop.start, v.hop.end, f.chunk, v.distance, v.passed,
                                         ev.id if ev is not None else None, v.reason, f.step_start, v.tier))
        for pos, what in broken:
            outcomes.append(AuditOutcome("", request_id, 0, 0, -1, float("inf"), False, reason=f"broken chain link: {what}",
                                         step_start=pos, tier="link"))
        first_fault = min((o.step_start for o in outcomes if not o.passed), default=None)
        for h in hops:  # chosen but not judged: upstream of it failed (covered by that fault) or its input is unknown
            for i in sorted(h.chosen):
                f = h.commitments[i].fields
                if (h.peer_id, h.start, i) not in judged and (first_fault is None or f.step_start < first_fault):
                    self.unaudited.setdefault(request_id, []).append(f"{h.peer_id[:12]} {h.start}:{h.end} chunk {i}")
        return consistency + outcomes, evidence

    async def drain(self, timeout_s: float = 60.0) -> None:
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=timeout_s)

    def close(self) -> None:
        for engine in self._engines.values():
            engine.close()
        self._engines.clear()
