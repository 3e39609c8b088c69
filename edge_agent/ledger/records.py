"""Signed records: a node's per-chunk commitment and the per-(request, node) receipt.

A commitment is signed by the node that computed the chunk (Ed25519 over its body). A
receipt is signed twice over the same body: by the node (``NODE_CONTEXT + body``) and by
the client (``CLIENT_CONTEXT + body``), so neither side can later deny it and neither
signature can be replayed as the other. Verification never raises: it returns a reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

from edge_agent.discovery.identity import Identity, verify
from edge_agent.ledger.encoding import (CLIENT_CONTEXT, COMMITMENT, COMMITMENT_WIRE_SIZE, FINGERPRINT_SIZE, NODE_CONTEXT, RECEIPT,
                                        RECEIPT_WIRE_SIZE, SIG_SIZE, CommitmentBody, EncodingError, ReceiptBody,
                                        decode_commitment_body, decode_receipt_body, record_id)

_BYTE_SIZES = {"request_id": 16, "node": 32, "client": 32, "model_hash": 32, "shard_hash": 32, "inputs_hash": 32,
               "outputs_hash": 32, "fingerprint": FINGERPRINT_SIZE, "prev": 32, "chain_head": 32}


def _check_sizes(body) -> None:
    """struct pads short byte strings silently: refuse them before they are signed."""
    for name, size in _BYTE_SIZES.items():
        value = getattr(body, name, None)
        if value is not None and (not isinstance(value, bytes) or len(value) != size):
            raise EncodingError(f"{name} must be {size} bytes")


@dataclass(frozen=True)
class Commitment:
    body: bytes
    signature: bytes

    @cached_property
    def fields(self) -> CommitmentBody:
        return decode_commitment_body(self.body)

    @cached_property
    def id(self) -> bytes:
        return record_id(self.body)

    @classmethod
    def sign(cls, identity: Identity, body: CommitmentBody) -> "Commitment":
        if body.node != identity.public_key:
            raise ValueError("a node signs only its own commitments")
        _check_sizes(body)
        raw = body.encode()
        return cls(raw, identity.sign(raw))

    def problem(self) -> str | None:
        """None when well-formed and signed by its node, else the reason."""
        try:
            node = self.fields.node
        except EncodingError as exc:
            return exc.reason
        if not verify(node, self.body, self.signature):
            return "bad node signature"
        return None

    def to_bytes(self) -> bytes:
        return self.body + self.signature

    @classmethod
    def from_bytes(cls, data: bytes) -> "Commitment":
        if len(data) != COMMITMENT_WIRE_SIZE:
            raise EncodingError(f"a commitment is {COMMITMENT_WIRE_SIZE} bytes, got {len(data)}")
        return cls(bytes(data[:COMMITMENT.size]), bytes(data[COMMITMENT.size:]))


@dataclass(frozen=True)
class Receipt:
    body: bytes
    node_sig: bytes
    client_sig: bytes

    @cached_property
    def fields(self) -> ReceiptBody:
        return decode_receipt_body(self.body)

    @cached_property
    def id(self) -> bytes:
        return record_id(self.body)

    @staticmethod
    def encode_body(body: ReceiptBody) -> bytes:
        _check_sizes(body)
        return body.encode()

    @staticmethod
    def node_signature(identity: Identity, raw_body: bytes) -> bytes:
        return identity.sign(NODE_CONTEXT + raw_body)

    @staticmethod
    def client_signature(identity: Identity, raw_body: bytes) -> bytes:
        return identity.sign(CLIENT_CONTEXT + raw_body)

    @classmethod
    def sign_both(cls, identity: Identity, body: ReceiptBody) -> "Receipt":
        """The client's receipt for the layers it ran itself: node and client are this agent."""
        if body.node != identity.public_key or body.client != identity.public_key:
            raise ValueError("sign_both is for this agent's own layers")
        raw = cls.encode_body(body)
        return cls(raw, cls.node_signature(identity, raw), cls.client_signature(identity, raw))

    def problem(self) -> str | None:
        try:
            f = self.fields
        except EncodingError as exc:
            return exc.reason
        if not verify(f.node, NODE_CONTEXT + self.body, self.node_sig):
            return "bad node signature"
        if not verify(f.client, CLIENT_CONTEXT + self.body, self.client_sig):
            return "bad client countersignature"
        return None

    def to_bytes(self) -> bytes:
        return self.body + self.node_sig + self.client_sig

    @classmethod
    def from_bytes(cls, data: bytes) -> "Receipt":
        if len(data) != RECEIPT_WIRE_SIZE:
            raise EncodingError(f"a receipt is {RECEIPT_WIRE_SIZE} bytes, got {len(data)}")
        n = RECEIPT.size
        return cls(bytes(data[:n]), bytes(data[n:n + SIG_SIZE]), bytes(data[n + SIG_SIZE:]))
