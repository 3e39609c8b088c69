"""Kademlia lookups and the capability-record store, with every control byte counted.

Ids are the first 64 bits of the agent id (an Ed25519 key, so uniform). Serving nodes
are DHT servers; clients run in client mode (they query, nobody routes through them).
A node's routing table holds, for each prefix length p, up to K contacts sharing exactly
p bits with it: the contacts it can name for a target are K random live ids of the
subtree the target shares one more bit with. A lookup is Kademlia's iterative one:
ALPHA queries per round, until the K closest ids seen have all been asked.

Records are the real signed TXT records (``nodes.sealed_record``). A serving node stores
its record under one key per layer segment it overlaps, on the K nodes closest to the
key; keys are split into buckets (``buckets``) so no key holds more than ~BUCKET_RECORDS
records however big the swarm (Petals keeps one key per block, whose value grows with n).
Message sizes: libp2p-Kademlia protobuf framing plus noise overhead, rounded up.
"""

from __future__ import annotations

import bisect
import hashlib
import random
from collections import defaultdict

K = 8  # replication and bucket size
ALPHA = 3
FIND_REQUEST_B = 100  # key + sender + framing
CONTACT_B = 56  # peer id (32) + one multiaddr (~24)
RESPONSE_HEADER_B = 40
PUT_OVERHEAD_B = 80  # key + framing around the record
ACK_B = 40
BUCKET_RECORDS = 32


def key_of(*parts: object) -> int:
    return int.from_bytes(hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest(), "big")


class Dht:
    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.ids: list[int] = []  # live servers, sorted
        self.bytes: dict[int, float] = defaultdict(float)  # node or client idx -> control bytes sent + received
        self.by_kind: dict[str, float] = defaultdict(float)  # "find" / "store" / "get" -> bytes on the wire
        self.owner: dict[int, int] = {}  # dht id -> idx
        self.store: dict[int, dict[int, tuple]] = defaultdict(dict)  # key -> {idx: (published_at, bytes, payload)}
        self.lookups = self.queries = 0

    def join(self, dht_id: int, idx: int) -> None:
        bisect.insort(self.ids, dht_id)
        self.owner[dht_id] = idx

    def leave(self, dht_id: int) -> None:
        i = bisect.bisect_left(self.ids, dht_id)
        if i < len(self.ids) and self.ids[i] == dht_id:
            del self.ids[i]
        self.owner.pop(dht_id, None)

    def _subtree(self, target: int, depth: int) -> tuple[int, int]:
        shift = 64 - depth
        lo = (target >> shift) << shift
        return bisect.bisect_left(self.ids, lo), bisect.bisect_left(self.ids, lo + (1 << shift))

    def _contacts(self, target: int, depth: int) -> list[int]:
        """What a node sharing ``depth - 1`` bits with ``target`` names for it: K of that bucket."""
        if depth > 64:
            return []
        i, j = self._subtree(target, depth)
        if j - i <= K:
            return self.ids[i:j]
        return [self.ids[x] for x in self.rng.sample(range(i, j), K)]

    def closest(self, target: int) -> list[int]:
        """The K live ids closest to ``target`` by XOR."""
        depth = 0
        while depth < 64:
            i, j = self._subtree(target, depth + 1)
            if j - i < K:
                break
            depth += 1
        i, j = self._subtree(target, depth)
        return sorted(self.ids[i:j], key=lambda x: x ^ target)[:K]

    def _charge(self, a: int, b: int, nbytes: float, kind: str) -> None:
        self.bytes[a] += nbytes
        self.bytes[b] += nbytes
        self.by_kind[kind] += nbytes

    def lookup(self, src_idx: int, src_id: int, target: int) -> list[int]:
        """Iterative FIND_NODE from ``src``; returns the K closest ids, charging every message."""
        self.lookups += 1
        if not self.ids:
            return []
        depth = 64 - (src_id ^ target).bit_length()
        shortlist = set(self._contacts(target, depth + 1) or self.closest(target))
        queried: set[int] = set()
        near = None
        while True:
            best = sorted(shortlist, key=lambda x: x ^ target)[:K]
            todo = [c for c in best if c not in queried][:ALPHA]
            if not todo:
                return best
            for q in todo:
                queried.add(q)
                self.queries += 1
                found = self._contacts(target, 64 - (q ^ target).bit_length() + 1)
                if not found:  # q is in the target's own bucket: it names its nearest
                    near = near if near is not None else self.closest(target)
                    found = near
                self._charge(src_idx, self.owner[q], FIND_REQUEST_B + RESPONSE_HEADER_B + CONTACT_B * len(found), "find")
                shortlist.update(found)

    def publish(self, src_idx: int, src_id: int, key: int, record_bytes: int, payload: tuple, now: float) -> None:
        """STORE the record on the K nodes closest to ``key``."""
        for holder in self.lookup(src_idx, src_id, key):
            self._charge(src_idx, self.owner[holder], record_bytes + PUT_OVERHEAD_B + ACK_B, "store")
        self.store[key][src_idx] = (now, record_bytes, payload)

    def fetch(self, src_idx: int, src_id: int, key: int, now: float, ttl_s: float) -> list[tuple]:
        """GET_VALUE from one of the key's holders: every unexpired record under it."""
        holders = self.lookup(src_idx, src_id, key)
        entries = self.store.get(key, {})
        for idx in [i for i, (t, _, _) in entries.items() if now - t > ttl_s]:
            del entries[idx]
        if holders:
            size = sum(nbytes + 8 for _, nbytes, _ in entries.values())
            self._charge(src_idx, self.owner[holders[0]], FIND_REQUEST_B + RESPONSE_HEADER_B + size, "get")
        return [(t, payload) for t, _, payload in entries.values()]
