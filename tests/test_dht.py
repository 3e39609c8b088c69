"""The Kademlia DHT with segment keys (edge_agent/discovery/dht*.py): the bounded codec, and
real agents on loopback over real TLS channels, one process.  Rounds are driven by the test
(no background loops), so every wait is bounded by the calls themselves."""

from __future__ import annotations

import asyncio
import contextlib
import struct
import time
from dataclasses import replace
from typing import AsyncIterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_agent.discovery.dht import ALPHA, Dht
from edge_agent.discovery.dht_wire import (FIND_VALUE, K, KEY_BYTES, MAGIC, MAX_CONTACTS, MAX_MESSAGE_BYTES, MAX_VALUES,
                                           REPLY, STORE, DhtDecodeError, DhtMessage, decode, encode, lookup_keys,
                                           publish_keys)
from edge_agent.discovery.identity import Identity, SwarmKey
from edge_agent.discovery.membership import Membership
from edge_agent.discovery.peers import PeerTable
from membership_util import MODEL, LoopbackMember, decode_or_refuse, mutated, record

SECRET = "dht test secret"


# -- codec ---------------------------------------------------------------------------------

def test_roundtrip_and_bounds() -> None:
    swarm = SwarmKey.from_secret(SECRET)
    msg = DhtMessage(REPLY, b"k" * KEY_BYTES, [record(swarm) for _ in range(3)], [record(swarm)])
    assert decode(encode(msg)) == msg
    one = encode(DhtMessage(STORE, b"k" * KEY_BYTES, values=[record(swarm)]))
    head = MAGIC + b"\x02" + b"k" * KEY_BYTES
    cases = {
        b"": "not a DHT message",
        b"EAM\x02" + b"\x01" * 40: "not a DHT message",
        MAGIC + b"\x09" + b"k" * KEY_BYTES + b"\x00\x00": "unknown message kind",
        head + bytes((MAX_CONTACTS + 1,)): "records, limit",
        head + b"\x00" + bytes((MAX_VALUES + 1,)): "records, limit",
        head + b"\x01" + struct.pack(">H", 60000): "capability record of 60000 bytes",
        one[:-1]: "truncated",
        one + b"\x00": "trailing",
        b"\x00" * (MAX_MESSAGE_BYTES + 1): "over",
    }
    for raw, why in cases.items():
        with pytest.raises(DhtDecodeError, match=why):
            decode(raw)
    full = DhtMessage(REPLY, b"k" * KEY_BYTES, [record(swarm)] * (MAX_CONTACTS + 3), [record(swarm)] * (MAX_VALUES + 3))
    back = decode(encode(full))  # an encoder never exceeds what a decoder takes
    assert len(back.contacts) == MAX_CONTACTS and len(back.values) == MAX_VALUES


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2048))
def test_fuzz_random_bytes(raw: bytes) -> None:
    for data in (raw, MAGIC + raw):
        decode_or_refuse(decode, DhtDecodeError, data)


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_fuzz_mutated_message(data: st.DataObject) -> None:
    swarm = SwarmKey.from_secret(SECRET)
    raw = encode(DhtMessage(REPLY, b"k" * KEY_BYTES, [record(swarm)], [record(swarm)]))
    msg = decode_or_refuse(decode, DhtDecodeError, mutated(raw, data))
    if msg is not None:
        for r in msg.contacts + msg.values:  # whatever parses may be checked without an exception
            r.verify(swarm)


def test_segment_keys_cover_the_layers_served() -> None:
    r = record(SwarmKey.from_secret(SECRET), layers=(6, 9))  # segments 1 and 2 (4 layers each)
    keys = publish_keys(r.caps)
    assert len(keys) == 2
    assert set(keys) <= set(lookup_keys(MODEL, 9, 9)) | set(lookup_keys(MODEL, 4, 4))
    assert not set(keys) & set(lookup_keys(MODEL, 12, 20))


# -- real agents over TLS on loopback ------------------------------------------------------

class Node(LoopbackMember):
    """A DHT node: its bootstrap addresses are the DHT's (no gossip); `layers` None is a client."""

    def __init__(self, swarm: SwarmKey, bootstrap=(), *, layers: tuple[int, int] | None = (0, 7),
                 ttl_s: float = 60.0) -> None:
        super().__init__(swarm)
        self.layers = layers
        self.dht = Dht(self.membership, bootstrap=bootstrap, ttl_s=ttl_s)

    async def start(self) -> "Node":
        if self.layers is not None:
            await self.listen(self.layers)
        return self


