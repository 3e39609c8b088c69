"""The ledger's messages between agents: a small bounded binary codec in CONTROL frames.

Why binary and not JSON: a sync moves tens of thousands of fixed-size records, and a
fixed layout lets the decoder check every count against the bytes actually present
before it allocates anything. Every message starts with ``MAGIC`` and a type byte, so the
hop server can tell ledger traffic from its JSON control messages by the first 4 bytes.

Layouts (little-endian; docs/ledger.md has the full table):
  SUMMARY        u16 n, n x (u8 depth, u64 prefix, u32 count, 16s fingerprint)
  SUMMARY_REPLY  n x (u8 status [, u32 k, k x 32s id when status == IDS])
  GET            u32 k, k x 32s id                 -> RECORDS u32 k, k x 332-byte receipt
  PUT            u32 k, k x 332-byte receipt        -> PUT_REPLY u32 accepted, u32 r, r x (u32 index, u8 len, reason)
  COMMITS_GET    16s request, u16 start, u16 end    -> COMMITS u32 k, k x 560-byte commitment
  EVIDENCE       u32 k, k x (u16 len, evidence)     -> EVIDENCE (the responder's recent evidence, same layout)
  BONDS          u32 k, k x 116-byte bond           -> BONDS (the responder's recent bonds, same layout)
  SIGNED_IDS     u8 set, u32 k, k x 32s id          -> SIGNED_IDS (every id the responder holds in that set)
  SIGNED_GET     u8 set, u32 k, k x 32s id          -> EVIDENCE or BONDS: those records
  RECEIPT_SIGN   204-byte receipt body, 64s client signature -> RECEIPT_SIGNED 64s node signature
  ERROR          utf-8 reason
"""

from __future__ import annotations

import enum
import struct

from edge_agent.ledger.encoding import COMMITMENT_WIRE_SIZE, RECEIPT, RECEIPT_WIRE_SIZE, SIG_SIZE, EncodingError

MAGIC = b"EAS\x01"
MAX_MESSAGE = 8 << 20  # bytes; bigger messages are refused before parsing
MAX_RANGES = 1024  # ranges per SUMMARY
MAX_IDS = 4096  # ids per IDS status, per GET
MAX_RECORDS = 2000  # records per RECORDS / PUT / COMMITS
MAX_DEPTH = 16  # 4 bits of id per level: 64-bit prefixes
_RANGE = struct.Struct("<BQI16s")
_U32 = struct.Struct("<I")


class Msg(enum.IntEnum):
    SUMMARY = 1
    SUMMARY_REPLY = 2
    GET = 3
    RECORDS = 4
    PUT = 5
    PUT_REPLY = 6
    COMMITS_GET = 7
    COMMITS = 8
    RECEIPT_SIGN = 9
    RECEIPT_SIGNED = 10
    ERROR = 11
    EVIDENCE = 12
    BONDS = 13
    SIGNED_IDS = 14
    SIGNED_GET = 15


class SignedSet(enum.IntEnum):
    """The self-verifying record sets that sync reconciles by id (receipts have their own ranges)."""

    EVIDENCE = 1
    BONDS = 2


class Status(enum.IntEnum):
    EQUAL = 0
    SPLIT = 1
    IDS = 2


_MSG = {int(m): m for m in Msg}


class Reader:
    """A cursor over untrusted bytes: every read checks the bytes are there first."""

    def __init__(self, data: bytes) -> None:
        self.data, self.pos = memoryview(data), 0

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise EncodingError("message truncated")
        out = bytes(self.data[self.pos:self.pos + n])
        self.pos += n
        return out

    def u8(self) -> int:
        return self.take(1)[0]

    def u32(self) -> int:
        return _U32.unpack(self.take(4))[0]

    def count(self, item_size: int, limit: int) -> int:
        n = self.u32()
        if n > limit:
            raise EncodingError(f"{n} items in one message (limit {limit})")
        if n * item_size > len(self.data) - self.pos:
            raise EncodingError("message truncated")
        return n

    def items(self, item_size: int, limit: int) -> list[bytes]:
        return [self.take(item_size) for _ in range(self.count(item_size, limit))]

    def done(self) -> None:
        if self.pos != len(self.data):
            raise EncodingError("trailing bytes after the message")


def pack(kind: Msg, body: bytes = b"") -> bytes:
    return MAGIC + bytes((kind,)) + body


def unpack(payload: bytes) -> tuple[Msg, Reader]:
    """(type, reader of the body) of a ledger message; EncodingError when it is not one."""
    if len(payload) > MAX_MESSAGE:
        raise EncodingError(f"message of {len(payload)} bytes (limit {MAX_MESSAGE})")
    if len(payload) < 5 or bytes(payload[:4]) != MAGIC:
        raise EncodingError("not a ledger message")
    kind = _MSG.get(payload[4])
    if kind is None:
        raise EncodingError(f"unknown ledger message type {payload[4]}")
    return kind, Reader(bytes(payload[5:]))


def is_ledger_message(payload: bytes) -> bool:
    return bytes(payload[:4]) == MAGIC


def items(kind: Msg, records: list[bytes]) -> bytes:
    return pack(kind, _U32.pack(len(records)) + b"".join(records))


# -- summaries -------------------------------------------------------------------------------
def summary(ranges: list[tuple[int, int, int, bytes]]) -> bytes:
    return pack(Msg.SUMMARY, struct.pack("<H", len(ranges)) + b"".join(_RANGE.pack(*r) for r in ranges))


