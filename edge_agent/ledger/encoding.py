"""Canonical bytes of everything the ledger signs: fixed little-endian layouts.

Why fixed layouts rather than CBOR: every field has one size, so there is exactly one
encoding of a record, a decoder checks one length before touching anything, and another
implementation needs nothing but ``struct`` to verify us. docs/ledger.md is the normative
description, with test vectors; ``tests/test_ledger_records.py`` checks them.

Untrusted bytes enter through ``decode_commitment`` / ``decode_receipt`` only: exact
length, magic, reserved fields zero and ranges sane, else ``EncodingError`` with a reason.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import astuple, dataclass, fields

COMMITMENT_MAGIC = b"EAC\x02"  # version 2: the 256-byte activation fingerprint
RECEIPT_MAGIC = b"EAR\x01"
# magic, request_id, node, layer_start, layer_end, model_hash, shard_hash, chunk, step_start,
# step_end, inputs_hash, outputs_hash, fingerprint, compute_us, prev, flags, reserved
FINGERPRINT_SIZE = 256  # layout: ledger/fingerprint.py
COMMITMENT = struct.Struct(f"<4s16s32sHH32s32sIII32s32s{FINGERPRINT_SIZE}sQ32sHH")
# magic, request_id, node, client, layer_start, layer_end, model_hash, steps, chunks, reserved,
# chain_head, deadlines_met, deadlines_missed, bytes_in, bytes_out, compute_us, ended_ms
RECEIPT = struct.Struct("<4s16s32s32sHH32sIII32sIIQQQQ")
SIG_SIZE = 64
COMMITMENT_WIRE_SIZE = COMMITMENT.size + SIG_SIZE  # body + node signature
RECEIPT_WIRE_SIZE = RECEIPT.size + 2 * SIG_SIZE  # body + node signature + client signature
NODE_CONTEXT = b"edge-agent receipt/node\n"
CLIENT_CONTEXT = b"edge-agent receipt/client\n"
ZERO32 = bytes(32)
FLAG_REPLAY = 1  # the chunk contains replayed steps (rebuilding a KV cache on a replacement node)
KNOWN_COMMITMENT_FLAGS = FLAG_REPLAY

assert COMMITMENT.size == 496 and RECEIPT.size == 204


class EncodingError(ValueError):
    """Bytes that are not a well-formed record; `reason` says which rule they broke."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def record_id(body: bytes) -> bytes:
    """A record's id: blake2b-256 of its body (the signed bytes, without signatures)."""
    return hashlib.blake2b(body, digest_size=32).digest()


def chunk_hash(digests: list[bytes]) -> bytes:
    """Hash of a chunk's inputs (or outputs): blake2b-256 over the per-step 16-byte digests, in step order."""
    h = hashlib.blake2b(digest_size=32)
    for d in digests:
        h.update(d)
    return h.digest()


@dataclass(frozen=True)
class CommitmentBody:
    request_id: bytes  # 16
    node: bytes  # 32: the node's Ed25519 public key
    layer_start: int
    layer_end: int
    model_hash: bytes  # 32
    shard_hash: bytes  # 32
    chunk: int  # 0, 1, ... within (request, node, layer range)
    step_start: int  # first position of the chunk
    step_end: int  # one past its last position
    inputs_hash: bytes  # 32, see chunk_hash
    outputs_hash: bytes  # 32
    fingerprint: bytes = bytes(FINGERPRINT_SIZE)  # activation fingerprint of the outputs (ledger/fingerprint.py); zeros: none
    compute_us: int = 0
    prev: bytes = ZERO32  # id of the previous chunk's commitment (zeros for chunk 0)
    flags: int = 0

    def encode(self) -> bytes:
        return COMMITMENT.pack(COMMITMENT_MAGIC, *astuple(self), 0)


@dataclass(frozen=True)
class ReceiptBody:
    request_id: bytes  # 16
    node: bytes  # 32: who did the work
    client: bytes  # 32: who asked for it (equal to node for the client's own layers)
    layer_start: int
    layer_end: int
    model_hash: bytes  # 32
    steps: int  # positions computed
    chunks: int  # commitments in the chain
    chain_head: bytes  # 32: id of the last commitment (zeros when there is no chain)
    deadlines_met: int
    deadlines_missed: int
    bytes_in: int  # activation bytes the node received
    bytes_out: int  # activation bytes it sent back
    compute_us: int
    ended_ms: int  # when the client closed the request, ms since the Unix epoch

    def encode(self) -> bytes:
        t = astuple(self)
        return RECEIPT.pack(RECEIPT_MAGIC, *t[:8], 0, *t[8:])


COMMITMENT_FIELDS = [f.name for f in fields(CommitmentBody)]
RECEIPT_FIELDS = [f.name for f in fields(ReceiptBody)]


def _check_range(start: int, end: int) -> None:
    if not start < end:
        raise EncodingError(f"empty layer range {start}:{end}")


def decode_commitment_body(body: bytes) -> CommitmentBody:
    if len(body) != COMMITMENT.size:
        raise EncodingError(f"commitment body must be {COMMITMENT.size} bytes, got {len(body)}")
    magic, *values, reserved = COMMITMENT.unpack(body)
    if magic != COMMITMENT_MAGIC:
        raise EncodingError("not a commitment (bad magic)")
    if reserved:
        raise EncodingError("reserved field is not zero")
    c = CommitmentBody(*values)
    _check_range(c.layer_start, c.layer_end)
    if not c.step_start < c.step_end:
        raise EncodingError(f"empty step range {c.step_start}:{c.step_end}")
    if c.flags & ~KNOWN_COMMITMENT_FLAGS:
        raise EncodingError(f"unknown flags {c.flags:#x}")
    if (c.chunk == 0) != (c.prev == ZERO32):
        raise EncodingError("chunk 0 has no predecessor and only chunk 0")
    return c


def decode_receipt_body(body: bytes) -> ReceiptBody:
    if len(body) != RECEIPT.size:
        raise EncodingError(f"receipt body must be {RECEIPT.size} bytes, got {len(body)}")
    magic, *values = RECEIPT.unpack(body)
    if magic != RECEIPT_MAGIC:
        raise EncodingError("not a receipt (bad magic)")
    if values[8]:
        raise EncodingError("reserved field is not zero")
    r = ReceiptBody(*values[:8], *values[9:])
    _check_range(r.layer_start, r.layer_end)
    if (r.chunks == 0) != (r.chain_head == ZERO32):
        raise EncodingError("chain head and chunk count disagree")
    return r
