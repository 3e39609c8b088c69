"""A relay across sites that cannot reach each other: three network namespaces, site A, site B
and R.  A and B each have a route only to R's side of their link (no default route, and R does
not forward), so neither site can open a connection to the other, as if both were behind NAT.
R runs `edge-agent join --relay`; a `join` peer at site B bootstraps from R and keeps a
reservation there (`--relay-via`); a client at site A, told only R's address, plans through R
(direct) and the peer at B (through the relay) and its tokens equal llama.cpp's.  Real agents,
real processes; the test creates and deletes every namespace (tests/netns_util.py explains why).
Needs root and `ip`; skipped otherwise, like the other namespace tests.  Every wait is bounded."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest

from conftest import reference_tokens
from netns_util import ROOT, in_netns, netns_unavailable_reason
from test_membership_netns import CLIENT_SRC

pytestmark = pytest.mark.netns
SECRET = "sites that cannot dial each other"
SITE_A, SITE_B = "10.213.50", "10.213.51"  # only ever configured inside namespaces created here


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10, check=True)


@contextlib.contextmanager
def sites_without_a_route() -> Iterator[dict]:
    """{"a": (ns, ip), "b": (ns, ip), "r": (ns, ip seen from A, ip seen from B)}."""
    tag = f"{os.getpid() % 1000}{os.urandom(2).hex()}"  # interface names stay under IFNAMSIZ
    ns_a, ns_b, ns_r = f"ea-na-{tag}", f"ea-nb-{tag}", f"ea-nr-{tag}"
    created: list[str] = []
    try:
        for ns in (ns_a, ns_b, ns_r):
            _ip("netns", "add", ns)
            created.append(ns)
            _ip("-n", ns, "link", "set", "lo", "up")
        for site, ns, net in (("a", ns_a, SITE_A), ("b", ns_b, SITE_B)):
            dev, rdev = f"n{site}{tag}", f"nr{site}{tag}"
            _ip("link", "add", dev, "netns", ns, "type", "veth", "peer", "name", rdev, "netns", ns_r)
            _ip("-n", ns, "addr", "add", f"{net}.1/24", "dev", dev)
            _ip("-n", ns, "link", "set", dev, "up")
            _ip("-n", ns_r, "addr", "add", f"{net}.254/24", "dev", rdev)
            _ip("-n", ns_r, "link", "set", rdev, "up")
        yield {"a": (ns_a, f"{SITE_A}.1"), "b": (ns_b, f"{SITE_B}.1"), "r": (ns_r, f"{SITE_A}.254", f"{SITE_B}.254")}
    finally:
        for ns in created:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)


def cannot_connect(ns: str, ip: str, port: int) -> bool:
    code = (f"import socket\ntry:\n    socket.create_connection(({ip!r}, {port}), timeout=3).close()\n"
            "    print('connected')\nexcept OSError as exc:\n    print('refused', exc)")
    out = subprocess.run(in_netns(ns, [sys.executable, "-c", code]), capture_output=True, text=True, timeout=30).stdout
    return out.startswith("refused")


@pytest.mark.slow
def test_a_client_at_site_a_generates_through_a_peer_at_site_b_via_a_relay(tmp_path: Path, tiny_model: Path,
                                                                            monkeypatch) -> None:
    reason = netns_unavailable_reason()
    if reason:
        pytest.skip(reason)
    from swarm_util import start_peer

    monkeypatch.setenv("EDGE_AGENT_SWARM_KEY", SECRET)
    monkeypatch.setenv("EDGE_AGENT_LOG_LEVEL", "info")  # R's log names each circuit it splices
    with sites_without_a_route() as sites:
        (ns_a, ip_a), (ns_b, ip_b), (ns_r, r_from_a, r_from_b) = sites["a"], sites["b"], sites["r"]
        started = []
        try:
            relay = start_peer(tiny_model, "1:3", tmp_path / "r", "--host", "0.0.0.0", "--relay",
                               prefix=tuple(in_netns(ns_r, [])))
            started.append(relay)
            port = relay.ready["tls_port"]
            peer = start_peer(tiny_model, "3:4", tmp_path / "b", "--host", ip_b, "--bootstrap", f"{r_from_b}:{port}",
                              "--relay-via", f"{r_from_b}:{port}", prefix=tuple(in_netns(ns_b, [])))
            started.append(peer)
            assert cannot_connect(ns_a, ip_b, peer.ready["tls_port"])  # site A has no way to site B
            assert cannot_connect(ns_b, ip_a, 9)
            cfg = {"data_dir": str(tmp_path / "client"), "secret": SECRET, "ip": ip_a, "bootstrap": [[r_from_a, port]],
                   "model": str(tiny_model), "prompt": "Once upon a time", "n": 24, "mode": "star"}
            (tmp_path / "client").mkdir()
            res = subprocess.run(in_netns(ns_a, [sys.executable, "-c", CLIENT_SRC, json.dumps(cfg)]), capture_output=True,
                                 text=True, timeout=240, env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=str(ROOT))
            assert res.returncode == 0, res.stderr[-3000:]
            out = json.loads(res.stdout.strip().splitlines()[-1])
            assert out["tokens"] == reference_tokens(tiny_model, out["prompt"], 24)
            assert [(h["peer_id"], h["range"]) for h in out["path"]] == [(relay.agent_id, "1:3"), (peer.agent_id, "3:4")]
            assert "relay: circuit" in relay.log.read_text()  # the hop at B went through R
        finally:
            for p in started:
                p.kill()
