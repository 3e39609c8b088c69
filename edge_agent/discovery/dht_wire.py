"""The DHT on the wire: FIND_NODE / FIND_VALUE / STORE and their reply, a bounded codec.

Contacts and values are both *member records* (membership_wire.MemberRecord: a sealed
capability record plus the owner's signed presence), so nothing a node learns through the
DHT, not even a routing contact's address, is unsigned.  A request carries the asker's
own record when it serves (so the answerer may add it to its routing table) and, for
STORE, the record to store.  Layout (big-endian), the payload of a transport CONTROL frame::

    message := MAGIC(4) kind(1) key(32) n_contacts(1) record*n_contacts n_values(1) record*n_values
    record  := caps_len(2) caps_txt presence        (membership_wire.write_record / read_record)

The magic differs from gossip's, so a node without the DHT passes these frames to its
hop server, which drops an unknown CONTROL frame.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass, field

from edge_agent.discovery.capabilities import Capabilities
from edge_agent.discovery.membership_wire import (MAX_RECORD_BYTES, MemberRecord, MembershipDecodeError, Reader,
                                                  read_record, write_record)

MAGIC = b"EAK\x01"
FIND_NODE, FIND_VALUE, STORE, REPLY, GET = 1, 2, 3, 4, 5  # GET: the values only (a refresh at a known holder)
KINDS = (FIND_NODE, FIND_VALUE, STORE, REPLY, GET)
K = 8  # replication and routing bucket size
MAX_CONTACTS = 2 * K  # a reply names K; the slack is for an asker's own record
MAX_VALUES = 32  # records per key (segment keys are bucketed to stay near this)
KEY_BYTES = 32
MAX_MESSAGE_BYTES = 4 + 1 + KEY_BYTES + 2 + (MAX_CONTACTS + MAX_VALUES) * MAX_RECORD_BYTES
SEGMENT_LAYERS = 4  # layers per segment key
SEGMENT_BUCKETS = 4  # buckets per segment: ~32 records per key up to ~128 servers of a segment


class DhtDecodeError(MembershipDecodeError):
    """Bytes that are not a well-formed DHT message."""


@dataclass
class DhtMessage:
    kind: int
    key: bytes = b"\x00" * KEY_BYTES
    contacts: list[MemberRecord] = field(default_factory=list)
    values: list[MemberRecord] = field(default_factory=list)


def node_id(agent_id: str) -> bytes:
    """A node's position: the hash of its Ed25519 public key, so nobody picks where to sit."""
    return hashlib.sha256(b"edge-agent dht node\x00" + bytes.fromhex(agent_id)).digest()


def segment_key(model_hash: str, segment: int, bucket: int) -> bytes:
    return hashlib.sha256(b"edge-agent dht segment\x00" + model_hash.encode("ascii")
                          + struct.pack(">IB", segment, bucket)).digest()


def segments_of(first: int, last: int) -> range:
    """The segments layers first..last (inclusive) overlap."""
    return range(first // SEGMENT_LAYERS, last // SEGMENT_LAYERS + 1)


def bucket_of(agent_id: str) -> int:
    return bytes.fromhex(agent_id)[-1] % SEGMENT_BUCKETS


def publish_keys(caps: Capabilities) -> list[bytes]:
    """The keys a serving node stores its record under: one per segment its shards overlap."""
    keys = [segment_key(m, s, bucket_of(caps.agent_id)) for m, a, b in caps.shards for s in segments_of(a, b)]
    return list(dict.fromkeys(keys))[:MAX_VALUES]


def lookup_keys(model_hash: str, first: int, last: int) -> list[bytes]:
    """The keys a client fetches to find who serves layers first..last: every bucket of each segment."""
    return [segment_key(model_hash, s, b) for s in segments_of(first, last) for b in range(SEGMENT_BUCKETS)]


def encode(msg: DhtMessage) -> bytes:
    if msg.kind not in KINDS or len(msg.key) != KEY_BYTES:
        raise ValueError("bad DHT message")
    out = bytearray(MAGIC + bytes((msg.kind,)) + msg.key)
    for records, limit in ((msg.contacts, MAX_CONTACTS), (msg.values, MAX_VALUES)):
        records = records[:limit]
        out.append(len(records))
        for r in records:
            write_record(out, r)
    return bytes(out)


def is_dht_message(payload: bytes | memoryview) -> bool:
    return bytes(payload[:4]) == MAGIC


def decode(payload: bytes | memoryview) -> DhtMessage:
    """Parse an untrusted message (signatures are *not* checked here)."""
    data = bytes(payload[:MAX_MESSAGE_BYTES + 1])
    if len(data) > MAX_MESSAGE_BYTES:
        raise DhtDecodeError(f"message over {MAX_MESSAGE_BYTES} bytes")
    r = Reader(data)
    try:
        if len(data) < 5 + KEY_BYTES or r.take(4) != MAGIC:
            raise DhtDecodeError("not a DHT message")
        msg = DhtMessage(r.u8(), r.take(KEY_BYTES))
        if msg.kind not in KINDS:
            raise DhtDecodeError(f"unknown message kind {msg.kind}")
        for records, limit in ((msg.contacts, MAX_CONTACTS), (msg.values, MAX_VALUES)):
            n = r.u8()
            if n > limit:
                raise DhtDecodeError(f"{n} records, limit {limit}")
            for _ in range(n):
                records.append(read_record(r))
        if r.pos != len(data):
            raise DhtDecodeError("trailing bytes")
    except DhtDecodeError:
        raise
    except MembershipDecodeError as exc:  # the reader's and the record codec's: ours to the DHT's callers
        raise DhtDecodeError(str(exc)) from None
    return msg

