"""Membership gossip on the wire: signed member records, digests and the bounded codec.

A *member record* is a node's sealed capability record (capabilities.py) plus a
*presence* statement the node signs itself: a heartbeat counter that only grows and the
addresses it can be reached at.  The presence signature covers the hash of the whole
sealed capability record (its swarm MAC included), so an old record cannot be paired with
a new heartbeat and a record of another swarm cannot be smuggled under ours.  Relays can
forge neither; what a relay adds (``age_ms``: how long ago *it* saw the counter grow) is
unsigned and only ever makes a record older.

Why digests: the capability record (~400 bytes) rarely changes, the heartbeat (~110
bytes) changes every few seconds.  An exchange is SYN (the asker's digest: per member an
id prefix, the counter and a capability hash prefix), ACK (the records the asker lacks or
holds older, plus the answerer's digest) and PUSH (what the answerer lacks).  A record
travels *full* only to whom lacks its capability record, else as a *beat* (presence
only), and only when it is news.

Why a hand-written codec: messages come from other machines, so every length is checked
against a limit before it is used and any defect raises `MembershipDecodeError`.  Layout
(big-endian), the payload of a transport CONTROL frame::

    message := MAGIC(4) kind(1) n_digest(2) digest*n_digest n_entries(2) entry*n_entries
    digest  := id_prefix(8) counter(8) caps_prefix(8)
    entry   := 1 caps_len(2) caps_txt presence | 2 agent_id(32) presence
    presence:= counter(8) age_ms(4) n_addr(1) (len(1) ascii)*n_addr sig(64)
"""

from __future__ import annotations

import hashlib
import ipaddress
import struct
from dataclasses import dataclass, field

from edge_agent.discovery.capabilities import MAX_DECODE_BYTES, Capabilities, CapabilityDecodeError
from edge_agent.discovery.identity import Identity, verify as ed25519_verify

MAGIC = b"EAM\x02"  # distinct from the ledger's b"EAS\x01": the hop listener routes on it
SYN, ACK, PUSH = 1, 2, 3
PRESENCE_DOMAIN = b"edge-agent presence v1\x00"
MAX_DIGEST = 1024  # members described per message (the peer table holds at most 1024)
MAX_ENTRIES = 256  # records per message; more news waits for the next round
MAX_ADDRESSES = 4
MAX_ADDRESS_CHARS = 45  # the longest textual IPv6 address
MAX_AGE_MS = 0xFFFFFFFF
MAX_COUNTER = 2**63 - 1
PREFIX = 8
_PRESENCE_MAX = 8 + 4 + 1 + MAX_ADDRESSES * (1 + MAX_ADDRESS_CHARS) + 64
MAX_RECORD_BYTES = 2 + MAX_DECODE_BYTES + _PRESENCE_MAX  # a whole record: caps_len(2) caps_txt presence
MAX_MESSAGE_BYTES = 9 + MAX_DIGEST * 3 * PREFIX + MAX_ENTRIES * (1 + MAX_RECORD_BYTES)
_FULL, _BEAT = 1, 2
_DIGEST = struct.Struct(">8sQ8s")
_PRESENCE = struct.Struct(">QIB")

