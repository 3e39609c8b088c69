"""What membership gossip costs (edge_agent/discovery/membership.py), on loopback.

1. The codec and the signature checks: bytes of a full message, microseconds per record
   merged (both signatures, then presence only once the capability record is cached).
2. A swarm of N members in this process over real TLS, all told one bootstrap address:
   seconds until every member knows every other, gossip bytes per member per second once
   converged, and seconds until the killed bootstrap member has left every table.
3. With ``--membership dht`` (edge_agent/discovery/dht.py) instead: N serving members joined
   through one bootstrap address, the bytes one re-publish cycle costs a member (per minute at
   the default TTL), and a client's lookup of the servers of 8 layers (seconds, bytes, found).

    .venv/bin/python bench/membership.py --members 24 --interval 0.5
    .venv/bin/python bench/membership.py --membership dht --members 20
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from edge_agent.discovery.dht import DEFAULT_TTL_S, Dht  # noqa: E402
from edge_agent.discovery.identity import Identity, SwarmKey  # noqa: E402
from edge_agent.discovery.membership import Membership  # noqa: E402
from edge_agent.discovery.membership_wire import MAX_ENTRIES, PUSH, Beat, MemberRecord, Message, decode, encode  # noqa: E402
from edge_agent.discovery.peers import PeerTable  # noqa: E402
from membership_util import MODEL, LoopbackMember, sealed  # noqa: E402

SWARM = SwarmKey.from_secret("bench")
EXTRA = (("ar", "llamacpp;ub512;fa0;kv=f16"),)  # a real record's size: a serving node names its arithmetic


def codec_costs() -> dict:
    """Bytes of a full record and of a beat; microseconds to decode and to merge each kind."""
    idents = [Identity.generate() for _ in range(MAX_ENTRIES)]
    recs = [MemberRecord.signed(i, sealed(i, SWARM, extra=EXTRA), 1, ["10.0.0.1"]) for i in idents]
    full_msg = encode(Message(PUSH, records=recs))
    newer = [MemberRecord.signed(i, r.caps, 2, ["10.0.0.1"]) for i, r in zip(idents, recs)]
    beat_msg = encode(Message(PUSH, beats=[Beat(r.agent_id, r.counter, r.addresses, r.signature) for r in newer]))
    t0 = time.perf_counter()
    for _ in range(20):
        decode(full_msg)
    decode_us = (time.perf_counter() - t0) / 20 / len(recs) * 1e6
    me = Identity.generate()
    m = Membership(me, SWARM, PeerTable(SWARM, self_id=me.agent_id), connect=None)  # type: ignore[arg-type]
    t0 = time.perf_counter()
    m.merge(decode(full_msg))
    first_us = (time.perf_counter() - t0) / len(recs) * 1e6
    t0 = time.perf_counter()
    m.merge(decode(beat_msg))
    beat_us = (time.perf_counter() - t0) / len(recs) * 1e6
    return {"full_record_bytes": round(len(full_msg) / len(recs)), "beat_bytes": round(len(beat_msg) / len(recs)),
            "digest_bytes_per_member": 24, "decode_full_us": round(decode_us, 1),
            "merge_new_member_us": round(first_us, 1), "merge_beat_us": round(beat_us, 1)}


class Member(LoopbackMember):
    def __init__(self, bootstrap, interval_s: float, dht: bool = False, layers: tuple[int, int] = (0, 12)) -> None:
        super().__init__(SWARM, () if dht else bootstrap, interval_s=interval_s)  # with dht, the bootstrap is the DHT's
        self.dht = Dht(self.membership, bootstrap=bootstrap) if dht else None
        self.layers = layers

    async def start(self) -> "Member":
        await self.listen(self.layers, extra=EXTRA)
        if self.dht is not None:
            return self  # rounds are driven by dht_costs
        self.table.start(interval_s=0.25)
        await self.membership.start()
        return self


async def swarm_costs(n: int, interval_s: float, measure_s: float) -> dict:
    seed = await Member([], interval_s).start()
    t0 = time.monotonic()
    members = [seed] + [await Member([("127.0.0.1", seed.server.port)], interval_s).start() for _ in range(n - 1)]
    ids = {m.identity.agent_id for m in members}

    async def until(pred, limit_s: float) -> float | None:
        start = time.monotonic()
        while not pred():
            if time.monotonic() - start > limit_s:
                return None
            await asyncio.sleep(0.05)
        return time.monotonic()

    done = await until(lambda: all(len(m.table) == n - 1 for m in members), 120)
    converged_s = None if done is None else done - t0
    before = [m.membership.stats.bytes_sent for m in members]
    await asyncio.sleep(measure_s)
    sent = [m.membership.stats.bytes_sent - b for m, b in zip(members, before)]
    await seed.stop()
    t_kill = time.monotonic()
    rest = members[1:]
    gone = await until(lambda: all(seed.identity.agent_id not in m.table for m in rest), 60)
    whole = all({e.agent_id for e in m.table.peers()} == ids - {m.identity.agent_id, seed.identity.agent_id} for m in rest)
    for m in rest:
        await m.stop()
    return {"members": n, "interval_s": interval_s, "converged_s": None if converged_s is None else round(converged_s, 2),
            "gossip_bytes_per_member_per_s": round(sum(sent) / len(sent) / measure_s),
            "bootstrap_gone_everywhere_s": None if gone is None else round(gone - t_kill, 2),
            "rest_whole_after": whole}


async def dht_costs(n: int) -> dict:
    """n serving members (layer spans 0-7, 8-15, 16-23, 24-31 in turn) join one after another
    through the first; then one re-publish cycle for all (what each does every TTL/3), then a
    client that knows only the bootstrap address looks up layers 8..15."""
    seed = await Member([], 1.0, dht=True, layers=(0, 7)).start()
    boot = [("127.0.0.1", seed.server.port)]
    members = [seed]
    t0 = time.monotonic()
    for i in range(1, n):
        m = await Member(boot, 1.0, dht=True, layers=(8 * (i % 4), 8 * (i % 4) + 7)).start()
        await m.dht.round()
        members.append(m)
    joined_s = time.monotonic() - t0
    before = [m.dht.stats.bytes_sent for m in members]
    for m in members:
        m.dht._published_at = None  # due now
    await asyncio.gather(*(m.dht.round() for m in members))
    cycle = [m.dht.stats.bytes_sent - b for m, b in zip(members, before)]
    client_m = Member(boot, 1.0, dht=True)  # not started: no listener, no record (client mode)
    client = client_m.dht
    t0 = time.monotonic()
    found = await client.find_layers(MODEL, 8, 15)
    lookup_s = time.monotonic() - t0
    first_bytes = client.stats.bytes_sent + client.stats.bytes_received
    t0 = time.monotonic()
    again = await client.find_layers(MODEL, 8, 15, full=False)  # a refresh: GETs at the known holders
    again_s = time.monotonic() - t0
    expected = sum(1 for m in members if m.layers[0] <= 15 and m.layers[1] >= 8)
    for m in members:
        await m.server.close()
    cycles_per_min = 60 / (DEFAULT_TTL_S / 3)
    return {"members": n, "membership": "dht", "joined_s": round(joined_s, 2),
            "member_bytes_per_publish_cycle": round(sum(cycle) / n),
            "member_bytes_per_min": round(sum(cycle) / n * cycles_per_min),
            "routing_contacts_mean": round(sum(m.dht.contacts() for m in members) / n, 1),
            "client_lookup_s": round(lookup_s, 3), "client_lookup_bytes": first_bytes,
            "client_refresh_s": round(again_s, 3),
            "client_refresh_bytes": client.stats.bytes_sent + client.stats.bytes_received - first_bytes,
            "found": len(found), "found_on_refresh": len(again), "expected": expected,
            "client_knows": len(client_m.table)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--members", type=int, default=24)
    ap.add_argument("--interval", type=float, default=1.0, help="seconds between rounds (the agent's default: 1)")
    ap.add_argument("--measure", type=float, default=5.0, help="seconds of steady-state traffic to count")
    ap.add_argument("--membership", choices=("gossip", "dht"), default="gossip")
    args = ap.parse_args()
    if args.membership == "dht":
        print(json.dumps(asyncio.run(dht_costs(args.members))))
        return
    print(json.dumps(codec_costs()))
    print(json.dumps(asyncio.run(swarm_costs(args.members, args.interval, args.measure))))


if __name__ == "__main__":
    main()
