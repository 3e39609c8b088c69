"""Latency-bound links for benchmarks: a client and its peers in network namespaces, every
packet between them through a router namespace that delays (and may drop) it.

    with NetnsLinks(n_peers=2, one_way_ms=2.5, loss=0.01) as links:
        proc = links.start_peer(0, [...join args...])   # `edge-agent join` inside peer 0's namespace
        links.enter_client()                            # this thread's sockets now live in the client's
        links.set(10.0, 0.0)                            # new delay / loss, same topology

Each namespace (client, peer 0..n-1) has one veth to the router namespace and a default route
through it; the router forwards through ``tests/tun_netem.py`` (user-space netem on a TUN
device: these kernels have no ``sch_netem``). A hop's round trip from the client is
``2 * one_way_ms``; a chain of hops pays ``one_way_ms`` per link. Needs root and
``/dev/net/tun``; ``unavailable()`` says why not. Namespaces are named ``ea-bl-*`` and
removed on exit; nothing outside them is touched.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import tun_netem  # noqa: E402

PREFIX = "10.214"  # only inside these namespaces
CLONE_NEWNET = 0x40000000


def unavailable() -> str | None:
    if os.geteuid() != 0:
        return "needs root (network namespaces)"
    if shutil.which("ip") is None:
        return "needs iproute2's ip"
    if not os.path.exists("/dev/net/tun"):
        return "needs /dev/net/tun"
    return None


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


class NetnsLinks:
    def __init__(self, n_peers: int, one_way_ms: float = 0.0, loss: float = 0.0) -> None:
        tag = f"{os.getpid() % 10000}"
        self.router = f"ea-bl-r{tag}"
        self.names = [f"ea-bl-c{tag}"] + [f"ea-bl-p{i}-{tag}" for i in range(n_peers)]
        self.one_way_ms, self.loss = one_way_ms, loss
        self._created: list[str] = []
        self._netem: subprocess.Popen | None = None

    def address(self, index: int) -> str:
        """The client's (index 0) or peer ``index - 1``'s address."""
        return f"{PREFIX}.{index}.1"

    def peer_address(self, peer: int) -> str:
        return self.address(peer + 1)

    def __enter__(self) -> "NetnsLinks":
        try:
            links = []
            for ns in [self.router, *self.names]:
                _ip("netns", "add", ns)
                self._created.append(ns)
                _ip("-n", ns, "link", "set", "lo", "up")
            for i, ns in enumerate(self.names):
                dev, rdev, net = f"bl{i}h", f"bl{i}r", f"{PREFIX}.{i}"
                _ip("link", "add", dev, "netns", ns, "type", "veth", "peer", "name", rdev, "netns", self.router)
                _ip("-n", ns, "addr", "add", f"{net}.1/24", "dev", dev)
                _ip("-n", ns, "link", "set", dev, "up")
                _ip("-n", ns, "route", "add", "default", "via", f"{net}.254")
                _ip("-n", self.router, "addr", "add", f"{net}.254/24", "dev", rdev)
                _ip("-n", self.router, "link", "set", rdev, "up")
                links.append((rdev, f"{net}.0/24"))
            self._netem = tun_netem.start(self.router, "blnetem", links, self.one_way_ms, self.loss)
            return self
        except BaseException:
            self.__exit__(None, None, None)
            raise

    def set(self, one_way_ms: float, loss: float = 0.0) -> None:
        tun_netem.change(self._netem, one_way_ms, loss)
        self.one_way_ms, self.loss = one_way_ms, loss

    def command(self, peer: int, argv: list[str]) -> list[str]:
        """``argv`` run inside peer ``peer``'s namespace."""
        return ["ip", "netns", "exec", self.names[peer + 1], *argv]

    def enter_client(self) -> None:
        """Move the calling thread (and threads it starts later) into the client's namespace."""
        fd = os.open(f"/run/netns/{self.names[0]}", os.O_RDONLY)
        try:
            if ctypes.CDLL(None, use_errno=True).setns(fd, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns into the client's namespace failed")
        finally:
            os.close(fd)

    def __exit__(self, *exc) -> None:
        if self._netem is not None:
            self._netem.terminate()
            try:
                self._netem.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._netem.kill()
        for ns in self._created:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)
        self._created.clear()
