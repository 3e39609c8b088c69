"""Discovery: capability codec, peer table, and real mDNS between separate OS processes.

Network: only 127.0.0.1 (Zeroconf(interfaces=["127.0.0.1"])) and namespaces this test
creates itself (tests/netns_util.py).  Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_agent.discovery import capabilities as capmod
from edge_agent.discovery.capabilities import (
    MAX_RECORD_BYTES, ROLES, Capabilities, CapabilityDecodeError, decode_txt)
from edge_agent.discovery.identity import Identity, SwarmKey
from edge_agent.discovery.mdns import (
    DEFAULT_REFRESH_S, SERVICE_TYPE, MdnsBrowser, instance_name, list_peers, open_zeroconf)
from edge_agent.discovery.peers import PeerTable, format_peers, parse_peer_arg

from netns_util import AGENT_SRC, ROGUE_SRC, Proc, netns_unavailable_reason, spawn, veth_pair

LO = ["127.0.0.1"]
# SIGKILL bound we claim (docs/discovery.md): stale_after_s (7) + one refresh tick (1).
KILL_BOUND_S = PeerTable(SwarmKey.from_secret(None)).stale_after_s + DEFAULT_REFRESH_S
SLACK_S = 2.0  # shared 2-core CI box

OPEN = SwarmKey.from_secret(None)
PRIV = SwarmKey.from_secret("test swarm secret")


def sealed(ident: Identity | None = None, sk: SwarmKey = PRIV, **kw: Any) -> Capabilities:
    ident = ident or Identity.generate()
    return Capabilities(agent_id=ident.agent_id, **kw).sealed(ident, sk)


# ----------------------------------------------------------------------------- codec
def test_roundtrip_and_size() -> None:
    c = sealed(signal_port=8443, tls_port=8444, role="peer", backend="llamacpp",
               shards=(("0123456789abcdef", 0, 16), ("0123456789abcdef", 16, 32)),
               free_mem_mb=24000, ms_per_layer=1.234)
    raw = c.to_txt()
    assert len(raw) <= MAX_RECORD_BYTES
    d = decode_txt(raw)
    assert d == c and d.verify(PRIV) and not d.verify(OPEN)
    assert d.to_dict()["shards"][1] == {"model": "0123456789abcdef", "start": 16, "end": 32}
    o = sealed(sk=OPEN, role="client")
    assert decode_txt(o.to_txt()).verify(OPEN) and not o.verify(PRIV) and o.mac == b""


def test_worst_realistic_record_fits_and_oversize_is_refused() -> None:
    c = sealed(signal_port=65535, tls_port=65535, role="client", backend="a" * 16,
               shards=tuple(("f" * 16, 9000 + i, 9001 + i) for i in range(4)),
               free_mem_mb=capmod.MAX_FREE_MEM_MB, ms_per_layer=10_000.0, version=65535)
    assert len(c.to_txt()) <= MAX_RECORD_BYTES
    big = c.with_changes(shards=tuple(("f" * 16, 9000 + i, 9001 + i) for i in range(8)))
    with pytest.raises(ValueError, match="over 400"):
        big.sealed(Identity.generate(), PRIV).to_txt()
    with pytest.raises(ValueError, match="sealed"):
        c.with_changes(free_mem_mb=1).to_txt()


def test_tampering_is_detected() -> None:
    ident = Identity.generate()
    c = sealed(ident, free_mem_mb=100)
    assert not replace(c, free_mem_mb=101).verify(PRIV)  # changed field, old signature
    assert not replace(c, mac=bytes(16)).verify(PRIV)  # wrong swarm MAC
    assert not replace(c, mac=b"").verify(PRIV)
    other = Identity.generate()  # someone else signs a record claiming our id
    body = c.with_changes()
    msg = body.signing_bytes()
    forged = replace(body, mac=PRIV.prove(msg)[:16], signature=other.sign(msg))
    assert not forged.verify(PRIV)
    assert not sealed(sk=SwarmKey.from_secret("another")).verify(PRIV)


@pytest.mark.parametrize("raw, msg", [
    (b"", "missing keys"),
    (b"\x05v=1", "overruns"),
    (b"\x00", "empty"),
    (b"\x03v=1\x03v=2", "duplicate key"),
    (b"\x03V=1", "malformed entry key"),
    (b"\x03v\xff1", "non-printable"),
    (b"x" * 600, "limit 512"),
])
def test_malformed_records_give_clear_errors(raw: bytes, msg: str) -> None:
    with pytest.raises(CapabilityDecodeError, match=msg):
        decode_txt(raw)


def test_field_errors_are_decode_errors() -> None:
    good = sealed(sk=OPEN).to_txt()
    bad = good.replace(b"\x04tp=0", b"\x08tp=99999")
    with pytest.raises(CapabilityDecodeError, match="tls_port"):
        decode_txt(bad)
    with pytest.raises(CapabilityDecodeError, match="last entries"):
        decode_txt(good + b"\x03x=1")


_HEX = "0123456789abcdef"
_shard = st.tuples(st.text(_HEX, min_size=8, max_size=16), st.integers(0, 9998)).flatmap(
    lambda t: st.integers(t[1] + 1, 9999).map(lambda e: (t[0], t[1], e)))
_caps_fields = st.fixed_dictionaries({
    "signal_port": st.integers(0, 65535), "tls_port": st.integers(0, 65535),
    "role": st.sampled_from(ROLES), "shards": st.lists(_shard, max_size=3).map(tuple),
    "free_mem_mb": st.integers(0, capmod.MAX_FREE_MEM_MB),
    "ms_per_layer": st.floats(0, 10_000, allow_nan=False),
    "backend": st.from_regex(r"[a-z0-9][a-z0-9_.-]{0,15}", fullmatch=True),
    "version": st.integers(1, 65535)})
_FUZZ = settings(max_examples=300, deadline=None,
                 suppress_health_check=[HealthCheck.too_slow])


@_FUZZ
@given(_caps_fields, st.booleans())
def test_roundtrip_property(fields: dict[str, Any], private: bool) -> None:
    sk = PRIV if private else OPEN
    c = sealed(sk=sk, **fields)
    d = decode_txt(c.to_txt())
    assert d == c and d.verify(sk)


def _decode_checked(raw: bytes, original: Capabilities | None = None) -> None:
    """The only allowed outcomes: a clear CapabilityDecodeError, or a record that
    either fails verification or is semantically the original."""
    try:
        d = decode_txt(raw)
    except CapabilityDecodeError as exc:
        assert str(exc)
        return
    ok = d.verify(PRIV)
    assert isinstance(ok, bool)
    if ok:
        assert original is not None and d == original


@_FUZZ
@given(st.binary(max_size=600))
def test_fuzz_random_bytes(raw: bytes) -> None:
    _decode_checked(raw)


_ORIGINAL = sealed(signal_port=7000, shards=(("abcdef0123456789", 0, 8),), free_mem_mb=512)
_ORIGINAL_TXT = _ORIGINAL.to_txt()


@_FUZZ
@given(st.data())
def test_fuzz_mutated_valid_record(data: st.DataObject) -> None:
    raw = bytearray(_ORIGINAL_TXT)
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["flip", "cut", "insert", "delete"]))
        pos = data.draw(st.integers(0, max(0, len(raw) - 1)))
        if op == "flip" and raw:
            raw[pos] ^= data.draw(st.integers(1, 255))
        elif op == "cut":
            del raw[pos:]
        elif op == "insert":
            raw[pos:pos] = data.draw(st.binary(min_size=1, max_size=40))
        elif raw:
            del raw[pos:pos + data.draw(st.integers(1, 20))]
    _decode_checked(bytes(raw), _ORIGINAL)


_KEYS = st.sampled_from(["v", "id", "sw", "r", "sp", "tp", "m", "us", "b", "sh", "mac", "sig",
                         "zz", "x9"])


@_FUZZ
@given(st.lists(st.tuples(_KEYS, st.text(st.characters(min_codepoint=32, max_codepoint=126),
                                         max_size=90)), max_size=14))
def test_fuzz_structured_entries(entries: list[tuple[str, str]]) -> None:
    # Entries keep the TXT framing valid so the field parsers themselves get exercised.
    raw = bytearray()
    for k, v in entries:
        item = f"{k}={v}".encode()[:255]
        raw += bytes([len(item)]) + item
    _decode_checked(bytes(raw), _ORIGINAL)


# ------------------------------------------------------------------------ peer table
class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_peer_table_lifecycle_and_events() -> None:
    async def main() -> None:
        clock, me = Clock(), Identity.generate()
        table = PeerTable(PRIV, self_id=me.agent_id, stale_after_s=5, clock=clock)
        q = table.subscribe(maxsize=2)
        seen: list[str] = []
        table.on_event(lambda ev: seen.append(ev.kind))
        a = Identity.generate()
        assert table.upsert(sealed(me), ["10.0.0.9"]) is None  # ourselves
        assert table.upsert(sealed(sk=OPEN), []) is None  # another swarm
        assert table.upsert(replace(sealed(a), free_mem_mb=9), []) is None  # bad signature
        assert table.rejected == 1
        ev = table.upsert(sealed(a, free_mem_mb=1), ["127.0.0.2"])
        assert ev and ev.kind == "joined" and table.get(a.agent_id).addresses == ["127.0.0.2"]
        assert table.upsert(sealed(a, free_mem_mb=1), ["127.0.0.2"]) is None  # no change
        assert table.upsert(sealed(a, free_mem_mb=2), []).kind == "updated"
        clock.t += 4
        assert table.heartbeat(a.agent_id) and table.expire() == []
        clock.t += 5.5
        assert [e.kind for e in table.expire()] == ["left"] and a.agent_id not in table
        assert seen == ["joined", "updated", "left"]
        assert [q.get_nowait().kind for _ in range(q.qsize())] == ["updated", "left"]  # oldest dropped
        # A record whose last reception is already stale never flaps in.
        assert table.upsert(sealed(a), [], seen_at=clock.t - 6) is None
        assert table.upsert(sealed(a), []).kind == "joined"
        assert table.remove(a.agent_id, "goodbye").reason == "goodbye"

    asyncio.run(main())


def test_parse_peer_arg() -> None:
    assert parse_peer_arg("127.0.0.1:8443") == ("127.0.0.1", 8443)
    assert parse_peer_arg("[::1]:80") == ("::1", 80)
    for bad in ("host", "host:0", "host:x", ":80", "h:70000"):
        with pytest.raises(ValueError):
            parse_peer_arg(bad)


def test_manual_peer_probe_over_real_socket() -> None:
    """A --peer HOST:PORT is probed by an injected callable; here a real TCP probe."""

    async def main() -> None:
        caps = sealed(free_mem_mb=77)

        async def serve(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            raw = caps.to_txt()
            w.write(len(raw).to_bytes(2, "big") + raw)
            await w.drain()
            w.close()

        async def probe(host: str, port: int) -> Capabilities:
            r, w = await asyncio.open_connection(host, port)
            try:
                n = int.from_bytes(await r.readexactly(2), "big")
                if n > capmod.MAX_DECODE_BYTES:
                    raise ValueError("too long")
                return decode_txt(await r.readexactly(n))
            finally:
                w.close()

        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        table = PeerTable(PRIV, stale_after_s=0.6)
        q = table.subscribe()
        table.add_manual_peer("127.0.0.1", port)
        table.start(probe, interval_s=0.05, probe_every_s=0.1)
        try:
            ev = await asyncio.wait_for(q.get(), 5)
            assert ev.kind == "joined" and ev.entry.sources == {"manual"}
            assert ev.entry.caps.free_mem_mb == 77 and ev.entry.addresses == ["127.0.0.1"]
            server.close()
            await server.wait_closed()
            t0 = time.monotonic()
            ev = await asyncio.wait_for(q.get(), 5)  # probes now fail: expiry
            assert ev.kind == "left" and ev.reason == "timeout"
            assert time.monotonic() - t0 < 2.0
        finally:
            await table.close()

    asyncio.run(main())


# ------------------------------------------------------------- real mDNS, processes
def _joined(agent_id: str) -> Callable[[dict[str, Any]], bool]:
    return lambda e: e.get("ev") == "joined" and e.get("id") == agent_id


def _left(agent_id: str) -> Callable[[dict[str, Any]], bool]:
    return lambda e: e.get("ev") == "left" and e.get("id") == agent_id


async def _until(cond: Callable[[], bool], timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def _next_event(q: asyncio.Queue, kind: str, agent_id: str, timeout: float) -> Any:
    end = time.monotonic() + timeout
    while True:
        ev = await asyncio.wait_for(q.get(), max(0.01, end - time.monotonic()))
        if ev.kind == kind and ev.agent_id == agent_id:
            return ev


@pytest.mark.slow
def test_agents_discover_isolate_update_and_leave(tmp_path: Path,
                                                   record_property: Callable) -> None:
    """Three agents + one rogue process on 127.0.0.1; the test process browses too."""

    async def main() -> None:
        secret = f"swarm-{uuid.uuid4().hex}"
        sk = SwarmKey.from_secret(secret)
        procs: list[Proc] = []
        aiozc = open_zeroconf(LO)
        table = PeerTable(sk)
        q = table.subscribe(maxsize=1024)
        browser = MdnsBrowser(table, aiozc=aiozc)
        raw_names: set[str] = set()
        from zeroconf.asyncio import AsyncServiceBrowser

        raw = AsyncServiceBrowser(aiozc.zeroconf, SERVICE_TYPE, handlers=[
            lambda zeroconf, service_type, name, state_change: raw_names.add(name)])
        try:
            await browser.start()
            t_spawn = time.monotonic()
            for i in range(3):
                cfg = {"secret": secret, "interfaces": LO, "mem": 1000 + i,
                       "data_dir": str(tmp_path / f"agent{i}")}
                procs.append(await spawn(AGENT_SRC, cfg, f"agent{i}", tmp_path))
            rogue = await spawn(ROGUE_SRC, {"secret": secret, "interfaces": LO}, "rogue", tmp_path)
            procs.append(rogue)
            a0, a1, a2 = procs[:3]
            ids = [(await p.wait_for(lambda e: e["ev"] == "ready", 20))["id"] for p in procs[:3]]
            bad_ids = (await rogue.wait_for(lambda e: e["ev"] == "ready", 20))["ids"]
            for p, me in zip(procs[:3], ids):
                for other in ids:
                    if other != me:
                        await p.wait_for(_joined(other), 15)
            await _until(lambda: set(ids) <= {e.agent_id for e in table.peers()}, 15, "table")
            record_property("discovery_s", round(time.monotonic() - t_spawn, 2))
            # The rogue records really are on the wire (plain zeroconf sees them) ...
            names = {instance_name(i) for i in bad_ids.values()} | {"ea-garbage." + SERVICE_TYPE}
            await _until(lambda: names <= raw_names, 15, "rogue records on the wire")
            await asyncio.sleep(2.5 * DEFAULT_REFRESH_S)  # let every browser resolve them
            # ... but nobody admits them.
            assert {e.agent_id for e in table.peers()} == set(ids)
            assert table.rejected >= 2  # forged signature + copied tag without MAC
            for p in procs[:3]:
                assert not [e for e in p.events if e.get("id") in bad_ids.values()]

            # What `edge-agent peers --json` prints: a one-shot browse.
            listed = await list_peers(tmp_path / "data", secret, 2.5, interfaces=LO)
            assert sorted(d["agent_id"] for d in listed) == sorted(ids)
            assert all(d["addresses"] == ["127.0.0.1"] and d["signal_port"] == 7000
                       for d in listed)
            json.dumps(listed)
            text = format_peers(listed)
            assert all(i[:16] in text for i in ids) and "127.0.0.1:7000" in text

            # Capability update reaches the others.
            a0.send("update 4242")
            upd = lambda e: e["ev"] == "updated" and e["id"] == ids[0] and e["mem"] == 4242  # noqa
            await a1.wait_for(upd, 5)
            await a2.wait_for(upd, 5)
            await _until(lambda: table.get(ids[0]).caps.free_mem_mb == 4242, 5, "update")

            # Clean leave (SIGTERM -> goodbye packets): gone at once.
            t0 = time.monotonic()
            a2.proc.send_signal(signal.SIGTERM)
            ev = await _next_event(q, "left", ids[2], 5)
            clean_s = time.monotonic() - t0
            assert ev.reason == "goodbye" and clean_s < 1.0, clean_s
            await a0.wait_for(_left(ids[2]), 2)
            assert await asyncio.wait_for(a2.proc.wait(), 5) == 0
            assert any(e["ev"] == "bye" for e in a2.events)
            record_property("clean_leave_s", round(clean_s, 3))

            # SIGKILL: no goodbye; the short-TTL re-resolution drops it within the bound.
            t0 = time.monotonic()
            a1.proc.kill()
            ev = await _next_event(q, "left", ids[1], KILL_BOUND_S + SLACK_S + 1)
            kill_s = time.monotonic() - t0
            assert ev.reason == "timeout" and kill_s <= KILL_BOUND_S + SLACK_S, kill_s
            await a0.wait_for(_left(ids[1]), SLACK_S + 1)
            assert ids[0] in table  # the live one never flapped
            assert not [e for e in a0.events if e["ev"] == "left" and e["id"] != ids[1]
                        and e["id"] != ids[2]]
            record_property("sigkill_left_s", round(kill_s, 2))

            # Restart with the same identity (same instance name, while the browsers
            # still hold its clamped PTR): it must come back.
            t0 = time.monotonic()
            procs.append(await spawn(AGENT_SRC, {**cfg, "data_dir": str(tmp_path / "agent1"),
                                                 "mem": 1001}, "agent1-again", tmp_path))
            await _next_event(q, "joined", ids[1], 15)
            await a0.wait_for(lambda e: e["ev"] == "joined" and e["id"] == ids[1]
                              and e["t"] > t0, 10)
            record_property("rejoin_s", round(time.monotonic() - t0, 2))
            print(f"\nclean leave {clean_s * 1000:.0f} ms, SIGKILL detected in {kill_s:.2f} s"
                  f" (bound {KILL_BOUND_S:.0f} s)")
        finally:
            for p in procs:
                await p.stop()
            await raw.async_cancel()
            await browser.close()
            await aiozc.async_close()

    asyncio.run(main())


@pytest.mark.netns
def test_agents_discover_across_network_namespaces(tmp_path: Path) -> None:
    reason = netns_unavailable_reason()
    if reason:
        pytest.skip(reason)

    async def main() -> None:
        secret = f"swarm-{uuid.uuid4().hex}"
        with veth_pair() as ((ns_a, ip_a), (ns_b, ip_b)):
            procs: list[Proc] = []
            try:
                for ns in (ns_a, ns_b):  # default interfaces: whatever the namespace has
                    procs.append(await spawn(AGENT_SRC, {"secret": secret, "interfaces": None,
                                                         "mem": 1}, ns, tmp_path, netns=ns))
                pa, pb = procs
                ida = (await pa.wait_for(lambda e: e["ev"] == "ready", 20))["id"]
                idb = (await pb.wait_for(lambda e: e["ev"] == "ready", 20))["id"]
                ea = await pa.wait_for(_joined(idb), 15)
                eb = await pb.wait_for(_joined(ida), 15)
                assert ip_b in ea["addrs"] and ip_a in eb["addrs"]
                pb.proc.send_signal(signal.SIGTERM)
                await pa.wait_for(_left(idb), 3)
            finally:
                for p in procs:
                    await p.stop()

    asyncio.run(main())
