"""A relay through a member (edge_agent/transport/relay.py), on loopback, real TLS throughout.

A client C reaches a peer P only through a relay member R: the circuit carries a real hop's
frames end to end, R forwards only ciphertext (a tap on R's splice sees TLS records, never the
plaintext payloads), and every bound and refusal holds: outsiders, unknown targets, full
reservations, too many circuits, too many bytes, idle circuits, a peer that never answers.
The tap (wrapping R's forwarding callback) is the only thing patched: it records, it changes nothing."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import numpy as np
import pytest

from edge_agent.discovery.capabilities import Capabilities
from edge_agent.discovery.identity import Identity, SwarmKey
from edge_agent.transport import Frame, HandshakeError, MsgType, PeerLostError, relay, splice, tls

SECRET = "relay swarm"


def identity(tmp_path: Path, name: str) -> Identity:
    return Identity.load_or_create(tmp_path / name)


async def echo(channel) -> None:
    while True:
        try:
            frame = await channel.recv()
        except PeerLostError:
            return
        await channel.send(frame)


class Swarm:
    """R (a relay on a TLS listener whose other frames are echoed) and P (holding a reservation there)."""

    def __init__(self, tmp_path: Path, limits: relay.RelayLimits = relay.RelayLimits(), **peer_kw) -> None:
        self.tmp, self.limits, self.peer_kw = tmp_path, limits, peer_kw
        self.swarm = SwarmKey.from_secret(SECRET)
        self.r, self.p, self.c = (identity(tmp_path, n) for n in ("r", "p", "c"))

    async def __aenter__(self) -> "Swarm":
        self.service = relay.RelayService(self.limits)
        self.server = await tls.listen(self.r, self.swarm, "127.0.0.1", 0, self.service.wrap(echo))
        self.reservation = relay.Reservation(self.p, self.swarm, "127.0.0.1", self.server.port, echo, **self.peer_kw)
        await self.reservation.start()
        assert await self.reservation.wait_reserved(5.0)
        return self

    async def __aexit__(self, *exc) -> None:
        await self.reservation.close()
        await self.service.close()
        self.server.close()

    async def dial(self, who: Identity | None = None, target: str | None = None, **kw) -> tls.TlsChannel:
        return await relay.dial(who or self.c, self.swarm, "127.0.0.1", self.server.port, self.r.agent_id,
                                target or self.p.agent_id, **kw)


def run(main, loop: str = "asyncio") -> None:
    if loop == "uvloop":
        import uvloop

        uvloop.run(main())
    else:
        asyncio.run(main())


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_a_circuit_is_end_to_end_and_the_relay_forwards_only_ciphertext(tmp_path, monkeypatch, loop) -> None:
    forwarded = bytearray()
    tapped = splice.Pipe.data_received

    def tap(self, data: bytes) -> None:
        forwarded.extend(data)
        tapped(self, data)

    monkeypatch.setattr(splice.Pipe, "data_received", tap)

    async def main() -> None:
        async with Swarm(tmp_path) as s:
            ch = await s.dial()
            assert ch.peer_id == s.p.agent_id and ch.via_relay == s.r.agent_id  # P itself, proven end to end
            secret = np.frombuffer(os.urandom(8192), dtype=np.float16).copy()
            secret[~np.isfinite(secret)] = 0
            await ch.send(Frame.from_array(MsgType.ACTIVATION, secret, seq=7))
            back = await asyncio.wait_for(ch.recv(), 10)
            assert back.seq == 7 and np.array_equal(back.array(), secret)
            assert forwarded[:1] == b"\x16"  # a TLS handshake record (the inner ClientHello) ...
            assert len(forwarded) > 2 * secret.nbytes  # ... then the frame both ways, as records
            plain = secret.tobytes()
            assert plain[:64] not in forwarded and plain[-64:] not in forwarded  # never in the clear at R
            assert s.service.stats.circuits_opened == 1 and len(s.service.circuits) == 1
            await ch.close()
            for _ in range(100):
                if not s.service.circuits:
                    break
                await asyncio.sleep(0.05)
            assert not s.service.circuits  # one end closing closes the circuit

    run(main, loop)


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_bytes_that_arrive_right_after_a_hand_over_wait_for_the_new_owner(tmp_path, loop) -> None:
    """`detach` pauses reading: the server side hands over and only later starts inner TLS, while
    the client's ClientHello is already there (between processes this window is real: without
    the pause, the old channel dropped those bytes and 1 circuit in 5 timed out)."""
    async def main() -> None:
        swarm = SwarmKey.from_secret(SECRET)
        a, b = identity(tmp_path, "a"), identity(tmp_path, "b")
        inner_server: asyncio.Future = asyncio.get_running_loop().create_future()

        async def handler(ch) -> None:
            ch.quiesce()
            await ch.recv()  # the client's last frame
            transport, rest = ch.detach(Frame.from_bytes(MsgType.CONTROL, b"go"))
            await asyncio.sleep(0.3)  # the ClientHello arrives meanwhile
            inner_server.set_result(await tls.over(transport, b, swarm, server_side=True))

        server = await tls.listen(b, swarm, "127.0.0.1", 0, handler)
        outer = await tls.connect(a, swarm, "127.0.0.1", server.port)
        outer.quiesce()
        await outer.send(Frame.from_bytes(MsgType.CONTROL, b"last"))
        assert bytes((await outer.recv()).payload) == b"go"
        transport, rest = outer.detach()
        inner = await tls.over(transport, a, swarm, server_side=False, expect_peer_id=b.agent_id, timeout=5.0)
        theirs = await asyncio.wait_for(inner_server, 5)
        await inner.send(Frame.from_bytes(MsgType.CONTROL, b"inside"))
        assert bytes((await asyncio.wait_for(theirs.recv(), 5)).payload) == b"inside" and rest == b""
        await inner.close()
        server.close()

    run(main, loop)


def test_outsiders_and_unknown_targets_are_refused(tmp_path) -> None:
    async def main() -> None:
        async with Swarm(tmp_path) as s:
            outsider_swarm = SwarmKey.from_secret("another swarm")
            with pytest.raises(HandshakeError):  # refused by R's ordinary handshake: no circuit, no reservation
                await relay.dial(identity(tmp_path, "o"), outsider_swarm, "127.0.0.1", s.server.port, s.r.agent_id,
                                 s.p.agent_id)
            shut_out = relay.Reservation(identity(tmp_path, "o2"), outsider_swarm, "127.0.0.1", s.server.port, echo)
            await shut_out.start()
            assert not await shut_out.wait_reserved(1.0)
            await shut_out.close()
            with pytest.raises(PeerLostError, match="no reservation for that peer"):
                await s.dial(target=identity(tmp_path, "nobody").agent_id)
            with pytest.raises(PeerLostError, match="yourself"):
                await s.dial(who=s.p)
            with pytest.raises(HandshakeError, match="unexpected peer"):  # a relay posing as another member
                await relay.dial(s.c, s.swarm, "127.0.0.1", s.server.port, s.p.agent_id, s.p.agent_id)
            assert s.service.stats.circuits_opened == 0

    run(main)


def test_reservations_and_circuits_are_bounded(tmp_path) -> None:
    async def main() -> None:
        async with Swarm(tmp_path, relay.RelayLimits(max_reservations=1, max_circuits=1)) as s:
            second = relay.Reservation(identity(tmp_path, "p2"), s.swarm, "127.0.0.1", s.server.port, echo)
            await second.start()
            assert not await second.wait_reserved(1.5)  # the one reservation is P's
            await second.close()
            first = await s.dial()
            with pytest.raises(PeerLostError, match="too many circuits"):
                await s.dial()
            await first.close()

    run(main)


def test_a_circuit_ends_past_its_byte_bound_and_when_idle(tmp_path) -> None:
    async def main() -> None:
        async with Swarm(tmp_path, relay.RelayLimits(max_circuit_bytes=256 * 1024)) as s:
            ch = await s.dial()
            await ch.send(Frame.from_bytes(MsgType.CONTROL, b"x" * 200_000))
            with pytest.raises(PeerLostError):  # the echo brings it over the bound: R closes both ends
                for _ in range(3):
                    await asyncio.wait_for(ch.recv(), 10)
        quiet = {"heartbeat_interval": 30.0, "peer_timeout": 60.0}  # ends that say nothing: the circuit idles
        async with Swarm(tmp_path, relay.RelayLimits(idle_timeout_s=0.5), **quiet) as s:
            ch = await s.dial(**quiet)
            with pytest.raises(PeerLostError):
                await asyncio.wait_for(ch.recv(), 10)
            assert not s.service.circuits

    run(main)


def test_a_peer_that_never_answers_is_refused_within_the_setup_bound(tmp_path) -> None:
    async def main() -> None:
        async with Swarm(tmp_path, relay.RelayLimits(setup_timeout_s=0.5), max_setups=0) as s:  # P ignores INCOMING
            with pytest.raises(PeerLostError, match="did not answer"):
                await s.dial()
            assert s.service.stats.circuits_refused == 1 and not s.service.circuits

    run(main)


def test_a_peer_names_its_relay_in_its_signed_record_and_clients_find_the_route(tmp_path) -> None:
    """The record entry stays within the record bound; old records without it still parse; the
    client's route is the relay's own record's address."""
    swarm = SwarmKey.from_secret(SECRET)
    p, r, q = identity(tmp_path, "p"), identity(tmp_path, "r"), identity(tmp_path, "q")

    class Res:
        def __init__(self, relay_id: str) -> None:
            self.active, self.relay_id = True, relay_id

    base = Capabilities(p.agent_id, tls_port=1, shards=(("0123456789abcdef", 0, 12),),
                        extra=(("ar", "llamacpp/u512/fa0/kvf16"), ("cc", "0123abcd:cpu-avx2-x86-64"), ("w", "1")))
    caps = relay.with_relays(base, [Res(r.agent_id), Res(r.agent_id), Res(q.agent_id)]).sealed(p, swarm)
    assert Capabilities.from_txt(caps.to_txt()).verify(swarm) and len(caps.to_txt()) <= 400
    assert relay.advertised(caps.extra) == [r.agent_id[:16], q.agent_id[:16]]
    assert relay.advertised(base.sealed(p, swarm).extra) == []
    assert relay.advertised((("rl", "zz,0123"),)) == []  # malformed prefixes are ignored

    class Entry:
        def __init__(self, c, addresses):
            self.caps, self.agent_id, self.addresses = c, c.agent_id, addresses

    class Table:
        def peers(self):
            return [Entry(Capabilities(r.agent_id, tls_port=4242), ["10.1.2.3", "192.0.2.1"]), Entry(caps, ["10.9.9.9"])]

    assert relay.routes(Table(), caps) == [(r.agent_id, "10.1.2.3", 4242), (r.agent_id, "192.0.2.1", 4242)]