@contextlib.asynccontextmanager
async def swarm_of(n: int, swarm: SwarmKey, ttl_s: float = 60.0) -> AsyncIterator[list[Node]]:
    """n serving nodes joined one after another through the first one's address; layer ranges
    rotate over four 8-layer spans of a 32-layer model.  All are stopped on exit, with any the
    test appends to the list."""
    nodes: list[Node] = []
    try:
        seed = await Node(swarm, layers=(0, 7), ttl_s=ttl_s).start()
        nodes.append(seed)
        for i in range(1, n):
            node = await Node(swarm, [seed.address], layers=(8 * (i % 4), 8 * (i % 4) + 7), ttl_s=ttl_s).start()
            nodes.append(node)
            await node.dht.round()  # join: a lookup of its own id, then its stores
        await asyncio.gather(*(nd.dht.lookup(nd.dht.me) for nd in nodes))  # early joiners learn the later ones
        await asyncio.gather(*(nd.dht.publish() for nd in nodes))
        yield nodes
    finally:
        for nd in nodes:
            await nd.stop()


def test_a_client_finds_the_servers_of_some_layers_without_learning_the_swarm() -> None:
    async def main() -> None:
        swarm = SwarmKey.from_secret(SECRET)
        async with swarm_of(24, swarm) as nodes:
            assert all(nd.dht.contacts() < 24 for nd in nodes[1:])  # routing tables hold O(K log n), not n...
            assert all(nd.dht.contacts() >= 8 for nd in nodes)
            client = await Node(swarm, [nodes[0].address], layers=None).start()
            found = await client.dht.find_layers(MODEL, 8, 15)
            serving = {nd.agent_id for nd in nodes if nd.layers[0] <= 15 and nd.layers[1] >= 8}
            assert {r.agent_id for r in found} == serving and len(serving) == 6
            assert {e.agent_id for e in client.table.peers()} == serving  # the planner sees only these
            assert {s for e in client.table.peers() for s in e.sources} == {"dht"}
            # each key's lookup converges: the bootstrap, the K closest and a few more, not the swarm round
            assert client.dht.stats.rpcs_ok <= len(lookup_keys(MODEL, 8, 15)) * (K + 2 * ALPHA)
            before = client.dht.stats.rpcs_ok
            again = await client.dht.find_layers(MODEL, 8, 15, full=False)  # a refresh: one GET per key
            assert {r.agent_id for r in again} == serving
            assert client.dht.stats.rpcs_ok - before == len(lookup_keys(MODEL, 8, 15))
            assert not any(client.agent_id in b for nd in nodes for b in nd.dht._buckets.values())  # clients are no contacts

    asyncio.run(asyncio.wait_for(main(), 60))


def test_a_dead_members_record_expires_and_outsiders_learn_nothing() -> None:
    async def main() -> None:
        swarm = SwarmKey.from_secret(SECRET)
        async with swarm_of(8, swarm, ttl_s=1.5) as nodes:
            client = await Node(swarm, [nodes[0].address], layers=None).start()
            victim = nodes[4]  # layers 0..7, like the seed and nodes[8k]
            assert victim.agent_id in {r.agent_id for r in await client.dht.find_layers(MODEL, 0, 7)}
            await victim.stop()
            await asyncio.sleep(1.6)  # past the TTL: the living re-publish, the dead cannot
            await asyncio.gather(*(nd.dht.round() for nd in nodes if nd is not victim))
            after = {r.agent_id for r in await client.dht.find_layers(MODEL, 0, 7)}
            assert victim.agent_id not in after and nodes[0].agent_id in after
            for secret in ("guess", None):
                outsider = await Node(SwarmKey.from_secret(secret), [nodes[0].address], layers=(0, 7)).start()
                assert await outsider.dht.find_layers(MODEL, 0, 7) == []
                await outsider.dht.publish()
                assert outsider.dht.stats.rpcs_ok == 0 and len(outsider.table) == 0
                assert not any(outsider.agent_id in nd.dht._store.get(k, {}) for nd in nodes
                               for k in publish_keys(outsider.membership.own.caps))
                await outsider.stop()

    asyncio.run(asyncio.wait_for(main(), 60))


