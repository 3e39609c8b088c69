"""Two connections' byte streams joined into one, bounded: what a relay member does with a circuit.

Why a module of its own: it knows no frames and no relay messages, only transports.  Each
direction is a plain Protocol that writes what it reads into the other transport, with
backpressure (a full write buffer on one side pauses reading on the other), a bound on the
bytes carried and on idle time; either end closing closes both.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Callable

log = logging.getLogger(__name__)


class Pipe(asyncio.Protocol):
    """One direction: bytes read from one connection are written to the other."""

    def __init__(self, splice: "Splice", out: asyncio.Transport) -> None:
        self.splice, self.out = splice, out

    def data_received(self, data: bytes) -> None:
        self.splice.carried(len(data))
        if not self.out.is_closing():
            self.out.write(data)

    def eof_received(self) -> bool:
        self.splice.close("closed by an end")
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.splice.close("an end went away")

    # Our connection's write buffer is full of the *other* side's bytes: stop reading there.
    def pause_writing(self) -> None:
        self.splice.other(self).pause_reading()

    def resume_writing(self) -> None:
        self.splice.other(self).resume_reading()


class Splice:
    """Joins transports `a` and `b` (each with the bytes already read from it that belong to the
    other, `rest`); closes both past `max_bytes` carried or `idle_timeout_s` without a byte."""

    def __init__(self, a: tuple[asyncio.Transport, bytes], b: tuple[asyncio.Transport, bytes], *, max_bytes: int,
                 idle_timeout_s: float, on_bytes: Callable[[int], None] = lambda n: None,
                 on_close: Callable[["Splice"], None] = lambda s: None) -> None:
        self.max_bytes, self.idle_timeout_s = max_bytes, idle_timeout_s
        self.on_bytes, self.on_close = on_bytes, on_close
        self.bytes = 0
        self.last = time.monotonic()
        self._closed = False
        (ta, rest_a), (tb, rest_b) = a, b
        self.transports = (ta, tb)
        self.pipes = (Pipe(self, tb), Pipe(self, ta))  # reads a writes b; reads b writes a
        for transport, pipe, rest in ((ta, self.pipes[0], rest_a), (tb, self.pipes[1], rest_b)):
            transport.set_protocol(pipe)
            if rest:
                pipe.data_received(rest)
            transport.resume_reading()
        self._watch = asyncio.get_running_loop().create_task(self._idle())

    def other(self, pipe: Pipe) -> asyncio.Transport:
        return self.transports[1] if pipe is self.pipes[0] else self.transports[0]

    def carried(self, n: int) -> None:
        self.bytes += n
        self.last = time.monotonic()
        self.on_bytes(n)
        if self.bytes > self.max_bytes:
            self.close(f"over {self.max_bytes} bytes")

    async def _idle(self) -> None:
        while not self._closed:
            await asyncio.sleep(self.idle_timeout_s / 4)
            if time.monotonic() - self.last > self.idle_timeout_s:
                self.close(f"idle for {self.idle_timeout_s:g} s")

    def close(self, reason: str) -> None:
        if self._closed:
            return
        self._closed = True
        log.info("relay: circuit closed: %s", reason)
        self.on_close(self)
        if self._watch is not asyncio.current_task():
            self._watch.cancel()
        for t in self.transports:
            t.close()