Digest = dict[bytes, tuple[int, bytes]]  # id prefix -> (counter, caps hash prefix)


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
    caps_txt: bytes = field(default=b"", repr=False, compare=False)  # the sealed record's bytes (no re-encoding)

    def __post_init__(self) -> None:
        if not self.caps_txt:
            object.__setattr__(self, "caps_txt", self.caps.to_txt())

    @property
    def agent_id(self) -> str:
        return self.caps.agent_id

    @property
    def caps_hash(self) -> bytes:
        return hashlib.sha256(self.caps_txt).digest()

    @classmethod
    def signed(cls, identity: Identity, caps: Capabilities, counter: int,
               addresses: tuple[str, ...] | list[str]) -> "MemberRecord":
        """Our own record: `caps` must be sealed by `identity`."""
        addrs = check_addresses(addresses)
        if caps.agent_id != identity.agent_id:
            raise ValueError("capability record of another agent")
        txt = caps.to_txt()
        return cls(caps, counter, addrs, identity.sign(presence_bytes(txt, counter, addrs)), caps_txt=txt)

    def presence_holds(self) -> bool:
        """The owner's presence signature (the capability record's own seal is checked apart)."""
        msg = presence_bytes(self.caps_txt, self.counter, self.addresses)
        return ed25519_verify(bytes.fromhex(self.caps.agent_id), msg, self.signature)

    def verify(self, swarm_key) -> bool:
        """Both signatures hold and the capability record belongs to `swarm_key`'s swarm."""
        return self.caps.verify(swarm_key) and self.presence_holds()

    def with_presence(self, counter: int, addresses: tuple[str, ...], signature: bytes, age_ms: int) -> "MemberRecord":
        """The same capability record under a newer presence (a beat); verify before use."""
        return MemberRecord(self.caps, counter, addresses, signature, age_ms, self.caps_txt)

    def with_age(self, age_ms: float) -> "MemberRecord":
        age = min(MAX_AGE_MS, max(0, int(age_ms)))
        return MemberRecord(self.caps, self.counter, self.addresses, self.signature, age, self.caps_txt)

    def digest_entry(self) -> tuple[bytes, tuple[int, bytes]]:
        return bytes.fromhex(self.agent_id)[:PREFIX], (self.counter, self.caps_hash[:PREFIX])


@dataclass(frozen=True)
class Beat:
    """A presence for a member whose capability record the receiver already holds."""

    agent_id: str
    counter: int
    addresses: tuple[str, ...]
    signature: bytes
    age_ms: int = 0


@dataclass
class Message:
    kind: int
    digest: Digest = field(default_factory=dict)
    records: list[MemberRecord] = field(default_factory=list)
    beats: list[Beat] = field(default_factory=list)


