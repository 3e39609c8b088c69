"""Splitting one encoded frame into bounded messages, and putting it back together.

Why: WebRTC data channels in aiortc cap a message at 256 KiB (and big SCTP messages stall
everything queued behind them), while activations reach megabytes.  A fragment carries a
14-byte header; the receiver keeps at most one message in progress per stream and checks
every size against its limit *before* buffering, so a hostile peer cannot grow memory past
`max_message`.  Fragments must arrive in order (the channel is ordered and reliable):
anything else is a protocol error and the stream is dead.

Fragment header (little-endian, struct "<2sBBIII"):
  magic b"EG" | version 1 | flags (FIRST=1, LAST=2) | msg_id u32 | index u32 | total_len u32
"""

from __future__ import annotations

import struct

from .errors import FrameError

FRAGMENT_HEADER = struct.Struct("<2sBBIII")
FRAGMENT_HEADER_SIZE = FRAGMENT_HEADER.size  # 14
FRAG_MAGIC = b"EG"
FRAG_VERSION = 1
FIRST = 1
LAST = 2
_U32 = 0xFFFFFFFF


def fragment(data: bytes | bytearray | memoryview, max_size: int, msg_id: int = 0) -> list[bytes]:
    """Split `data` into messages of at most `max_size` bytes (header included)."""
    if max_size <= FRAGMENT_HEADER_SIZE:
        raise ValueError(f"max_size must exceed the {FRAGMENT_HEADER_SIZE}-byte fragment header")
    total = len(data)
    if total > _U32:
        raise FrameError(f"message of {total} bytes is too large to fragment")
    chunk = max_size - FRAGMENT_HEADER_SIZE
    view = memoryview(data)
    out: list[bytes] = []
    n = max(1, -(-total // chunk))
    msg_id &= _U32
    for i in range(n):
        flags = (FIRST if i == 0 else 0) | (LAST if i == n - 1 else 0)
        head = FRAGMENT_HEADER.pack(FRAG_MAGIC, FRAG_VERSION, flags, msg_id, i, total)
        out.append(head + view[i * chunk:(i + 1) * chunk])
    return out


class Reassembler:
    """Reassembles the fragments of one ordered stream, one message at a time.

    `feed()` returns the complete message when its LAST fragment arrives, else None.  After a
    FrameError the stream is unusable (raise it up and drop the connection).
    """

    def __init__(self, max_message: int, max_fragment: int = 1 << 20, first_msg_id: int = 0) -> None:
        self.max_message = max_message
        self.max_fragment = max_fragment
        self._next_msg = first_msg_id & _U32
        self._parts: list[bytes] = []
        self._received = 0
        self._total = -1  # -1: idle
        self._next_index = 0
        self._broken: str | None = None

    @property
    def buffered(self) -> int:
        """Bytes held for the message in progress (bounded by `max_message`)."""
        return self._received

    def _fail(self, reason: str) -> FrameError:
        self._broken = reason
        self._parts.clear()
        self._received = 0
        return FrameError(reason)

    def feed(self, frag: bytes | bytearray | memoryview) -> bytes | None:
        if self._broken is not None:
            raise FrameError(f"stream already failed: {self._broken}")
        size = len(frag)
        if size < FRAGMENT_HEADER_SIZE:
            raise self._fail(f"short fragment: {size} bytes")
        if size > self.max_fragment:
            raise self._fail(f"fragment of {size} bytes > max {self.max_fragment}")
        magic, version, flags, msg_id, index, total = FRAGMENT_HEADER.unpack_from(frag, 0)
        if magic != FRAG_MAGIC or version != FRAG_VERSION:
            raise self._fail("bad fragment magic/version")
        if flags & ~(FIRST | LAST):
            raise self._fail(f"unknown fragment flags {flags:#x}")
        if total > self.max_message:
            raise self._fail(f"message of {total} bytes > max {self.max_message}")
        if self._total < 0:
            if not flags & FIRST or index != 0:
                raise self._fail(f"fragment {index} of message {msg_id} arrived without its first fragment")
            if msg_id != self._next_msg:
                raise self._fail(f"message {msg_id} out of order (expected {self._next_msg})")
            self._total = total
            self._next_index = 0
        else:
            if flags & FIRST:
                raise self._fail(f"message {msg_id} started before message {self._next_msg} finished")
            if msg_id != self._next_msg or total != self._total:
                raise self._fail(f"fragment of message {msg_id} interleaved with message {self._next_msg}")
            if index != self._next_index:
                raise self._fail(f"fragment {index} out of order (expected {self._next_index})")
        body = size - FRAGMENT_HEADER_SIZE
        if self._received + body > self._total:
            raise self._fail(f"fragments exceed declared length {self._total}")
        if body:
            self._parts.append(bytes(memoryview(frag)[FRAGMENT_HEADER_SIZE:]))
        self._received += body
        self._next_index += 1
        if not flags & LAST:
            return None
        if self._received != self._total:
            raise self._fail(f"message {msg_id} ended at {self._received} of {self._total} bytes")
        parts, self._parts = self._parts, []
        self._received, self._total = 0, -1
        self._next_msg = (self._next_msg + 1) & _U32
        if len(parts) == 1:
            return parts[0]
        return b"".join(parts)
