"""Membership gossip on the wire: signed member records and the bounded exchange message.

A *member record* is a node's sealed capability record (capabilities.py) plus a
*presence* statement the node signs itself: a heartbeat counter that only grows and the
addresses it can be reached at.  The presence signature covers the hash of the whole
sealed capability record (its swarm MAC included), so an old record cannot be paired
with a new heartbeat, and a record of another swarm cannot be smuggled under ours.
Relays cannot forge either part; what a relay adds (``age_ms``, how long ago *it* saw
the counter grow) is unsigned and only ever used as a hint that makes a record older.

Why a hand-written codec: messages come from other machines, so every length is checked
against a limit before it is used and any defect raises `MembershipDecodeError`.  Layout
(big-endian), carried as the payload of a transport CONTROL frame::

    message := MAGIC(4) kind(1) count(1) entry*count
    entry   := caps_len(2) caps_txt  counter(8) age_ms(4) n_addr(1) (len(1) ascii)*n_addr  sig(64)
"""

from __future__ import annotations

import hashlib
import ipaddress
import struct
from dataclasses import dataclass

from edge_agent.discovery.capabilities import MAX_DECODE_BYTES, Capabilities, CapabilityDecodeError
from edge_agent.discovery.identity import Identity, verify as ed25519_verify

MAGIC = b"EAM\x01"  # distinct from the ledger's b"EAS\x01": the hop listener routes on it
KIND_EXCHANGE = 1  # "here are records I know; send me yours"
KIND_REPLY = 2
PRESENCE_DOMAIN = b"edge-agent presence v1\x00"
MAX_ENTRIES = 64  # records per message: a message stays under ~50 KB whatever the swarm size
MAX_ADDRESSES = 4
MAX_ADDRESS_CHARS = 45  # the longest textual IPv6 address
MAX_AGE_MS = 0xFFFFFFFF
MAX_COUNTER = 2**63 - 1
_ENTRY_FIXED = 2 + 8 + 4 + 1 + 64
MAX_MESSAGE_BYTES = 6 + MAX_ENTRIES * (_ENTRY_FIXED + MAX_DECODE_BYTES + MAX_ADDRESSES * (1 + MAX_ADDRESS_CHARS))
_HEAD = struct.Struct(">4sBB")
_TAIL = struct.Struct(">QIB")


class MembershipDecodeError(ValueError):
    """Bytes that are not a well-formed membership message."""


@dataclass(frozen=True)
class MemberRecord:
    """One member as its owner describes it; `age_ms` is the relay's unsigned freshness hint."""

    caps: Capabilities
    counter: int
    addresses: tuple[str, ...]
    signature: bytes
    age_ms: int = 0

    @property
    def agent_id(self) -> str:
        return self.caps.agent_id

    @classmethod
    def signed(cls, identity: Identity, caps: Capabilities, counter: int,
               addresses: tuple[str, ...] | list[str]) -> "MemberRecord":
        """Our own record: `caps` must be sealed by `identity`."""
        addrs = check_addresses(addresses)
        if caps.agent_id != identity.agent_id:
            raise ValueError("capability record of another agent")
        msg = presence_bytes(caps, counter, addrs)
        return cls(caps, counter, addrs, identity.sign(msg))

    def verify(self, swarm_key) -> bool:
        """Both signatures hold and the capability record belongs to `swarm_key`'s swarm."""
        try:
            if not self.caps.verify(swarm_key):
                return False
            msg = presence_bytes(self.caps, self.counter, self.addresses)
        except ValueError:  # e.g. a record too big to re-encode: not one we would emit
            return False
        return ed25519_verify(bytes.fromhex(self.caps.agent_id), msg, self.signature)

    def with_age(self, age_ms: float) -> "MemberRecord":
        age = min(MAX_AGE_MS, max(0, int(age_ms)))
        return MemberRecord(self.caps, self.counter, self.addresses, self.signature, age)


