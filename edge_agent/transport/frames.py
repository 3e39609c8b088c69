"""The inference-plane frame: a fixed binary header plus a raw tensor payload.

Why a hand-written codec: frames come from untrusted peers, so every size is checked
against limits *before* anything is allocated, and nothing is ever unpickled.  The same
bytes travel over TLS and WebRTC; docs/transport.md is the normative description.

Header (little-endian, 96 bytes, struct format `HEADER_FMT`):

  off size field
    0  4   magic            b"EAF\\x01"  (edge-agent frame)
    4  1   version          PROTOCOL_VERSION (1)
    5  1   type             MsgType
    6  2   flags            Flag bits (unknown bits are refused)
    8 16   request_id       opaque 16 bytes (uuid4 bytes on the client)
   24  4   step             token position of the first position in this frame
   28  4   n_positions      positions carried (1 for decode, N for a prefill chunk)
   32  2   layer_start      layer range [start, end): opaque to the transport, the
   34  2   layer_end        split protocol's routing key (docs/split.md)
   36  1   dtype            DType
   37  1   ndim             0..2
   38  2   reserved         must be 0
   40  4   shape0
   44  4   shape1
   48  8   reserved3        must be 0
   56  8   seq              per-(sender, request) sequence number
   64  8   payload_len      bytes after the header
   72 16   payload_hash     blake2b-128 of the payload when Flag.HASHED, else zeros
   88  4   compute_us       replies: microseconds the node spent computing (0 = not given)
   92  4   reserved2        must be 0
"""

from __future__ import annotations

import enum
import hashlib
import struct
from dataclasses import dataclass, field, replace

import numpy as np

from .errors import FrameError  # re-exported

MAGIC = b"EAF\x01"
PROTOCOL_VERSION = 1
HEADER_FMT = "<4sBBH16sIIHHBBHIIQQQ16sII"
HEADER = struct.Struct(HEADER_FMT)
HEADER_SIZE = HEADER.size  # 96
HASH_SIZE = 16
DEFAULT_MAX_PAYLOAD = 64 << 20  # 64 MiB
MAX_NDIM = 2
U32_MAX = 0xFFFFFFFF

assert HEADER_SIZE == 96, HEADER_SIZE


class MsgType(enum.IntEnum):
    """Frame types.  New types get new numbers; a peer refuses numbers it does not know.
    2, 3 and 9 (TOKENS, LOGITS, REPLAY of early drafts) are retired: never reuse them."""

    ACTIVATION = 1   # hidden states between hops (f16/f32, shape [n_positions, hidden])
    ERROR = 4        # payload: JSON {"code", "message"} (u8), see split/protocol.py
    HEARTBEAT = 5    # liveness; no payload; never surfaced to `Channel.recv`
    HELLO = 6        # transport handshake message (u8 payload, see handshake.py)
    END_REQUEST = 7  # free per-request state (KV cache) on the receiver
    ACK = 8          # acknowledges (request_id, seq)
    CONTROL = 10     # small application message (u8 payload, e.g. JSON) outside the hot path
    CLOSE = 11       # graceful close; the receiver's recv raises PeerLostError("closed by peer")


class Flag(enum.IntFlag):
    NONE = 0
    HASHED = 1 << 0    # payload_hash is set and was verified on decode
    PREFILL = 1 << 1   # frame is (part of) a prefill, not a single decode step
    # bit 2 (LAST of early drafts) is retired
    REPLAY = 1 << 3    # activations re-sent to a replacement node to rebuild its KV cache
    CHAIN = 1 << 4     # chain mode: the node forwards its output to the next hop of the request's route
    REWIND = 1 << 5    # drop the request's cached positions from `step` on first (rejected speculative drafts)
    DRAFT = 1 << 6     # rows are drafted decode steps: each row's result must equal decoding it alone


KNOWN_FLAGS = int(Flag.HASHED | Flag.PREFILL | Flag.REPLAY | Flag.CHAIN | Flag.REWIND | Flag.DRAFT)
_HASHED = int(Flag.HASHED)  # plain ints on the hot path: IntFlag arithmetic is slow


class DType(enum.IntEnum):
    F32 = 1
    F16 = 2
    I32 = 3
    U8 = 4  # raw bytes (error text, control messages, handshakes)


_NP_DTYPES = {DType.F32: np.dtype("<f4"), DType.F16: np.dtype("<f2"),
              DType.I32: np.dtype("<i4"), DType.U8: np.dtype("u1")}
_FROM_NP = {np.dtype("float32"): DType.F32, np.dtype("float16"): DType.F16,
            np.dtype("int32"): DType.I32, np.dtype("uint8"): DType.U8}
ITEMSIZE = {d: _NP_DTYPES[d].itemsize for d in DType}
_ITEMSIZE_BY_VALUE = {int(d): n for d, n in ITEMSIZE.items()}
_MSG_BY_VALUE = {int(t): t for t in MsgType}
_DTYPE_BY_VALUE = {int(d): d for d in DType}
_ZERO16 = b"\x00" * 16


