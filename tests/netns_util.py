"""Throwaway network namespaces joined by veth pairs, for multi-host tests on one machine.

Why: mDNS between processes on the host loopback is not the same as mDNS between hosts
(separate interfaces, multicast routing, default interface choice).  Namespaces give each
agent its own network stack; the test creates and deletes them itself, and traffic never
leaves them (the addresses below live only inside these namespaces).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from typing import Iterator

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
    tag = f"{os.getpid() % 100000}"
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
