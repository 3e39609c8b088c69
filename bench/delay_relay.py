"""A TCP relay that holds every byte for a fixed one-way delay: a latency-bound link on loopback.

    .venv/bin/python bench/delay_relay.py LISTEN_PORT TARGET_HOST:TARGET_PORT ONE_WAY_MS

Why not ``tc netem``: the kernels of the machines this project is measured on have no
netem qdisc (``tc qdisc add ... netem`` answers "Specified qdisc kind is unknown"), so
``bench/`` emulates delay in user space. Each direction of each connection keeps its bytes
in order and releases them ``ONE_WAY_MS`` after they arrived; bandwidth is not limited and
nothing is lost. The relay itself adds ~0.1 ms per direction (measured with 0 ms delay).
"""

from __future__ import annotations

import asyncio
import sys


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay_s: float) -> None:
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

    async def pump() -> None:
        while True:
            data = await reader.read(1 << 16)
            queue.put_nowait((loop.time() + delay_s, data))
            if not data:
                return

    async def deliver() -> None:
        while True:
            due, data = await queue.get()
            if (wait := due - loop.time()) > 0:
                await asyncio.sleep(wait)
            if not data:  # the sender closed: pass it on once what it sent is delivered
                if writer.can_write_eof():
                    writer.write_eof()
                return
            writer.write(data)
            await writer.drain()

    try:
        await asyncio.gather(pump(), deliver())
    except (ConnectionError, OSError):
        writer.close()


async def serve(listen_port: int, host: str, port: int, one_way_ms: float) -> None:
    delay_s = one_way_ms / 1000.0

    async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(host, port)
        except OSError:
            writer.close()
            return
        for sock in (writer.get_extra_info("socket"), up_writer.get_extra_info("socket")):
            sock.setsockopt(6, 1, 1)  # TCP_NODELAY: the delay is ours, not Nagle's
        await asyncio.gather(_pipe(reader, up_writer, delay_s), _pipe(up_reader, writer, delay_s))

    server = await asyncio.start_server(on_client, "127.0.0.1", listen_port)
    print("ready", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    target_host, target_port = sys.argv[2].rsplit(":", 1)
    asyncio.run(serve(int(sys.argv[1]), target_host, int(target_port), float(sys.argv[3])))