def payload_hash(payload: bytes | memoryview) -> bytes:
    """The 16-byte blake2b digest stored in the header when Flag.HASHED is set."""
    return hashlib.blake2b(payload, digest_size=HASH_SIZE).digest()


@dataclass(frozen=True)
class Frame:
    """One message.  `payload` is raw little-endian tensor bytes matching dtype/shape."""

    type: MsgType
    request_id: bytes = b"\x00" * 16
    step: int = 0
    n_positions: int = 0
    layer_start: int = 0
    layer_end: int = 0
    dtype: DType = DType.U8
    shape: tuple[int, ...] = ()
    seq: int = 0
    flags: int = 0
    compute_us: int = 0
    payload: bytes | bytearray = b""
    payload_hash: bytes = field(default=b"", compare=False)

    # --- constructors -------------------------------------------------------------------
    @classmethod
    def from_array(cls, type: MsgType, array: np.ndarray, **kw: object) -> "Frame":
        """Build a frame whose payload is `array` (1-D or 2-D, f32/f16/i32/u8)."""
        arr = np.asarray(array)
        dt = _FROM_NP.get(arr.dtype) if arr.dtype.byteorder in "<=|" else None
        if dt is None:
            raise FrameError(f"unsupported array dtype {arr.dtype}")
        if arr.ndim > MAX_NDIM:
            raise FrameError(f"array has {arr.ndim} dims, max {MAX_NDIM}")
        data = np.ascontiguousarray(arr).tobytes()
        return cls(type=type, dtype=dt, shape=tuple(int(s) for s in arr.shape), payload=data, **kw)  # type: ignore[arg-type]

    @classmethod
    def from_bytes(cls, type: MsgType, data: bytes, **kw: object) -> "Frame":
        """Build a frame carrying opaque bytes (dtype U8, shape (len,))."""
        return cls(type=type, dtype=DType.U8, shape=(len(data),) if data else (), payload=bytes(data), **kw)  # type: ignore[arg-type]

    # --- accessors ----------------------------------------------------------------------
    def array(self) -> np.ndarray:
        """Zero-copy, read-only numpy view of the payload with the frame's dtype and shape."""
        arr = np.frombuffer(self.payload, dtype=_NP_DTYPES[DType(self.dtype)])
        return arr.reshape(self.shape) if self.shape else arr

    def hashed(self) -> "Frame":
        """A copy with the payload hash computed and Flag.HASHED set (end-to-end integrity,
        commitments).  Off by default: TLS/DTLS already protect each hop, and blake2b runs at
        ~0.5 GB/s here, which would halve prefill throughput."""
        return replace(self, flags=self.flags | Flag.HASHED, payload_hash=payload_hash(self.payload))

    @property
    def nbytes(self) -> int:
        return HEADER_SIZE + len(self.payload)


def encode(frame: Frame, max_payload: int = DEFAULT_MAX_PAYLOAD) -> bytes:
    """Serialize a frame to one buffer; refuses frames a conforming peer would refuse."""
    header, payload = encode_parts(frame, max_payload)
    return header + payload if payload else header


def encode_parts(frame: Frame, max_payload: int = DEFAULT_MAX_PAYLOAD) -> tuple[bytes, bytes]:
    """(header, payload) without concatenating: stream writers send both, saving a copy."""
    payload = frame.payload
    plen = len(payload)
    shape = frame.shape
    ndim = len(shape)
    if ndim > MAX_NDIM:
        raise FrameError(f"shape has {ndim} dims, max {MAX_NDIM}")
    elems = 1 if ndim else 0
    for s in shape:
        if not isinstance(s, int) or s < 0 or s > U32_MAX:
            raise FrameError(f"bad shape {shape}")
        elems *= s
    itemsize = ITEMSIZE.get(frame.dtype)  # type: ignore[call-overload]
    if itemsize is None:
        raise FrameError(f"bad dtype {frame.dtype}")
    if elems * itemsize != plen:
        raise FrameError(f"shape {shape} x {DType(frame.dtype).name} != payload length {plen}")
    if plen > max_payload:
        raise FrameError(f"payload {plen} > max {max_payload}")
    if len(frame.request_id) != 16:
        raise FrameError("request_id must be 16 bytes")
    flags = int(frame.flags)
    if flags & ~KNOWN_FLAGS:
        raise FrameError(f"unknown flags {flags:#x}")
    digest = _ZERO16
    if flags & _HASHED:
        digest = frame.payload_hash or payload_hash(payload)
        if len(digest) != HASH_SIZE:
            raise FrameError("payload_hash must be 16 bytes")
    s0 = shape[0] if ndim > 0 else 0
    s1 = shape[1] if ndim > 1 else 0
    try:
        header = HEADER.pack(MAGIC, PROTOCOL_VERSION, frame.type, flags, frame.request_id,
                             frame.step, frame.n_positions, frame.layer_start, frame.layer_end,
                             frame.dtype, ndim, 0, s0, s1, 0, frame.seq, plen,
                             digest, frame.compute_us, 0)
    except struct.error as exc:
        raise FrameError(f"field out of range: {exc}") from None
    if frame.layer_start > frame.layer_end:
        raise FrameError("layer_start > layer_end")
    return header, payload  # type: ignore[return-value]


