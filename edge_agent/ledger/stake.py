"""Stake bonds: a node locks some of its earned credits as a signed ledger entry.

Layout (fixed, little-endian, 52-byte body): magic ``EAB\\x01`` | agent key (32) | amount
(u64, credits) | created_ms (u64). Signature: ``Ed25519(agent, "edge-agent bond\\n" || body)``.
The id is ``blake2b-256`` of the body. Bonds only add up: a bond cannot be withdrawn, and
verified evidence forfeits all of it (``ledger.accounts`` has the rules and their
arithmetic, docs/accountability.md the reasons). Like evidence, bonds are gossiped by every
ledger sync and self-verifying: whoever relays one cannot alter it.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from functools import cached_property

from edge_agent.discovery.identity import Identity, verify
from edge_agent.ledger.encoding import SIG_SIZE, EncodingError, record_id

BOND_MAGIC = b"EAB\x01"
BOND_CONTEXT = b"edge-agent bond\n"
BOND = struct.Struct("<4s32sQQ")
BOND_WIRE_SIZE = BOND.size + SIG_SIZE
MAX_BOND = 10**15  # credits: far above anything earnable, small enough for sums in a float


@dataclass(frozen=True)
class Bond:
    body: bytes
    signature: bytes

    @classmethod
    def sign(cls, identity: Identity, amount: int, created_ms: int) -> "Bond":
        if isinstance(amount, bool) or not isinstance(amount, int) or not 0 < amount <= MAX_BOND:
            raise ValueError(f"a bond is a whole number of credits between 1 and {MAX_BOND}")
        body = BOND.pack(BOND_MAGIC, identity.public_key, amount, created_ms)
        return cls(body, identity.sign(BOND_CONTEXT + body))

    @classmethod
    def from_bytes(cls, data: bytes) -> "Bond":
        if len(data) != BOND_WIRE_SIZE:
            raise EncodingError(f"a bond is {BOND_WIRE_SIZE} bytes, got {len(data)}")
        return cls(data[:BOND.size], data[BOND.size:])

    def to_bytes(self) -> bytes:
        return self.body + self.signature

    @cached_property
    def fields(self) -> tuple[bytes, int, int]:
        """(agent key, amount, created_ms); EncodingError for a malformed body."""
        if len(self.body) != BOND.size:
            raise EncodingError(f"a bond body is {BOND.size} bytes, got {len(self.body)}")
        magic, agent, amount, created_ms = BOND.unpack(self.body)
        if magic != BOND_MAGIC:
            raise EncodingError("not a bond (magic)")
        if not 0 < amount <= MAX_BOND:
            raise EncodingError(f"bond amount {amount} out of range")
        return agent, amount, created_ms

    @cached_property
    def id(self) -> bytes:
        return record_id(self.body)

    @property
    def agent_id(self) -> str:
        return self.fields[0].hex()

    def problem(self) -> str | None:
        """None when well-formed and signed by its agent, else the reason (never raises)."""
        try:
            agent, _, _ = self.fields
        except EncodingError as exc:
            return exc.reason
        if len(self.signature) != SIG_SIZE or not verify(agent, BOND_CONTEXT + self.body, self.signature):
            return "bad bond signature"
        return None

    def row(self, stored_ms: int) -> dict:
        return {"id": self.id, "agent_id": self.agent_id, "amount": self.fields[1], "body": self.body,
                "signature": self.signature, "stored_ms": stored_ms}