def check_addresses(addresses: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """Textual IP addresses only (no host names: nothing to resolve, nothing to spoof via DNS)."""
    out = []
    for a in list(dict.fromkeys(addresses))[:MAX_ADDRESSES]:
        if not isinstance(a, str) or len(a) > MAX_ADDRESS_CHARS:
            raise ValueError(f"bad address {a!r}")
        out.append(str(ipaddress.ip_address(a)))  # canonical form; ValueError if not an IP
    return tuple(out)


def presence_bytes(caps: Capabilities, counter: int, addresses: tuple[str, ...]) -> bytes:
    """What the owner signs: the sealed record's hash, the counter and the addresses."""
    if not 0 <= counter <= MAX_COUNTER:
        raise ValueError("counter out of range")
    packed = b"".join(bytes((len(a),)) + a.encode("ascii") for a in addresses)
    return (PRESENCE_DOMAIN + hashlib.sha256(caps.to_txt()).digest() + struct.pack(">Q", counter)
            + bytes((len(addresses),)) + packed)


def encode(kind: int, records: list[MemberRecord] | tuple[MemberRecord, ...]) -> bytes:
    if kind not in (KIND_EXCHANGE, KIND_REPLY):
        raise ValueError("unknown message kind")
    records = list(records)[:MAX_ENTRIES]
    out = bytearray(_HEAD.pack(MAGIC, kind, len(records)))
    for r in records:
        txt = r.caps.to_txt()
        out += struct.pack(">H", len(txt)) + txt
        out += _TAIL.pack(r.counter, r.age_ms, len(r.addresses))
        for a in r.addresses:
            out += bytes((len(a),)) + a.encode("ascii")
        out += r.signature
    return bytes(out)


def is_membership_message(payload: bytes | memoryview) -> bool:
    return bytes(payload[:4]) == MAGIC


def decode(payload: bytes | memoryview) -> tuple[int, list[MemberRecord]]:
    """Parse an untrusted message (signatures are *not* checked here: see `MemberRecord.verify`)."""
    data = bytes(payload[:MAX_MESSAGE_BYTES + 1])
    if len(data) > MAX_MESSAGE_BYTES:
        raise MembershipDecodeError(f"message over {MAX_MESSAGE_BYTES} bytes")
    if len(data) < _HEAD.size:
        raise MembershipDecodeError("message too short")
    magic, kind, count = _HEAD.unpack_from(data)
    if magic != MAGIC or kind not in (KIND_EXCHANGE, KIND_REPLY):
        raise MembershipDecodeError("not a membership message")
    if count > MAX_ENTRIES:
        raise MembershipDecodeError(f"{count} records, limit {MAX_ENTRIES}")
    pos, records = _HEAD.size, []
    for _ in range(count):
        record, pos = _entry(data, pos)
        records.append(record)
    if pos != len(data):
        raise MembershipDecodeError("trailing bytes")
    return kind, records


def _take(data: bytes, pos: int, n: int) -> tuple[bytes, int]:
    if pos + n > len(data):
        raise MembershipDecodeError("truncated record")
    return data[pos:pos + n], pos + n


def _entry(data: bytes, pos: int) -> tuple[MemberRecord, int]:
    raw, pos = _take(data, pos, 2)
    (caps_len,) = struct.unpack(">H", raw)
    if caps_len > MAX_DECODE_BYTES:
        raise MembershipDecodeError(f"capability record of {caps_len} bytes")
    txt, pos = _take(data, pos, caps_len)
    try:
        caps = Capabilities.from_txt(txt)
    except CapabilityDecodeError as exc:
        raise MembershipDecodeError(str(exc)) from None
    raw, pos = _take(data, pos, _TAIL.size)
    counter, age_ms, n_addr = _TAIL.unpack(raw)
    if counter > MAX_COUNTER or n_addr > MAX_ADDRESSES:
        raise MembershipDecodeError("counter or address count out of range")
    addresses = []
    for _ in range(n_addr):
        raw, pos = _take(data, pos, 1)
        if not 0 < raw[0] <= MAX_ADDRESS_CHARS:
            raise MembershipDecodeError("bad address length")
        text, pos = _take(data, pos, raw[0])
        addresses.append(text.decode("ascii", errors="replace"))
    try:
        addrs = check_addresses(addresses)
    except ValueError as exc:
        raise MembershipDecodeError(str(exc)) from None
    if addrs != tuple(addresses):
        raise MembershipDecodeError("addresses not in canonical form")
    sig, pos = _take(data, pos, 64)
    return MemberRecord(caps, counter, addrs, sig, age_ms), pos
