"""A user-space netem: delay and loss for what a router namespace forwards, through a TUN device.

Why: the kernels this project is tested and measured on have no ``sch_netem`` (``tc qdisc add
... netem`` answers "Specified qdisc kind is unknown"; fq, cake and prio are missing too), but
they have ``/dev/net/tun``. So the router namespace of a test or benchmark sends every packet it
forwards between its links into a TUN device; this program reads each one, drops it with
probability ``loss`` or writes it back ``delay`` later, and the kernel routes it on. The packets
are the real IP packets of the real TCP/TLS (or UDP/SCTP) connections, so retransmission after a
loss is the kernel's own, as behind a real lossy link.

Routing (``route_through``): ``ip rule iif <link> lookup 200`` sends what arrives on a link to
table 200, whose only route is the TUN device; ``ip rule iif <tun> lookup 100`` sends what comes
back out of the TUN to table 100, which holds the links' own subnets. Reverse-path filtering is
off in the router namespace (a packet from site A enters through the TUN, not A's link).

    ip netns exec R python tests/tun_netem.py --dev tn0 --delay-ms 10 [--loss 0.01] [--seed 1]

prints ``ready`` once the device is up; ``set DELAY_MS LOSS`` lines on stdin change the link
(each answered ``ok`` or ``error``); SIGTERM or the end of stdin ends it. Bandwidth is not limited; each packet
is held ``delay`` (so a round trip through the router pays it twice); order is kept. The
program's own cost is ~20-60 us per packet (a Python read and write).
"""

from __future__ import annotations

import argparse
import collections
import fcntl
import os
import random
import select
import signal
import struct
import subprocess
import sys
import threading
import time
from typing import Sequence

TUNSETIFF = 0x400454CA
IFF_TUN, IFF_NO_PI = 0x0001, 0x1000
MAX_PACKET = 65_535
MAX_QUEUED = 100_000  # packets held at once: a bound, far above what a test sends


def open_tun(name: str) -> int:
    fd = os.open("/dev/net/tun", os.O_RDWR)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TUN | IFF_NO_PI))
    return fd


class Link:
    """The emulated link's settings; ``set DELAY_MS LOSS`` on stdin changes them while running."""

    def __init__(self, delay_ms: float, loss: float) -> None:
        self.delay_s, self.loss = delay_ms / 1000.0, loss

    def set(self, delay_ms: float, loss: float) -> None:
        if not 0.0 <= loss < 1.0 or not 0.0 <= delay_ms <= 10_000:
            raise ValueError("loss must be in [0, 1) and delay in [0, 10000] ms")
        self.delay_s, self.loss = delay_ms / 1000.0, loss


def forward(fd: int, link: Link, seed: int, stop: threading.Event) -> None:
    """Read packets, drop or hold each, write them back in order when due."""
    rng = random.Random(seed)
    queue: collections.deque[tuple[float, bytes]] = collections.deque()  # (due, packet); dues never decrease
    cond = threading.Condition()
    last_due = 0.0

    def writer() -> None:
        while not stop.is_set():
            with cond:
                while not queue and not stop.is_set():
                    cond.wait(0.2)
                if stop.is_set():
                    return
                due, packet = queue[0]
                wait = due - time.monotonic()
                if wait > 0:
                    cond.wait(wait)
                    continue
                queue.popleft()
            os.write(fd, packet)

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    while not stop.is_set():
        ready, _, _ = select.select([fd], [], [], 0.2)
        if not ready:
            continue
        packet = os.read(fd, MAX_PACKET)
        if link.loss and rng.random() < link.loss:
            continue
        with cond:
            if len(queue) < MAX_QUEUED:
                # a shorter new delay must not overtake packets already held: order is kept
                last_due = max(time.monotonic() + link.delay_s, last_due)
                queue.append((last_due, packet))
                cond.notify()
    thread.join(timeout=1)


def route_through(ns: str, tun: str, links: Sequence[tuple[str, str]]) -> None:
    """In router namespace ``ns``: everything forwarded between ``links`` ([(device, subnet/len)])
    passes through TUN device ``tun`` (which the netem program must have created)."""
    def ip(*args: str) -> None:
        subprocess.run(["ip", "-n", ns, *args], check=True, capture_output=True, timeout=10)

    ip("link", "set", tun, "up")
    for dev, subnet in links:
        ip("route", "add", subnet, "dev", dev, "table", "100")
        ip("rule", "add", "iif", dev, "lookup", "200", "pref", "200")
    ip("route", "add", "default", "dev", tun, "table", "200")
    ip("rule", "add", "iif", tun, "lookup", "100", "pref", "100")
    sysctls = ["net.ipv4.ip_forward=1", "net.ipv4.conf.all.rp_filter=0", "net.ipv4.conf.default.rp_filter=0",
               f"net.ipv4.conf.{tun}.rp_filter=0"] + [f"net.ipv4.conf.{dev}.rp_filter=0" for dev, _ in links]
    subprocess.run(["ip", "netns", "exec", ns, "sysctl", "-q", "-w", *sysctls], check=True, capture_output=True, timeout=10)


def start(ns: str, tun: str, links: Sequence[tuple[str, str]], one_way_ms: float, loss: float = 0.0,
          seed: int = 1) -> subprocess.Popen:
    """Run the netem in router namespace ``ns`` and route ``links`` through it; the caller stops
    it (``proc.terminate()``) before deleting the namespace."""
    proc = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, os.path.abspath(__file__), "--dev", tun,
                             "--delay-ms", str(one_way_ms), "--loss", str(loss), "--seed", str(seed)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline().strip()  # bounded: the program prints ready or exits
    if line != "ready":
        proc.kill()
        raise RuntimeError(f"tun netem did not start in {ns} (exit {proc.poll()})")
    route_through(ns, tun, links)
    return proc


def change(proc: subprocess.Popen, one_way_ms: float, loss: float = 0.0) -> None:
    """New settings for a running netem (from ``start``)."""
    proc.stdin.write(f"set {one_way_ms} {loss}\n")
    proc.stdin.flush()
    if proc.stdout.readline().strip() != "ok":
        raise RuntimeError("tun netem refused the settings")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dev", required=True)
    ap.add_argument("--delay-ms", type=float, default=0.0)
    ap.add_argument("--loss", type=float, default=0.0, help="probability a packet is dropped, 0..1")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    if not 0.0 <= args.loss < 1.0 or args.delay_ms < 0:
        sys.exit("--loss must be in [0, 1) and --delay-ms >= 0")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    link = Link(args.delay_ms, args.loss)
    fd = open_tun(args.dev)
    print("ready", flush=True)
    threading.Thread(target=control, args=(link, stop), daemon=True).start()
    try:
        forward(fd, link, args.seed, stop)
    finally:
        os.close(fd)


def control(link: Link, stop: threading.Event) -> None:
    for line in sys.stdin:
        words = line.split()
        try:
            if len(words) != 3 or words[0] != "set":
                raise ValueError(line)
            link.set(float(words[1]), float(words[2]))
            print("ok", flush=True)
        except ValueError:
            print("error", flush=True)
    stop.set()


if __name__ == "__main__":
    main()
