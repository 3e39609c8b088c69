"""Helpers for discovery tests across OS processes and network namespaces.

Agents run as separate OS processes (`python -c AGENT_SRC`) printing JSON event lines,
optionally inside throwaway network namespaces joined by veth pairs.

Why namespaces: mDNS between processes on the host loopback is not the same as mDNS
between hosts (separate interfaces, multicast routing, default interface choice).  Each
namespace is its own network stack; the test creates and deletes them itself, and traffic
never leaves them (SUBNET lives only inside these namespaces).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

ROOT = Path(__file__).resolve().parents[1]

SUBNET = "10.213.47"  # only ever configured inside namespaces this module creates


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10, check=check)


def netns_unavailable_reason() -> str | None:
    """None when we can create namespaces here, else a sentence for pytest.skip."""
    if shutil.which("ip") is None:
        return "iproute2 'ip' command not installed"
    if os.geteuid() != 0:
        return "network namespaces need root"
    name = f"ea-probe-{os.getpid()}"
    try:
        res = _ip("netns", "add", name, check=False)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"'ip netns add' failed: {exc}"
    if res.returncode != 0:
        return f"'ip netns add' refused: {res.stderr.strip()[:200]}"
    _ip("netns", "del", name, check=False)
    return None


@contextlib.contextmanager
def veth_pair() -> Iterator[tuple[tuple[str, str], tuple[str, str]]]:
    """Two namespaces joined by one veth pair, multicast on.

    Yields ((ns_a, ip_a), (ns_b, ip_b)); everything is deleted on exit, even on error.
    """
    tag = f"{os.getpid() % 1000}{os.urandom(2).hex()}"  # <= 7 chars: IFNAMSIZ is 16
    ns_a, ns_b = f"ea-a-{tag}", f"ea-b-{tag}"
    ip_a, ip_b = f"{SUBNET}.1", f"{SUBNET}.2"
    created: list[str] = []
    try:
        for ns in (ns_a, ns_b):
            _ip("netns", "add", ns)
            created.append(ns)
        _ip("link", "add", f"veth-a{tag}", "netns", ns_a, "type", "veth",
            "peer", "name", f"veth-b{tag}", "netns", ns_b)
        for ns, dev, ip in ((ns_a, f"veth-a{tag}", ip_a), (ns_b, f"veth-b{tag}", ip_b)):
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", ns, "addr", "add", f"{ip}/24", "dev", dev)
            _ip("-n", ns, "link", "set", dev, "multicast", "on")
            _ip("-n", ns, "link", "set", dev, "up")
        yield (ns_a, ip_a), (ns_b, ip_b)
    finally:
        for ns in created:  # deleting a namespace deletes its end of the veth pair too
            _ip("netns", "del", ns, check=False)


def in_netns(ns: str, argv: list[str]) -> list[str]:
    """argv that runs `argv` inside namespace `ns`."""
    return ["ip", "netns", "exec", ns, *argv]


AGENT_SRC = r'''
import asyncio, json, sys
from edge_agent.discovery.identity import Identity, SwarmKey
from edge_agent.discovery.capabilities import Capabilities
from edge_agent.discovery.mdns import (MdnsAdvertiser, MdnsBrowser, open_zeroconf,
                                       install_shutdown_handler)
from edge_agent.discovery.peers import PeerTable

def out(**kw):
    print(json.dumps(kw), flush=True)

async def main(cfg):
    ident = Identity.load_or_create(cfg["data_dir"]) if cfg.get("data_dir") else Identity.generate()
    sk = SwarmKey.from_secret(cfg["secret"])
    caps = Capabilities(agent_id=ident.agent_id, signal_port=7000, free_mem_mb=cfg["mem"],
                        shards=(("0123456789abcdef", 0, 12),), ms_per_layer=1.5).sealed(ident, sk)
    ifs = cfg["interfaces"]
    aiozc = open_zeroconf(ifs)
    table = PeerTable(sk, self_id=ident.agent_id)
    table.on_event(lambda ev: out(ev=ev.kind, id=ev.agent_id, mem=ev.entry.caps.free_mem_mb,
                                  reason=ev.reason, addrs=ev.entry.addresses))
    adv = MdnsAdvertiser(caps, interfaces=ifs, aiozc=aiozc)
    browser = MdnsBrowser(table, aiozc=aiozc)
    done = install_shutdown_handler(adv.close, browser.close, aiozc.async_close)
    await browser.start()
    await adv.start()
    out(ev="ready", id=ident.agent_id)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)

    async def commands():
        nonlocal caps
        while line := await reader.readline():
            cmd, _, arg = line.decode().strip().partition(" ")
            if cmd == "update":
                caps = caps.with_changes(free_mem_mb=int(arg)).sealed(ident, sk)
                await adv.update(caps)
                out(ev="self-updated", mem=caps.free_mem_mb)

    task = loop.create_task(commands())
    await asyncio.wait_for(done.wait(), cfg["max_s"])
    task.cancel()
    out(ev="bye")

asyncio.run(main(json.loads(sys.argv[1])))
'''

ROGUE_SRC = r'''
import asyncio, json, sys
from dataclasses import replace
from zeroconf.asyncio import AsyncServiceInfo
from edge_agent.discovery.identity import Identity, SwarmKey
from edge_agent.discovery.capabilities import Capabilities
from edge_agent.discovery.mdns import (SERVICE_TYPE, MdnsAdvertiser, open_zeroconf,
                                       install_shutdown_handler)

async def main(cfg):
    swarm = SwarmKey.from_secret(cfg["secret"])
    recs = {}
    a = Identity.generate()
    recs["other-swarm"] = Capabilities(agent_id=a.agent_id).sealed(a, SwarmKey.from_secret("x"))
    b = Identity.generate()
    recs["open-swarm"] = Capabilities(agent_id=b.agent_id).sealed(b, SwarmKey.from_secret(None))
    victim, forger = Identity.generate(), Identity.generate()  # insider forging a signature
    body = Capabilities(agent_id=victim.agent_id, swarm_tag=swarm.tag())
    msg = body.signing_bytes()
    recs["forged-signature"] = replace(body, mac=swarm.prove(msg)[:16], signature=forger.sign(msg))
    o = Identity.generate()  # outsider copying the public tag, without the secret
    body = Capabilities(agent_id=o.agent_id, swarm_tag=swarm.tag())
    recs["copied-tag-no-mac"] = replace(body, signature=o.sign(body.signing_bytes()))
    ifs = cfg["interfaces"]
    aiozc = open_zeroconf(ifs)
    advs = [MdnsAdvertiser(c, interfaces=ifs, aiozc=aiozc) for c in recs.values()]
    junk = AsyncServiceInfo(SERVICE_TYPE, "ea-garbage." + SERVICE_TYPE, port=1,
                            properties=b"\x07v=1junk\x05\xff\xfe=\x01", server="ea-garbage.local.",
                            parsed_addresses=ifs, host_ttl=4, other_ttl=4)
    done = install_shutdown_handler(*(x.close for x in advs), aiozc.async_close)
    await asyncio.gather(*(x.start() for x in advs))
    await (await aiozc.async_register_service(junk))
    print(json.dumps({"ev": "ready", "ids": {k: c.agent_id for k, c in recs.items()}}), flush=True)
    await asyncio.wait_for(done.wait(), cfg["max_s"])

asyncio.run(main(json.loads(sys.argv[1])))
'''


class Proc:
    """A child process whose stdout is JSON lines; waits on them are bounded."""

    def __init__(self, proc: asyncio.subprocess.Process, name: str) -> None:
        self.proc, self.name = proc, name
        self.events: list[dict[str, Any]] = []
        self._cond = asyncio.Condition()
        self._pump = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        while line := await self.proc.stdout.readline():
            try:
                ev = json.loads(line)
            except ValueError:
                continue
            ev["t"] = time.monotonic()
            async with self._cond:
                self.events.append(ev)
                self._cond.notify_all()

    async def wait_for(self, pred: Callable[[dict[str, Any]], bool], timeout: float) -> dict:
        async def wait() -> None:
            async with self._cond:
                await self._cond.wait_for(lambda: any(pred(e) for e in self.events))

        try:
            await asyncio.wait_for(wait(), timeout)
        except asyncio.TimeoutError:
            raise AssertionError(f"{self.name}: timed out; events so far {self.events}") from None
        return next(e for e in self.events if pred(e))

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line.encode() + b"\n")

    async def stop(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()
        await asyncio.wait_for(self.proc.wait(), 10)
        self._pump.cancel()


async def spawn(src: str, cfg: dict[str, Any], name: str, log_dir: Path,
                netns: str | None = None) -> Proc:
    argv = [sys.executable, "-c", src, json.dumps({"max_s": 90, **cfg})]
    if netns:
        argv = in_netns(netns, argv)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    err = open(log_dir / f"{name}.stderr", "wb")  # noqa: SIM115 - closed with the process
    proc = await asyncio.create_subprocess_exec(*argv, stdin=asyncio.subprocess.PIPE,
                                                stdout=asyncio.subprocess.PIPE, stderr=err,
                                                cwd=str(ROOT), env=env)
    err.close()
    return Proc(proc, name)