def check_addresses(addresses: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """Textual IP addresses only (no host names: nothing to resolve, nothing to spoof via DNS)."""
    out = []
    for a in list(dict.fromkeys(addresses))[:MAX_ADDRESSES]:
        if not isinstance(a, str) or len(a) > MAX_ADDRESS_CHARS:
            raise ValueError(f"bad address {a!r}")
        out.append(str(ipaddress.ip_address(a)))  # canonical form; ValueError if not an IP
    return tuple(out)


def presence_bytes(caps_txt: bytes, counter: int, addresses: tuple[str, ...]) -> bytes:
    """What the owner signs: the sealed record's hash, the counter and the addresses."""
    if not 0 <= counter <= MAX_COUNTER:
        raise ValueError("counter out of range")
    packed = b"".join(bytes((len(a),)) + a.encode("ascii") for a in addresses)
    return (PRESENCE_DOMAIN + hashlib.sha256(caps_txt).digest() + struct.pack(">Q", counter)
            + bytes((len(addresses),)) + packed)


# -- encoding ------------------------------------------------------------------------------

def encode(msg: Message) -> bytes:
    if msg.kind not in (SYN, ACK, PUSH):
        raise ValueError("unknown message kind")
    digest = list(msg.digest.items())[:MAX_DIGEST]
    out = bytearray(MAGIC + bytes((msg.kind,)) + struct.pack(">H", len(digest)))
    for prefix, (counter, caps) in digest:
        out += _DIGEST.pack(prefix, counter, caps)
    entries = [(_FULL, r) for r in msg.records] + [(_BEAT, b) for b in msg.beats]
    entries = entries[:MAX_ENTRIES]
    out += struct.pack(">H", len(entries))
    for tag, e in entries:
        out.append(tag)
        if tag == _FULL:
            write_record(out, e)
        else:
            out += bytes.fromhex(e.agent_id)
            _write_presence(out, e)
    return bytes(out)


def write_record(out: bytearray, r: MemberRecord) -> None:
    """Append a whole record (the DHT's messages carry records in this layout too)."""
    out += struct.pack(">H", len(r.caps_txt)) + r.caps_txt
    _write_presence(out, r)


def _write_presence(out: bytearray, e: MemberRecord | Beat) -> None:
    out += _PRESENCE.pack(e.counter, e.age_ms, len(e.addresses))
    for a in e.addresses:
        out += bytes((len(a),)) + a.encode("ascii")
    out += e.signature


def is_membership_message(payload: bytes | memoryview) -> bool:
    return bytes(payload[:4]) == MAGIC


# -- decoding (untrusted) ------------------------------------------------------------------

class Reader:
    """Bounds-checked reads from an untrusted message; past its end is `MembershipDecodeError`."""

    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise MembershipDecodeError("truncated message")
        self.pos += n
        return self.data[self.pos - n:self.pos]

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        return struct.unpack(">H", self.take(2))[0]


def decode(payload: bytes | memoryview) -> Message:
    """Parse an untrusted message (signatures are *not* checked here)."""
    data = bytes(payload[:MAX_MESSAGE_BYTES + 1])
    if len(data) > MAX_MESSAGE_BYTES:
        raise MembershipDecodeError(f"message over {MAX_MESSAGE_BYTES} bytes")
    r = Reader(data)
    if len(data) < 5 or r.take(4) != MAGIC:
        raise MembershipDecodeError("not a membership message")
    msg = Message(r.u8())
    if msg.kind not in (SYN, ACK, PUSH):
        raise MembershipDecodeError(f"unknown message kind {msg.kind}")
    n = r.u16()
    if n > MAX_DIGEST:
        raise MembershipDecodeError(f"digest of {n} members, limit {MAX_DIGEST}")
    for _ in range(n):
        prefix, counter, caps = _DIGEST.unpack(r.take(_DIGEST.size))
        msg.digest[prefix] = (counter, caps)
    n = r.u16()
    if n > MAX_ENTRIES:
        raise MembershipDecodeError(f"{n} records, limit {MAX_ENTRIES}")
    for _ in range(n):
        tag = r.u8()
        if tag == _FULL:
            msg.records.append(read_record(r))
        elif tag == _BEAT:
            agent_id = r.take(32).hex()
            counter, age, addrs, sig = _presence(r)
            msg.beats.append(Beat(agent_id, counter, addrs, sig, age))
        else:
            raise MembershipDecodeError(f"unknown entry type {tag}")
    if r.pos != len(data):
        raise MembershipDecodeError("trailing bytes")
    return msg


def read_record(r: Reader) -> MemberRecord:
    """A whole record, as `write_record` lays it out (signatures are *not* checked here)."""
    caps_len = r.u16()
    if caps_len > MAX_DECODE_BYTES:
        raise MembershipDecodeError(f"capability record of {caps_len} bytes")
    txt = r.take(caps_len)
    try:
        caps = Capabilities.from_txt(txt)
    except CapabilityDecodeError as exc:
        raise MembershipDecodeError(str(exc)) from None
    counter, age, addrs, sig = _presence(r)
    return MemberRecord(caps, counter, addrs, sig, age, txt)


def _presence(r: Reader) -> tuple[int, int, tuple[str, ...], bytes]:
    counter, age_ms, n_addr = _PRESENCE.unpack(r.take(_PRESENCE.size))
    if counter > MAX_COUNTER or n_addr > MAX_ADDRESSES:
        raise MembershipDecodeError("counter or address count out of range")
    addresses = []
    for _ in range(n_addr):
        size = r.u8()
        if not 0 < size <= MAX_ADDRESS_CHARS:
            raise MembershipDecodeError("bad address length")
        addresses.append(r.take(size).decode("ascii", errors="replace"))
    try:
        addrs = check_addresses(addresses)
    except ValueError as exc:
        raise MembershipDecodeError(str(exc)) from None
    if addrs != tuple(addresses):
        raise MembershipDecodeError("addresses not in canonical form")
    return counter, age_ms, addrs, r.take(64)