def test_forged_or_altered_records_are_refused() -> None:
    async def main() -> None:
        swarm = SwarmKey.from_secret(SECRET)
        async with swarm_of(4, swarm) as nodes:
            mallory, target = nodes[1], nodes[0]
            honest = nodes[2].membership.own
            key = publish_keys(honest.caps)[0]
            own = mallory.membership.own
            attempts = {
                "another's record": DhtMessage(STORE, key, values=[honest]),
                "altered address": DhtMessage(STORE, publish_keys(own.caps)[0],
                                              values=[replace(own, addresses=("10.6.6.6",))]),
                "a key its shards do not name": DhtMessage(STORE, lookup_keys(MODEL, 30, 30)[0], values=[own]),
                "another swarm's record": DhtMessage(STORE, publish_keys(own.caps)[0],
                                                     values=[record(SwarmKey.from_secret("x"), identity=mallory.identity)]),
            }
            for why, msg in attempts.items():
                before = {k: dict(v) for k, v in target.dht._store.items()}
                reply = await mallory.dht.rpc(*target.address, target.agent_id, msg)
                assert reply is not None and reply.values == [], why
                assert {k: dict(v) for k, v in target.dht._store.items()} == before, why
            # A storing node that lies (a fake: an honest node cannot be made to) hands out an altered
            # record; the asker's own checks drop it.
            victim = nodes[0].membership.own  # it serves layers 0..7
            forged = replace(victim, addresses=("10.6.6.6",))
            for nd in nodes:
                for k in publish_keys(victim.caps):
                    nd.dht._store.setdefault(k, {})[victim.agent_id] = (forged, time.monotonic() + 60)
            client = await Node(swarm, [target.address], layers=None).start()
            found = {r.agent_id: r for r in await client.dht.find_layers(MODEL, 0, 0)}
            assert victim.agent_id not in found and client.dht.stats.refused > 0

    asyncio.run(asyncio.wait_for(main(), 60))


def test_old_answerers_ignore_dht_frames() -> None:
    """A node without the DHT hands a DHT frame to its hop server (which drops unknown frames)."""
    swarm = SwarmKey.from_secret(SECRET)
    me = Identity.generate()
    m = Membership(me, swarm, PeerTable(swarm, self_id=me.agent_id), connect=None)  # type: ignore[arg-type]
    raw = encode(DhtMessage(FIND_VALUE, b"k" * KEY_BYTES))
    assert not any(mine(raw) for mine, _ in m.answerers)


def test_an_agent_with_membership_dht_feeds_its_table_from_segment_keys(tmp_path) -> None:
    from edge_agent.node import Agent, AgentConfig

    async def main() -> None:
        swarm = SwarmKey.from_secret(SECRET)
        async with swarm_of(4, swarm) as nodes:
            agent = Agent(AgentConfig(tmp_path, SECRET, mdns=False, bootstrap=[nodes[0].address], membership="dht"))
            try:
                assert agent.membership.bootstrap == []  # no gossip: the bootstrap address is the DHT's
                late = Node(swarm, [nodes[0].address], layers=(0, 3))  # Agent.start runs a round before serve()
                await late.dht.round()
                await late.start()  # ...then advertises: the next round publishes at once, not a TTL/3 later
                await late.dht.round()
                nodes.append(late)
                agent.dht.want(MODEL, 0, 3)  # what swarm_client asks for: its model's layers
                await agent.start()
                deadline = time.monotonic() + 20
                while {e.agent_id for e in agent.table.peers()} != {nodes[0].agent_id, late.agent_id}:
                    assert time.monotonic() < deadline, "the agent's table never got the server of layers 0..3"
                    await asyncio.sleep(0.05)
            finally:
                await agent.close()

    asyncio.run(asyncio.wait_for(main(), 60))


def test_membership_option_is_checked_and_passed_on(tmp_path) -> None:
    import typer

    from edge_agent.commands.common import _agent_config

    args = (tmp_path, None, "127.0.0.1", 0, 0, [], True, [], "auto", [], ["10.0.3.1:41000"])
    assert _agent_config(*args).membership == "gossip"
    assert _agent_config(*args, membership="dht").membership == "dht"
    with pytest.raises((SystemExit, typer.Exit)) as exc:
        _agent_config(*args, membership="kademlia")
    assert getattr(exc.value, "code", getattr(exc.value, "exit_code", None)) == 2