def peek_header(buf: bytes | bytearray | memoryview, max_payload: int = DEFAULT_MAX_PAYLOAD) -> int:
    """Validate just the header; return the payload length so a stream reader can size its
    next read.  Everything that can be checked without the payload is checked here, so a
    hostile length is refused before a single payload byte is buffered."""
    return check_header(buf, max_payload)[16]


def check_header(buf: bytes | bytearray | memoryview, max_payload: int = DEFAULT_MAX_PAYLOAD) -> tuple:
    """peek_header's work, returning the unpacked header fields (payload length at index 16)
    for decode_parts(..., fields=...), so stream readers unpack each header once."""
    if len(buf) < HEADER_SIZE:
        raise FrameError(f"short header: {len(buf)} < {HEADER_SIZE}")
    fields = HEADER.unpack_from(buf, 0)
    (magic, version, mtype, flags, _rid, _step, _npos, lstart, lend, dtype, ndim, rsv,
     s0, s1, rsv3, _seq, plen, _digest, _compute_us, rsv2) = fields
    if magic != MAGIC:
        raise FrameError("bad magic")
    if version != PROTOCOL_VERSION:
        raise FrameError(f"unsupported protocol version {version}")
    if mtype not in MsgType._value2member_map_:
        raise FrameError(f"unknown message type {mtype}")
    if flags & ~KNOWN_FLAGS:
        raise FrameError(f"unknown flags {flags:#x}")
    if dtype not in DType._value2member_map_:
        raise FrameError(f"unknown dtype {dtype}")
    if ndim > MAX_NDIM:
        raise FrameError(f"ndim {ndim} > {MAX_NDIM}")
    if rsv != 0 or rsv2 != 0 or rsv3 != 0:
        raise FrameError("reserved bits set")
    if lstart > lend:
        raise FrameError(f"layer range [{lstart}, {lend}) is inverted")
    if plen > max_payload:
        raise FrameError(f"payload length {plen} > max {max_payload}")
    if ndim == 2:
        elems = s0 * s1
    elif s1:
        raise FrameError("unused shape dims must be 0")
    elif ndim == 1:
        elems = s0
    elif s0:
        raise FrameError("unused shape dims must be 0")
    else:
        elems = 0
    if elems * _ITEMSIZE_BY_VALUE[dtype] != plen:
        raise FrameError(f"shape {(s0, s1)[:ndim]} x {DType(dtype).name} != payload length {plen}")
    return fields


def decode(buf: bytes | bytearray | memoryview, max_payload: int = DEFAULT_MAX_PAYLOAD) -> Frame:
    """Parse one complete frame (header + exactly payload_len bytes) or raise FrameError."""
    plen = peek_header(buf, max_payload)
    if len(buf) != HEADER_SIZE + plen:
        raise FrameError(f"frame length {len(buf)} != header {HEADER_SIZE} + payload {plen}")
    mv = memoryview(buf)
    return decode_parts(mv[:HEADER_SIZE], bytes(mv[HEADER_SIZE:]) if plen else b"", max_payload)


def decode_parts(header: bytes | bytearray | memoryview, payload: bytes | bytearray,
                 max_payload: int = DEFAULT_MAX_PAYLOAD, fields: tuple | None = None) -> Frame:
    """Parse a frame already split into header and payload (stream readers).  A bytearray
    payload is kept as is (no copy): the frame then owns that buffer.  `fields` is
    check_header()'s result for this header when the caller already has it."""
    if fields is None:
        fields = check_header(header, max_payload)
    (_m, _v, mtype, flags, rid, step, npos, lstart, lend, dtype, ndim, _r,
     s0, s1, _r3, seq, plen, digest, compute_us, _r2) = fields
    if len(header) != HEADER_SIZE or len(payload) != plen:
        raise FrameError(f"payload length {len(payload)} != declared {plen}")
    if not isinstance(payload, (bytes, bytearray)):
        payload = bytes(payload)
    if flags & _HASHED:
        if payload_hash(payload) != digest:
            raise FrameError("payload hash mismatch")
    else:
        if digest != _ZERO16:
            raise FrameError("payload hash set without HASHED flag")
        digest = b""
    return Frame(type=_MSG_BY_VALUE[mtype], request_id=rid, step=step, n_positions=npos,
                 layer_start=lstart, layer_end=lend, dtype=_DTYPE_BY_VALUE[dtype], shape=(s0, s1)[:ndim],
                 seq=seq, flags=flags, compute_us=compute_us, payload=payload,
                 payload_hash=digest)


# Fragmentation lives in its own module; re-exported so callers need one import.
from .fragments import FRAGMENT_HEADER_SIZE, Reassembler, fragment  # noqa: E402

__all__ = ["MAGIC", "PROTOCOL_VERSION", "HEADER_SIZE", "DEFAULT_MAX_PAYLOAD", "FrameError",
           "MsgType", "Flag", "DType", "Frame", "encode", "encode_parts", "decode", "decode_parts",
           "peek_header", "payload_hash", "fragment", "Reassembler", "FRAGMENT_HEADER_SIZE"]
