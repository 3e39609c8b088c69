"""Membership beyond one LAN (edge_agent/discovery/membership*.py) on loopback: the bounded
codec, record signatures, and real agents gossiping over real TLS channels.  The sites-and-
router version of these tests is tests/test_membership_netns.py.  Every wait is bounded."""

from __future__ import annotations

import asyncio
import logging
import struct
import time
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_agent.discovery.capabilities import Capabilities
from edge_agent.discovery.identity import Identity, SwarmKey
from edge_agent.discovery.membership import Membership
from edge_agent.discovery.membership_wire import (ACK, MAGIC, MAX_DIGEST, MAX_ENTRIES, MAX_MESSAGE_BYTES, PUSH, SYN, Beat,
                                                  MemberRecord, MembershipDecodeError, Message, decode, encode)
from edge_agent.discovery.peers import PeerTable
from edge_agent.transport import Frame, MsgType, PeerLostError, tls
from membership_util import MODEL, LoopbackMember, decode_or_refuse, mutated, record

SECRET = "membership test secret"


# -- codec and signatures ----------------------------------------------------------------

def test_roundtrip_and_verify() -> None:
    swarm = SwarmKey.from_secret(SECRET)
    recs = [record(swarm, counter=i + 1, addresses=("10.0.0.1", "fd00::1")) for i in range(3)]
    beat = recs[0]
    msg = Message(ACK, dict(r.digest_entry() for r in recs), recs,
                  [Beat(beat.agent_id, beat.counter, beat.addresses, beat.signature, 1234)])
    back = decode(encode(msg))
    assert back == msg
    assert all(r.verify(swarm) for r in back.records)
    assert not back.records[0].verify(SwarmKey.from_secret("another swarm"))
    assert not back.records[0].verify(SwarmKey.from_secret(None))
    assert decode(encode(Message(SYN))) == Message(SYN)


def test_relays_cannot_forge() -> None:
    swarm = SwarmKey.from_secret(SECRET)
    r = record(swarm)
    assert not replace(r, counter=r.counter + 1).verify(swarm)  # a relay keeping a dead member alive
    assert not replace(r, addresses=("10.6.6.6",)).verify(swarm)  # a relay redirecting traffic
    other = record(swarm)
    assert not replace(r, caps=other.caps, caps_txt=other.caps_txt).verify(swarm)  # a presence under another record
    assert not r.with_presence(r.counter, r.addresses, other.signature, 0).verify(swarm)
    mallory = Identity.generate()  # a member signing a presence for someone else
    assert not r.with_presence(r.counter + 1, r.addresses, mallory.sign(b"anything"), 0).verify(swarm)
    assert r.with_age(123_456).verify(swarm)  # the age hint is unsigned: it can only make a record older
    with pytest.raises(ValueError):
        MemberRecord.signed(mallory, r.caps, 1, ())  # our own record must be ours
    with pytest.raises(ValueError):
        MemberRecord.signed(Identity.generate(), r.caps, 1, ("not-an-ip.example",))