def read_summary(r: Reader) -> list[tuple[int, int, int, bytes]]:
    n = struct.unpack("<H", r.take(2))[0]
    if n > MAX_RANGES:
        raise EncodingError(f"{n} ranges in one summary (limit {MAX_RANGES})")
    out = []
    for _ in range(n):
        depth, prefix, count, fp = _RANGE.unpack(r.take(_RANGE.size))
        if depth > MAX_DEPTH or prefix >> (4 * depth):
            raise EncodingError(f"bad range: depth {depth}, prefix {prefix:#x}")
        out.append((depth, prefix, count, fp))
    r.done()
    return out


def summary_reply(statuses: list[tuple[Status, list[bytes]]]) -> bytes:
    parts = []
    for status, ids in statuses:
        parts.append(bytes((status,)))
        if status == Status.IDS:
            parts.append(_U32.pack(len(ids)) + b"".join(ids))
    return pack(Msg.SUMMARY_REPLY, b"".join(parts))


def read_summary_reply(r: Reader, n: int) -> list[tuple[Status, list[bytes]]]:
    out = []
    for _ in range(n):
        status = r.u8()
        if status == Status.IDS:
            out.append((Status.IDS, r.items(32, MAX_IDS)))
        elif status in (Status.EQUAL, Status.SPLIT):
            out.append((Status(status), []))
        else:
            raise EncodingError(f"unknown range status {status}")
    r.done()
    return out


# -- records ---------------------------------------------------------------------------------
def read_ids(r: Reader) -> list[bytes]:
    ids = r.items(32, MAX_IDS)
    r.done()
    return ids


def read_receipts(r: Reader) -> list[bytes]:
    out = r.items(RECEIPT_WIRE_SIZE, MAX_RECORDS)
    r.done()
    return out


def read_commitments(r: Reader) -> list[bytes]:
    out = r.items(COMMITMENT_WIRE_SIZE, MAX_RECORDS)
    r.done()
    return out


def put_reply(accepted: int, refused: list[tuple[int, str]]) -> bytes:
    parts = [_U32.pack(accepted), _U32.pack(len(refused))]
    for index, reason in refused:
        text = reason.encode()[:255]
        parts.append(_U32.pack(index) + bytes((len(text),)) + text)
    return pack(Msg.PUT_REPLY, b"".join(parts))


def read_put_reply(r: Reader) -> tuple[int, list[tuple[int, str]]]:
    accepted = r.u32()
    n = r.count(5, MAX_RECORDS)
    refused = []
    for _ in range(n):
        index = r.u32()
        refused.append((index, r.take(r.u8()).decode("utf-8", "replace")))
    r.done()
    return accepted, refused


MAX_EVIDENCE = 64  # evidence records per EVIDENCE message (the most recent ones are exchanged)
MAX_EVIDENCE_SIZE = 2048


def evidence(records: list[bytes]) -> bytes:
    return pack(Msg.EVIDENCE, _U32.pack(len(records)) + b"".join(struct.pack("<H", len(x)) + x for x in records))


def read_evidence(r: Reader) -> list[bytes]:
    out = []
    for _ in range(r.count(2, MAX_EVIDENCE)):
        size = struct.unpack("<H", r.take(2))[0]
        if size > MAX_EVIDENCE_SIZE:
            raise EncodingError(f"evidence of {size} bytes (limit {MAX_EVIDENCE_SIZE})")
        out.append(r.take(size))
    r.done()
    return out


MAX_BONDS = 256  # bonds per BONDS message (the most recent ones are exchanged)


def bonds(records: list[bytes]) -> bytes:
    return items(Msg.BONDS, records)


def read_bonds(r: Reader) -> list[bytes]:
    from edge_agent.ledger.stake import BOND_WIRE_SIZE

    out = r.items(BOND_WIRE_SIZE, MAX_BONDS)
    r.done()
    return out


MAX_SIGNED_IDS = 65536  # ids of one set per SIGNED_IDS message (2 MiB): past it, the newest


def signed_ids(kind: Msg, which: SignedSet, ids: list[bytes]) -> bytes:
    return pack(kind, bytes((which,)) + _U32.pack(len(ids)) + b"".join(ids))


def read_signed_ids(r: Reader, limit: int = MAX_SIGNED_IDS) -> tuple[SignedSet, list[bytes]]:
    raw = r.u8()
    if raw not in SignedSet._value2member_map_:
        raise EncodingError(f"unknown signed set {raw}")
    ids = r.items(32, limit)
    r.done()
    return SignedSet(raw), ids


def commits_get(request_id: bytes, start: int, end: int) -> bytes:
    return pack(Msg.COMMITS_GET, struct.pack("<16sHH", request_id, start, end))


def read_commits_get(r: Reader) -> tuple[bytes, int, int]:
    out = struct.unpack("<16sHH", r.take(20))
    r.done()
    return out


def receipt_sign(body: bytes, client_sig: bytes) -> bytes:
    return pack(Msg.RECEIPT_SIGN, body + client_sig)


def read_receipt_sign(r: Reader) -> tuple[bytes, bytes]:
    body, sig = r.take(RECEIPT.size), r.take(SIG_SIZE)
    r.done()
    return body, sig


def error(reason: str) -> bytes:
    return pack(Msg.ERROR, reason.encode()[:1000])
