"""What a peer-to-peer engine would cost the agent (the measurements behind docs/discovery.md,
"Beyond one LAN"). Neither engine is a dependency: install each into a throwaway venv and run
this file with that venv's python, e.g.

    python3 -m venv /tmp/m_kad && /tmp/m_kad/bin/pip install kademlia==2.2.3
    /tmp/m_kad/bin/python bench/p2p_engines.py kademlia 20
    python3 -m venv /tmp/m_p2p && /tmp/m_p2p/bin/pip install libp2p==0.8.1   # builds fastecdsa: cc + libgmp-dev
    /tmp/m_p2p/bin/python bench/p2p_engines.py libp2p 10
    du -sh /tmp/m_*/lib/python3*/site-packages; /tmp/m_p2p/bin/pip list | wc -l

Prints import time and resident memory, the time to start one node, N nodes (one process,
loopback) joining through the first one, and the memory the N nodes add.
"""

from __future__ import annotations

import sys
import time


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS"))


def kademlia(n: int) -> None:
    import asyncio

    base, t0 = rss_mb(), time.perf_counter()
    from kademlia.network import Server
    t_import, after_import = time.perf_counter() - t0, rss_mb()

    async def main() -> None:
        t1 = time.perf_counter()
        first = Server()
        await first.listen(19000, interface="127.0.0.1")
        t_start, nodes = time.perf_counter() - t1, [first]
        for i in range(1, n):
            s = Server()
            await s.listen(19000 + i, interface="127.0.0.1")
            await s.bootstrap([("127.0.0.1", 19000)])
            nodes.append(s)
        t_join = time.perf_counter() - t1
        print(f"kademlia: import {t_import * 1000:.0f} ms (+{after_import - base:.1f} MB), start {t_start * 1000:.1f} ms, "
              f"{n} nodes joined in {t_join * 1000:.0f} ms, +{rss_mb() - after_import:.1f} MB for {n} nodes")
        for s in nodes:
            s.stop()

    asyncio.run(main())


def libp2p(n: int) -> None:
    import os

    base, t0 = rss_mb(), time.perf_counter()
    from contextlib import AsyncExitStack

    import multiaddr
    import trio
    from libp2p import new_host
    from libp2p.crypto.secp256k1 import create_new_key_pair
    from libp2p.kad_dht.kad_dht import DHTMode, KadDHT
    from libp2p.peer.peerinfo import info_from_p2p_addr
    from libp2p.pubsub.gossipsub import PROTOCOL_ID, GossipSub
    from libp2p.pubsub.pubsub import Pubsub
    from libp2p.tools.anyio_service import background_trio_service
    t_import, after_import = time.perf_counter() - t0, rss_mb()

    async def main() -> None:
        async with AsyncExitStack() as stack:
            hosts, t1, t_first = [], time.perf_counter(), None
            for i in range(n):
                h = new_host(key_pair=create_new_key_pair())
                await stack.enter_async_context(h.run([multiaddr.Multiaddr(f"/ip4/127.0.0.1/tcp/{20000 + i}")]))
                await stack.enter_async_context(background_trio_service(KadDHT(h, DHTMode.SERVER)))
                gossip = GossipSub([PROTOCOL_ID], 6, 4, 12, heartbeat_interval=1)
                pubsub = Pubsub(h, gossip)
                await stack.enter_async_context(background_trio_service(pubsub))
                await stack.enter_async_context(background_trio_service(gossip))
                await pubsub.wait_until_ready()
                if hosts:
                    await h.connect(info_from_p2p_addr(multiaddr.Multiaddr(
                        f"/ip4/127.0.0.1/tcp/20000/p2p/{hosts[0].get_id()}")))
                t_first = t_first or time.perf_counter() - t1
                hosts.append(h)
            print(f"libp2p: import {t_import * 1000:.0f} ms (+{after_import - base:.1f} MB), host+KadDHT+GossipSub up in "
                  f"{t_first * 1000:.0f} ms, {n} hosts joined in {(time.perf_counter() - t1) * 1000:.0f} ms, "
                  f"+{rss_mb() - after_import:.1f} MB for {n} hosts")
            os._exit(0)  # its services' shutdown is slow and not what is measured

    trio.run(main)


if __name__ == "__main__":
    {"kademlia": kademlia, "libp2p": libp2p}[sys.argv[1]](int(sys.argv[2]) if len(sys.argv) > 2 else 10)