def test_a_client_agent_reaches_a_peer_it_cannot_dial_through_a_relay_member(tmp_path, tiny_model, monkeypatch) -> None:
    """The node.py + directory wiring: P (`relay_via` R) names R in its record; once P accepts no
    direct connection (its listeners closed: nothing else can make loopback undialable), the
    client's `PeerDirectory` falls back to the relay, and a real hop's step through the circuit
    equals the same step over a direct link, while R saw only ciphertext."""
    from edge_agent.directory import PeerDirectory
    from edge_agent.node import Agent, AgentConfig
    from edge_agent.runtime.backends import load_engine
    from edge_agent.runtime.engine import EngineOptions
    from edge_agent.split.links import PeerLink
    from edge_agent.split.protocol import activation
    from edge_agent.split.serve import HopServer

    forwarded = bytearray()
    tapped = splice.Pipe.data_received
    monkeypatch.setattr(splice.Pipe, "data_received", lambda self, data: (forwarded.extend(data), tapped(self, data))[1])

    async def main() -> None:
        def config(name: str, **kw) -> AgentConfig:
            return AgentConfig(tmp_path / name, SECRET, host="127.0.0.1", mdns=False, ledger=False, **kw)

        r = Agent(config("r", relay=True))
        await r.start()
        await r.serve(HopServer([], r.identity.agent_id, info_extra=r.info_extra),
                      Capabilities(r.identity.agent_id, shards=(("0123456789abcdef", 0, 12),)))
        at_r = [("127.0.0.1", r.caps.tls_port)]
        engine = await asyncio.to_thread(load_engine, "llamacpp", tiny_model, 1, 3, EngineOptions(n_ctx_per_request=256,
                                                                                                   max_requests=2, n_threads=1))
        model_hash = engine.info.model_hash
        p = Agent(config("p", bootstrap=at_r, relay_via=at_r))
        await p.start()
        await p.serve(HopServer([engine], p.identity.agent_id, info_extra=p.info_extra),
                      Capabilities(p.identity.agent_id, shards=((model_hash[:16], 1, 3),)))
        client = Agent(config("client", bootstrap=at_r))
        await client.start()
        directory = PeerDirectory(client, model_hash)
        pid = p.identity.agent_id
        try:
            assert relay.advertised(p.caps.extra) == [r.identity.agent_id[:16]]
            for _ in range(200):
                entry = client.table.get(pid)
                if entry is not None and relay.advertised(entry.caps.extra) and client.table.get(r.identity.agent_id):
                    break
                await asyncio.sleep(0.1)
            else:
                raise AssertionError("the client did not learn P's relay from gossip")
            x = np.random.default_rng(3).standard_normal((4, engine.info.n_embd)).astype(np.float32)
            direct = PeerLink(pid, await tls.connect(client.identity, client.swarm, "127.0.0.1", p.caps.tls_port))
            want = (await direct.request(activation(os.urandom(16), 0, x, 1, 3, seq=1), 30)).frame.array().copy()
            await direct.close()
            for close in p._closers[:2]:  # P's TLS and WebRTC listeners: from here P is reachable through R only
                res = close()
                if res is not None:
                    await res
            link = await directory.link(pid)
            assert link.channel.via_relay == r.identity.agent_id and link.channel.peer_id == pid
            got = (await link.request(activation(os.urandom(16), 0, x, 1, 3, seq=1), 30)).frame.array()
            assert np.array_equal(got, want)  # the same hop, bit for bit
            assert r.relay.stats.circuits_opened == 1 and len(forwarded) > 2 * x.nbytes
            assert x.tobytes()[:64] not in forwarded and want.tobytes()[:64] not in forwarded
        finally:
            await directory.close()
            for a in (client, p, r):
                await a.close()

    run(main)