def test_bounds_are_enforced_before_use() -> None:
    swarm = SwarmKey.from_secret(SECRET)
    one = encode(Message(PUSH, {}, [record(swarm)]))
    cases = {
        b"": "not a membership message",
        b"EAX\x02\x01\x00\x00\x00\x00": "not a membership message",
        MAGIC + b"\x07\x00\x00\x00\x00": "unknown message kind",
        MAGIC + b"\x01" + struct.pack(">H", MAX_DIGEST + 1): "digest of",
        MAGIC + b"\x01\x00\x00" + struct.pack(">H", MAX_ENTRIES + 1): "records, limit",
        MAGIC + b"\x01\x00\x00\x00\x01\x09": "unknown entry type",
        one[:-1]: "truncated",
        one + b"\x00": "trailing",
        MAGIC + b"\x01\x00\x00\x00\x01\x01" + struct.pack(">H", 60000): "capability record of 60000 bytes",
        b"\x00" * (MAX_MESSAGE_BYTES + 1): "over",
    }
    for raw, msg in cases.items():
        with pytest.raises(MembershipDecodeError, match=msg):
            decode(raw)
    many = Message(SYN, {bytes([i % 256, i // 256]) * 4: (i, b"\x00" * 8) for i in range(MAX_DIGEST + 5)},
                   [record(swarm) for _ in range(MAX_ENTRIES + 5)])
    raw = encode(many)
    assert len(raw) < MAX_MESSAGE_BYTES
    back = decode(raw)
    assert len(back.digest) == MAX_DIGEST and len(back.records) == MAX_ENTRIES
    bad_addr = bytearray(one)
    at = bad_addr.index(b"10.0.0.1")
    bad_addr[at:at + 8] = b"10.0.0.x"
    with pytest.raises(MembershipDecodeError):
        decode(bytes(bad_addr))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2048))
def test_fuzz_random_bytes(raw: bytes) -> None:
    for data in (raw, MAGIC + raw):
        decode_or_refuse(decode, MembershipDecodeError, data)


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_fuzz_mutated_message(data: st.DataObject) -> None:
    swarm = SwarmKey.from_secret(SECRET)
    a, b = record(swarm), record(swarm)
    raw = encode(Message(ACK, dict([a.digest_entry()]), [a], [Beat(b.agent_id, b.counter, b.addresses, b.signature)]))
    msg = decode_or_refuse(decode, MembershipDecodeError, mutated(raw, data))
    if msg is not None:
        for r in msg.records:  # whatever parses may be checked without an exception
            r.verify(swarm)


# -- merge rules, no network -------------------------------------------------------------

def test_merge_takes_news_only_and_refuses_replays() -> None:
    swarm = SwarmKey.from_secret(SECRET)
    now = [100.0]
    me = Identity.generate()
    table = PeerTable(swarm, self_id=me.agent_id, stale_after_s=5.0, clock=lambda: now[0])
    m = Membership(me, swarm, table, connect=None, clock=lambda: now[0])  # type: ignore[arg-type]
    peer = Identity.generate()
    old = record(swarm, counter=10, identity=peer)
    assert m.merge(Message(PUSH, records=[old])) == 1 and peer.agent_id in table
    assert table.get(peer.agent_id).sources == {"gossip"}
    assert m.merge(Message(PUSH, records=[old])) == 0  # no news
    now[0] += 6
    assert [e.kind for e in table.expire()] == ["left"]
    assert m.merge(Message(PUSH, records=[old.with_age(0)])) == 0  # a relay replaying the dead member's last record
    assert peer.agent_id not in table and m.live_records() == []
    newer = record(swarm, counter=11, identity=peer)  # it restarted: its counter grew (a beat is enough)
    assert m.merge(Message(PUSH, beats=[Beat(peer.agent_id, 11, newer.addresses, newer.signature)])) == 1
    assert peer.agent_id in table
    stranger = record(swarm, counter=3)  # a beat for a member we hold no capability record of: ignored
    assert m.merge(Message(PUSH, beats=[Beat(stranger.agent_id, 3, stranger.addresses, stranger.signature)])) == 0
    stale = record(swarm, counter=1)  # first heard of, but the relay last saw it 60 s ago
    assert m.merge(Message(PUSH, records=[stale.with_age(60_000)])) == 1 and stale.agent_id not in table
    outsider = record(SwarmKey.from_secret("other"), counter=99)
    forged = replace(record(swarm, counter=3), counter=4)
    bad_beat = Beat(peer.agent_id, 12, newer.addresses, newer.signature)  # an old signature under a new counter
    assert m.merge(Message(PUSH, records=[outsider, forged], beats=[bad_beat])) == 0
    assert table.rejected == 3 and m.stats.records_rejected == 3


def test_digests_send_only_news_and_capability_records_only_once() -> None:
    swarm = SwarmKey.from_secret(SECRET)
    me = Identity.generate()
    m = Membership(me, swarm, PeerTable(swarm, self_id=me.agent_id), connect=None)  # type: ignore[arg-type]
    recs = [record(swarm, counter=5) for _ in range(MAX_ENTRIES + 10)]
    m.merge(Message(PUSH, records=recs))
    full, beats = m.news_for({})
    assert len(full) == MAX_ENTRIES and beats == []  # a newcomer gets whole records, bounded per message
    caps = Capabilities(me.agent_id, tls_port=1).sealed(me, swarm)
    m.advertise(caps, ["node.example", "127.0.0.1"])  # a host name given as --host is left out
    assert m.own.addresses == ("127.0.0.1",)
    first = m.own
    m.advertise(caps, ["127.0.0.1"])
    assert m.own.counter > first.counter and m.own.verify(swarm)
    theirs = m.digest()
    assert len(theirs) == len(recs) + 1 and m.news_for(theirs) == ([], [])  # in sync: nothing to send
    older = dict(theirs)
    prefix, (counter, caps_prefix) = m.own.digest_entry()
    older[prefix] = (counter - 1, caps_prefix)
    assert m.news_for(older) == ([], [Beat(me.agent_id, m.own.counter, m.own.addresses, m.own.signature)])
    older[prefix] = (counter - 1, b"\x00" * 8)  # they hold another capability record of ours: the whole record
    assert m.news_for(older) == ([m.own], [])


def test_large_batches_are_checked_off_the_event_loop_with_the_same_verdicts() -> None:
    swarm = SwarmKey.from_secret(SECRET)
    me = Identity.generate()
    m = Membership(me, swarm, PeerTable(swarm, self_id=me.agent_id), connect=None)  # type: ignore[arg-type]
    good = [record(swarm) for _ in range(20)]
    bad = [replace(record(swarm), counter=9), record(SwarmKey.from_secret("other"))]
    assert asyncio.run(m.merge_async(Message(PUSH, records=good + bad))) == 20
    assert m.stats.records_rejected == 2 and len(m.table) == 20
    beats = [Beat(r.agent_id, r.counter + 1, r.addresses, r.signature) for r in good]  # old signatures
    assert asyncio.run(m.merge_async(Message(PUSH, beats=beats))) == 0 and m.stats.records_rejected == 22


def test_a_failing_round_is_logged_and_the_rounds_go_on_until_closed(caplog) -> None:
    """The background loop (discovery/periodic.py, shared with the peer table and the DHT)."""
    swarm = SwarmKey.from_secret(SECRET)
    me = Identity.generate()
    m = Membership(me, swarm, PeerTable(swarm, self_id=me.agent_id), connect=None,  # type: ignore[arg-type]
                   bootstrap=[("127.0.0.1", 1)], interval_s=0.01)
    rounds: list[int] = []

    async def run_round(n: int) -> None:
        rounds.append(n)
        if len(rounds) == 2:
            raise RuntimeError("a bug in one round")

    m.run_round = run_round  # type: ignore[method-assign]

    async def main() -> int:
        await m.start()
        await m.start()  # a second start while it runs changes nothing
        await until(lambda: len(rounds) >= 3, 5, "three rounds")
        await m.close()
        closed_at = len(rounds)
        await asyncio.sleep(0.1)
        assert len(rounds) == closed_at  # closed: no round runs any more
        await m.start()  # a restart counts its rounds from 0 again (round 0 asks a bootstrap address)
        await until(lambda: len(rounds) > closed_at, 5, "a round after the restart")
        await m.close()
        return closed_at

    with caplog.at_level(logging.ERROR, logger="edge_agent.discovery.membership"):
        closed_at = asyncio.run(asyncio.wait_for(main(), 15))
    assert rounds[:closed_at] == list(range(closed_at)) and rounds[closed_at] == 0
    assert [r.getMessage() for r in caplog.records if r.name == "edge_agent.discovery.membership"] == [
        "membership round failed"]


# -- real agents over TLS on loopback -----------------------------------------------------

class Member(LoopbackMember):
    """A serving agent's membership half: a TLS listener answering exchanges, a table, rounds."""

    def __init__(self, swarm: SwarmKey, bootstrap=(), *, serve: bool = True, stale_after_s: float = 3.0) -> None:
        super().__init__(swarm, bootstrap, interval_s=0.2, stale_after_s=stale_after_s)
        self.serve = serve
        self.passed_through: list[bytes] = []

    async def handler(self, channel) -> None:  # stands in for the hop server: it sees every other frame
        while True:
            try:
                frame = await channel.recv()
            except PeerLostError:
                return
            self.passed_through.append(bytes(frame.payload))
            await channel.send(Frame.from_bytes(MsgType.CONTROL, b"echo:" + bytes(frame.payload), seq=frame.seq))

    async def start(self) -> "Member":
        if self.serve:
            await self.listen()
        self.table.start(interval_s=0.2)
        await self.membership.start()
        return self

    def known(self) -> set[str]:
        return {e.agent_id for e in self.table.peers()}


async def until(pred, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


def test_join_through_one_member_survive_its_death_and_keep_outsiders_out() -> None:
    async def main() -> None:
        swarm = SwarmKey.from_secret(SECRET)
        seed = await Member(swarm).start()
        members = [seed] + [await Member(swarm, [seed.address]).start() for _ in range(4)]
        client = await Member(swarm, [seed.address], serve=False).start()
        outsiders = [await Member(SwarmKey.from_secret("guess"), [seed.address]).start(),
                     await Member(SwarmKey.from_secret(None), [seed.address]).start()]
        everyone = {m.identity.agent_id for m in members}
        try:
            await until(lambda: all(m.known() == everyone - {m.identity.agent_id} for m in members), 20,
                        "every member to know every other")
            await until(lambda: client.known() == everyone, 20, "the client to learn the members")
            assert all(m.table.get(a).sources == {"gossip"} for m in members for a in m.known())
            # the client pulls but is no member: nobody learns it
            assert all(client.identity.agent_id not in m.known() for m in members)

            # a frame that is not membership traffic goes to the listener's own handler
            ch = await client.connect(*members[1].address, members[1].identity.agent_id)
            await ch.send(Frame.from_bytes(MsgType.CONTROL, b'{"op": "info"}', seq=7))
            reply = await asyncio.wait_for(ch.recv(), 5)
            assert reply.payload == b'echo:{"op": "info"}' and reply.seq == 7
            await ch.close()
            assert members[1].passed_through == [b'{"op": "info"}']  # membership frames never reached it

            await seed.stop()  # the bootstrap node dies: the others still know each other
            rest = members[1:]
            await until(lambda: all(seed.identity.agent_id not in m.known() for m in rest + [client]), 15,
                        "the dead bootstrap node to expire")
            await asyncio.sleep(4.0)  # more than a staleness window of rounds: nobody else drops out
            alive = everyone - {seed.identity.agent_id}
            await until(lambda: all(m.known() == alive - {m.identity.agent_id} for m in rest), 3, "the rest, whole")
            await until(lambda: client.known() == alive, 3, "the client's view, whole")
            late = await Member(swarm, [rest[0].address]).start()  # joining through any member still works
            members.append(late)
            await until(lambda: all(late.identity.agent_id in m.known() for m in rest), 15, "a late joiner")

            for o in outsiders:  # an outsider without the swarm key learns nothing and is learned by nobody
                assert o.known() == set() and o.membership.stats.exchanges_ok == 0
                assert o.membership.stats.exchanges_failed > 0
                assert all(o.identity.agent_id not in m.known() for m in members[1:])
            assert sum(m.membership.stats.records_rejected for m in members) == 0
        finally:
            for m in members[1:] + [client] + outsiders:
                await m.stop()

    asyncio.run(main())


def test_bootstrap_that_starts_later_and_unreachable_addresses() -> None:
    async def main() -> None:
        swarm = SwarmKey.from_secret(SECRET)
        seed = Member(swarm)
        server = await tls.listen(seed.identity, swarm, "127.0.0.1", 0, seed.handler)  # reserve a port, no membership
        port = server.port
        await server.close()
        joiner = await Member(swarm, [("127.0.0.1", 1), ("127.0.0.1", port)]).start()  # port 1: nobody there
        try:
            await asyncio.sleep(0.5)
            assert joiner.known() == set() and joiner.membership.stats.exchanges_failed > 0
            await seed.listen(port=port)
            seed.serve = False  # listening already
            await seed.start()
            await until(lambda: seed.identity.agent_id in joiner.known(), 20, "the late bootstrap node")
            await until(lambda: joiner.identity.agent_id in seed.known(), 20, "the joiner at the bootstrap node")
        finally:
            await joiner.stop()
            await seed.stop()

    asyncio.run(main())


def test_node_agents_learn_the_swarm_from_a_bootstrap_and_link_over_tls(tmp_path) -> None:
    """The node.py wiring: a client agent told one member's TLS address learns the members and
    links to one over the direct TLS path (WebRTC, with only user-given ICE servers, is the fallback)."""
    from edge_agent.directory import PeerDirectory
    from edge_agent.node import Agent, AgentConfig
    from edge_agent.split.serve import HopServer

    async def main() -> None:
        def config(name: str, bootstrap=()) -> AgentConfig:
            return AgentConfig(tmp_path / name, SECRET, host="127.0.0.1", mdns=False, ledger=False, bootstrap=list(bootstrap))

        servers = []
        for i in range(3):
            agent = Agent(config(f"node{i}", [("127.0.0.1", servers[0].caps.tls_port)] if servers else ()))
            await agent.start()
            await agent.serve(HopServer([], agent.identity.agent_id, info_extra=agent.info_extra),
                              Capabilities(agent.identity.agent_id, shards=((MODEL, 0, 12),)))
            servers.append(agent)
        client = Agent(config("client", [("127.0.0.1", servers[0].caps.tls_port)]))
        await client.start()
        directory = PeerDirectory(client, MODEL + "0" * 48)
        try:
            ids = {s.identity.agent_id for s in servers}
            await until(lambda: {e.agent_id for e in client.table.peers()} == ids, 20, "the client to learn every node")
            assert client.config.ice_servers == []  # no public STUN/TURN unless the user gives one
            link = await directory.link(servers[2].identity.agent_id)  # learned through node 0, never told
            assert link.channel.kind == "tls"
        finally:
            await directory.close()
            for a in [client, *servers]:
                await a.close()

    asyncio.run(main())


def test_malformed_membership_frames_are_dropped_and_the_channel_lives_on() -> None:
    async def main() -> None:
        swarm = SwarmKey.from_secret(SECRET)
        node = await Member(swarm).start()
        insider = Member(swarm)  # holds the swarm key, sends junk
        try:
            ch = await insider.connect(*node.address, node.identity.agent_id)
            for junk in (MAGIC + b"\x01\xff\xff", MAGIC + b"\x09", MAGIC + b"\x01\x00\x00\x00\x01\x01\xff\xff",
                         encode(Message(ACK, {}, [record(swarm)]))[:-3]):
                await ch.send(Frame.from_bytes(MsgType.CONTROL, junk, seq=1))
            await ch.send(Frame.from_bytes(MsgType.CONTROL, b"still here", seq=2))
            reply = await asyncio.wait_for(ch.recv(), 5)  # no reply to any junk: the first one is the echo
            assert reply.payload == b"echo:still here" and reply.seq == 2
            await ch.close()
            assert node.known() == set() and node.membership.stats.answered == 0
        finally:
            await node.stop()

    asyncio.run(main())
