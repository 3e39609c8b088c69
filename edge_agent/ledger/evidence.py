"""Self-verifying evidence against a node: a failed audit, or equivocation.

Anyone holding an evidence record can check it without trusting whoever stored or sent
it: every part is signed by the party it speaks for.

- **Audit statement** (the auditor's signed result, fixed layout, 341-byte body):
  magic ``EAA\\x01`` | auditor key (32) | audited commitment id (32) | the auditor's own
  fingerprint of the chunk (256) | distance (u32, millionths; 0xFFFFFFFF = infinite) |
  tolerance (u32, millionths) | verdict (u8: 0 pass, 1 fail) | audited_ms (u64).
  Signature: ``Ed25519(auditor, "edge-agent audit\\n" || body)``.
- **Failed audit** evidence: ``01`` | commitment (560) | statement body (341) | statement
  signature (64). Valid when the node's commitment verifies, the statement verifies and
  names that commitment, the verdict is fail, the tolerance is at least ``MIN_TOLERANCE``,
  and the distance recomputed from the two fingerprints exceeds the tolerance. (Whether
  the auditor computed honestly is settled by a third execution from the same committed
  input: the auditor's fingerprint is signed, so a lying auditor is caught the same way.)
- **Equivocation**: ``02`` | commitment | commitment: two different bodies, both signed by
  the same node, for the same request, layer range and chunk. Valid on its own.

An evidence id is ``blake2b-256`` of the whole record.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from functools import cached_property

from edge_agent.discovery.identity import Identity, verify
from edge_agent.ledger.encoding import COMMITMENT_WIRE_SIZE, FINGERPRINT_SIZE, SIG_SIZE, EncodingError, record_id
from edge_agent.ledger.fingerprint import distance
from edge_agent.ledger.records import Commitment

AUDIT_MAGIC = b"EAA\x01"
AUDIT_CONTEXT = b"edge-agent audit\n"
AUDIT = struct.Struct(f"<4s32s32s{FINGERPRINT_SIZE}sIIBQ")
INFINITE = 0xFFFFFFFF
# An auditor may not claim a tighter tolerance than this: the same-class tier (ledger.audit.TIGHT_TOLERANCE), ~40x
# the fingerprint's own rounding floor (0.00013: two fingerprints of the same activations never differ by more). It is the auditor's claim that it shares the node's compute class; a
# third party can no more check that than the auditor's fingerprint, and both are settled the same way: a third
# execution from the committed input exposes a lying auditor, whose signature makes it accountable.
MIN_TOLERANCE = 0.005
FAILED_AUDIT, EQUIVOCATION = 1, 2
KINDS = {FAILED_AUDIT: "failed-audit", EQUIVOCATION: "equivocation"}


def _ppm(x: float) -> int:
    return INFINITE if not math.isfinite(x) or x * 1e6 >= INFINITE else int(round(x * 1e6))


@dataclass(frozen=True)
class AuditStatement:
    body: bytes
    signature: bytes

    @classmethod
    def sign(cls, auditor: Identity, commitment_id: bytes, fingerprint: bytes, dist: float, tolerance: float,
             audited_ms: int) -> "AuditStatement":
        failed = int(dist > tolerance)
        body = AUDIT.pack(AUDIT_MAGIC, auditor.public_key, commitment_id, fingerprint, _ppm(dist), _ppm(tolerance), failed,
                          audited_ms)
        return cls(body, auditor.sign(AUDIT_CONTEXT + body))

    @cached_property
    def fields(self) -> tuple:
        if len(self.body) != AUDIT.size:
            raise EncodingError(f"an audit statement is {AUDIT.size} bytes")
        magic, *values = AUDIT.unpack(self.body)
        if magic != AUDIT_MAGIC:
            raise EncodingError("not an audit statement (bad magic)")
        return tuple(values)  # auditor, commitment id, fingerprint, distance ppm, tolerance ppm, verdict, ms

    def problem(self) -> str | None:
        try:
            auditor = self.fields[0]
        except EncodingError as exc:
            return exc.reason
        return None if verify(auditor, AUDIT_CONTEXT + self.body, self.signature) else "bad auditor signature"


@dataclass(frozen=True)
class Evidence:
    data: bytes

    @classmethod
    def failed_audit(cls, commitment: Commitment, statement: AuditStatement) -> "Evidence":
        return cls(bytes([FAILED_AUDIT]) + commitment.to_bytes() + statement.body + statement.signature)

    @classmethod
    def equivocation(cls, a: Commitment, b: Commitment) -> "Evidence":
        first, second = sorted((a, b), key=lambda c: c.id)  # one encoding per pair
        return cls(bytes([EQUIVOCATION]) + first.to_bytes() + second.to_bytes())

    @cached_property
    def id(self) -> bytes:
        return record_id(self.data)

    @property
    def kind(self) -> str:
        return KINDS.get(self.data[0] if self.data else 0, "unknown")

    def commitments(self) -> list[Commitment]:
        n = COMMITMENT_WIRE_SIZE
        count = 2 if self.data[:1] == bytes([EQUIVOCATION]) else 1
        return [Commitment.from_bytes(self.data[1 + i * n:1 + (i + 1) * n]) for i in range(count)]

    @property
    def accused(self) -> str:
        return self.commitments()[0].fields.node.hex()

    def statement(self) -> AuditStatement:
        rest = self.data[1 + COMMITMENT_WIRE_SIZE:]
        return AuditStatement(rest[:AUDIT.size], rest[AUDIT.size:])

    def problem(self) -> str | None:
        """None when the evidence proves what it claims, else the reason (never raises)."""
        sizes = {FAILED_AUDIT: 1 + COMMITMENT_WIRE_SIZE + AUDIT.size + SIG_SIZE, EQUIVOCATION: 1 + 2 * COMMITMENT_WIRE_SIZE}
        if not self.data or sizes.get(self.data[0]) != len(self.data):
            return "malformed evidence"
        commitments = self.commitments()
        for c in commitments:
            if c.problem():
                return f"commitment: {c.problem()}"
        if self.data[0] == EQUIVOCATION:
            a, b = (c.fields for c in commitments)
            if a.node != b.node or (a.request_id, a.layer_start, a.layer_end, a.chunk) != (
                    b.request_id, b.layer_start, b.layer_end, b.chunk):
                return "the two commitments are not for the same node, request, layers and chunk"
            return "the two commitments are identical" if commitments[0].body == commitments[1].body else None
        statement = self.statement()
        if statement.problem():
            return f"statement: {statement.problem()}"
        _, commitment_id, fingerprint, _, tolerance_ppm, verdict, _ = statement.fields
        if commitment_id != commitments[0].id:
            return "the statement audits another commitment"
        if verdict != 1 or tolerance_ppm < MIN_TOLERANCE * 1e6:
            return "the statement does not claim a failure at an admissible tolerance"
        if distance(commitments[0].fields.fingerprint, fingerprint) * 1e6 <= tolerance_ppm:
            return "the fingerprints are within the tolerance"
        return None

    def row(self, stored_ms: int) -> dict:
        return {"id": self.id, "kind": self.kind, "accused": self.accused, "body": self.data, "stored_ms": stored_ms}
