"""Canonical encoding and signatures: the documented test vectors, tampering, bounded decoding."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from nacl.signing import SigningKey

from edge_agent.discovery.identity import Identity
from edge_agent.ledger.encoding import (COMMITMENT, RECEIPT, RECEIPT_WIRE_SIZE, CommitmentBody, EncodingError, ReceiptBody,
                                        chunk_hash)
from edge_agent.ledger.records import Commitment, Receipt
from ledger_util import make_chain, make_receipt

DOC = (Path(__file__).resolve().parents[1] / "docs" / "ledger.md").read_text()
NODE = Identity(SigningKey(bytes(range(32))))
CLIENT = Identity(SigningKey(bytes(range(32, 64))))


def _vector_commitment() -> Commitment:
    body = CommitmentBody(bytes(range(16)), NODE.public_key, 1, 15, b"\xab" * 32, b"\xcd" * 32, 0, 0, 7,
                          chunk_hash([bytes(16)]), chunk_hash([b"\x01" * 16]), compute_us=1500)
    return Commitment.sign(NODE, body)


def _vector_receipt(c: Commitment) -> Receipt:
    body = ReceiptBody(bytes(range(16)), NODE.public_key, CLIENT.public_key, 1, 15, b"\xab" * 32, 7, 1, c.id, 0, 0,
                       16128, 16128, 1500, 1_700_000_000_000)
    raw = Receipt.encode_body(body)
    return Receipt(raw, Receipt.node_signature(NODE, raw), Receipt.client_signature(CLIENT, raw))


def test_vectors_match_the_documentation():
    c = _vector_commitment()
    r = _vector_receipt(c)
    blocks = [b for b in re.findall(r"```\n(.*?)```", DOC, re.S) if b.startswith("body\n")]
    commitment_block, receipt_block = blocks
    flat = lambda block: block.replace("\n", "")  # noqa: E731
    assert NODE.public_key.hex() in DOC and CLIENT.public_key.hex() in DOC
    for value in (c.body.hex(), c.signature.hex(), c.id.hex()):
        assert value in flat(commitment_block)
    for value in (r.body.hex(), r.node_sig.hex(), r.client_sig.hex(), r.id.hex()):
        assert value in flat(receipt_block)
    assert c.problem() is None and r.problem() is None
    assert (COMMITMENT.size, RECEIPT.size) == (496, 204)


def test_round_trip_and_fields():
    c = _vector_commitment()
    again = Commitment.from_bytes(c.to_bytes())
    assert again == c and again.fields.step_end == 7 and again.fields.prev == bytes(32)
    r = _vector_receipt(c)
    assert Receipt.from_bytes(r.to_bytes()).fields.chain_head == c.id


@pytest.mark.parametrize("kind", ["commitment", "receipt"])
def test_every_single_bit_flip_is_caught(kind):
    c = _vector_commitment()
    rec = c if kind == "commitment" else _vector_receipt(c)
    wire = rec.to_bytes()
    cls = Commitment if kind == "commitment" else Receipt
    for bit in range(len(wire) * 8):
        bad = bytearray(wire)
        bad[bit // 8] ^= 1 << (bit % 8)
        assert cls.from_bytes(bytes(bad)).problem() is not None, bit


def test_roles_cannot_be_swapped():
    r = _vector_receipt(_vector_commitment())
    assert Receipt(r.body, r.client_sig, r.node_sig).problem() is not None


def test_decoding_refuses_malformed_bytes_with_a_reason():
    r = make_receipt(NODE, CLIENT, 0)
    for data, reason in [(r.to_bytes()[:-1], "a receipt is"), (b"", "a receipt is"), (os.urandom(RECEIPT_WIRE_SIZE), "")]:
        try:
            problem = Receipt.from_bytes(data).problem()
        except EncodingError as exc:
            problem = exc.reason
        assert problem and reason in problem
    # a structurally bad body (empty layer range), properly signed, is still refused
    body = bytearray(r.body)
    body[84:88] = (5).to_bytes(2, "little") * 2
    raw = bytes(body)
    forged = Receipt(raw, Receipt.node_signature(NODE, raw), Receipt.client_signature(CLIENT, raw))
    assert forged.problem() == "empty layer range 5:5"


def test_encoder_refuses_short_fields_and_foreign_keys():
    good = make_chain(NODE, bytes(16), 1)[0].fields
    with pytest.raises(EncodingError):
        Commitment.sign(NODE, CommitmentBody(**{**vars(good), "request_id": b"short"}))
    with pytest.raises(ValueError):
        Commitment.sign(CLIENT, good)  # a node signs only its own commitments
