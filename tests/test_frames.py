"""Frame codec and fragmentation: round trips, every refusal, and fuzzing."""

from __future__ import annotations

import struct
import tracemalloc

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_agent.transport.frames import (DEFAULT_MAX_PAYLOAD, FRAGMENT_HEADER_SIZE, HEADER, HEADER_SIZE, DType,
                                         Flag, Frame, FrameError, MsgType, Reassembler, decode, decode_parts, encode,
                                         fragment, peek_header)

RID = bytes(range(16))


def act(n: int = 1, hidden: int = 576, dtype=np.float16, **kw) -> Frame:
    arr = (np.arange(n * hidden) % 251).astype(dtype).reshape(n, hidden)
    return Frame.from_array(MsgType.ACTIVATION, arr, request_id=RID, step=7, n_positions=n, layer_start=3,
                            layer_end=9, seq=42, **kw)


# ---- codec ----------------------------------------------------------------------------------
def test_header_is_96_bytes_and_layout_documented():
    assert HEADER_SIZE == 96
    f = act()
    buf = encode(f)
    assert buf[:4] == b"EAF\x01" and buf[4] == 1 and buf[5] == MsgType.ACTIVATION
    assert buf[8:24] == RID
    assert struct.unpack_from("<Q", buf, 64)[0] == 1152  # payload_len
    assert len(buf) == 96 + 1152


@pytest.mark.parametrize("dtype,np_dtype", [(DType.F32, np.float32), (DType.F16, np.float16), (DType.I32, np.int32)])
def test_round_trip_array(dtype, np_dtype):
    f = act(3, 64, np_dtype)
    assert f.dtype == dtype
    g = decode(encode(f))
    assert g == f
    np.testing.assert_array_equal(g.array(), f.array())
    assert g.array().shape == (3, 64) and g.array().dtype == np_dtype


def test_round_trip_every_type_and_bytes():
    for t in MsgType:
        f = Frame.from_bytes(t, b"why" if t == MsgType.ERROR else b"", request_id=RID, seq=1)
        assert decode(encode(f)) == f
    one_d = Frame.from_array(MsgType.ACTIVATION, np.array([1, 2, 3], np.int32))
    assert decode(encode(one_d)).array().tolist() == [1, 2, 3]


def test_hashed_frames_verify():
    f = act().hashed()
    assert f.flags & Flag.HASHED and len(f.payload_hash) == 16
    g = decode(encode(f))
    assert g.payload_hash == f.payload_hash
    buf = bytearray(encode(f))
    buf[-1] ^= 0xFF
    with pytest.raises(FrameError, match="hash mismatch"):
        decode(bytes(buf))


def test_decode_parts_keeps_bytearray_payload():
    f = act()
    buf = encode(f)
    g = decode_parts(buf[:HEADER_SIZE], bytearray(buf[HEADER_SIZE:]))
    assert g == f and isinstance(g.payload, bytearray)


def _patch(buf: bytes, fmt: str, off: int, value) -> bytes:
    b = bytearray(buf)
    struct.pack_into(fmt, b, off, value)
    return bytes(b)


@pytest.mark.parametrize("fmt,off,value,reason", [
    ("<4s", 0, b"XXXX", "bad magic"),
    ("<B", 4, 2, "unsupported protocol version"),
    ("<B", 5, 200, "unknown message type"),
    ("<H", 6, 0x8000, "unknown flags"),
    ("<H", 32, 10, "inverted"),
    ("<B", 36, 9, "unknown dtype"),
    ("<B", 37, 3, "ndim"),
    ("<H", 38, 1, "reserved"),
    ("<I", 40, 2, "payload length"),
    ("<Q", 64, 1151, "payload length"),
    ("<Q", 64, 2**63, "max"),
    ("<16s", 72, b"x" * 16, "without HASHED"),
    ("<8s", 88, b"\x01" * 8, "reserved"),
    ("<Q", 48, 1, "reserved"),  # once deadline_ms, now reserved
    ("<B", 5, 2, "unknown message type"),  # retired TOKENS
    ("<H", 6, 1 << 2, "unknown flags"),  # retired LAST
])
def test_decode_refusals(fmt, off, value, reason):
    with pytest.raises(FrameError, match=reason):
        decode(_patch(encode(act()), fmt, off, value))


def test_truncated_and_extended():
    buf = encode(act())
    for cut in (0, 1, 50, 95, 96, len(buf) - 1):
        with pytest.raises(FrameError):
            decode(buf[:cut])
    with pytest.raises(FrameError):
        decode(buf + b"\x00")


def test_huge_declared_length_refused_before_allocation():
    """A header declaring 4 GiB x 4 GiB elements must be refused without allocating."""
    hdr = HEADER.pack(b"EAF\x01", 1, MsgType.ACTIVATION, 0, RID, 0, 1, 0, 1, DType.F32, 2, 0,
                      0xFFFFFFFF, 0xFFFFFFFF, 0, 0, 0xFFFFFFFF_FFFFFFFF, b"\x00" * 16, 0, 0)
    tracemalloc.start()
    try:
        with pytest.raises(FrameError):
            peek_header(hdr)
        with pytest.raises(FrameError):
            decode(hdr)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


def test_max_payload_is_configurable():
    f = act(4, 576)
    with pytest.raises(FrameError):
        encode(f, max_payload=1000)
    buf = encode(f)
    with pytest.raises(FrameError, match="max"):
        decode(buf, max_payload=1000)
    assert DEFAULT_MAX_PAYLOAD == 64 << 20


def test_encode_refuses_inconsistent_frames():
    with pytest.raises(FrameError):
        encode(Frame(MsgType.ACTIVATION, dtype=DType.F16, shape=(2, 3), payload=b"\x00" * 11))
    with pytest.raises(FrameError):
        encode(Frame(MsgType.ACTIVATION, request_id=b"short"))
    with pytest.raises(FrameError):
        encode(Frame(MsgType.ACTIVATION, layer_start=5, layer_end=2))
    with pytest.raises(FrameError):
        encode(Frame(MsgType.ACTIVATION, seq=-1))
    with pytest.raises(FrameError):
        Frame.from_array(MsgType.ACTIVATION, np.zeros((2, 2, 2), np.float32))
    with pytest.raises(FrameError):
        Frame.from_array(MsgType.ACTIVATION, np.zeros(3, np.float64))


# ---- fragmentation ----------------------------------------------------------------------------
def test_fragment_round_trip_sizes():
    for size in (0, 1, 100, 65536, 1 << 20, (8 << 20) + 13):
        data = np.random.default_rng(size).bytes(size)
        frags = fragment(data, 65536, msg_id=0)
        assert all(len(f) <= 65536 for f in frags)
        r = Reassembler(16 << 20)
        out = [r.feed(f) for f in frags]
        assert out[-1] == data and all(o is None for o in out[:-1])


def test_reassembler_many_messages_in_order():
    r = Reassembler(1 << 20)
    for i in range(50):
        data = bytes([i]) * (i * 97)
        frags = fragment(data, 200, msg_id=i)
        res = [r.feed(f) for f in frags]
        assert res[-1] == data


def test_reassembler_refusals():
    data = b"x" * 1000
    frags = fragment(data, 114, msg_id=0)  # 100-byte bodies -> 10 fragments
    with pytest.raises(FrameError, match="without its first"):
        Reassembler(4096).feed(frags[1])
    r = Reassembler(4096)
    r.feed(frags[0])
    with pytest.raises(FrameError, match="out of order"):
        r.feed(frags[2])
    with pytest.raises(FrameError, match="already failed"):  # a failed stream stays failed
        r.feed(frags[1])
    with pytest.raises(FrameError, match="> max"):
        Reassembler(999).feed(frags[0])
    r = Reassembler(4096)
    r.feed(frags[0])
    with pytest.raises(FrameError, match="started before"):
        r.feed(fragment(b"y" * 300, 114, msg_id=0)[0])
    with pytest.raises(FrameError, match="out of order"):
        Reassembler(4096).feed(fragment(b"z", 100, msg_id=5)[0])
    with pytest.raises(FrameError, match="fragment of"):
        Reassembler(4096, max_fragment=100).feed(frags[0])
    with pytest.raises(FrameError, match="short"):
        Reassembler(4096).feed(b"EG")
    # A liar: declares 1000 bytes, then ends early.
    r = Reassembler(4096)
    last = bytearray(frags[-1])
    r.feed(frags[0])
    struct.pack_into("<I", last, 8, 1)  # index 1 instead of 9
    with pytest.raises(FrameError, match="ended at"):
        r.feed(bytes(last))


def test_reassembler_memory_is_bounded_by_declared_total():
    r = Reassembler(1000)
    frags = fragment(b"a" * 900, 214)
    for f in frags[:-1]:
        r.feed(f)
        assert r.buffered <= 1000
    assert r.feed(frags[-1]) == b"a" * 900


# ---- fuzzing ------------------------------------------------------------------------------------
FUZZ = settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
VALID = [encode(act()), encode(act(2, 8, np.float32).hashed()), encode(Frame(MsgType.HEARTBEAT)),
         encode(Frame.from_bytes(MsgType.ERROR, b"boom")), encode(act(1, 4, np.int32))]


def _decode_or_frameerror(buf: bytes) -> None:
    try:
        f = decode(buf, max_payload=1 << 16)
    except FrameError as exc:
        assert exc.reason
        return
    assert encode(f) == bytes(buf)  # anything accepted is canonical


@FUZZ
@given(st.binary(max_size=400))
def test_fuzz_random_bytes(data):
    _decode_or_frameerror(data)


@FUZZ
@given(st.binary(min_size=96, max_size=96), st.binary(max_size=300))
def test_fuzz_random_headers_with_magic(header, tail):
    buf = b"EAF\x01\x01" + header[5:] + tail
    _decode_or_frameerror(buf)


@FUZZ
@given(st.sampled_from(VALID), st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=8),
       st.integers(-50, 50))
def test_fuzz_mutated_frames(buf, flips, resize):
    b = bytearray(buf)
    for pos, val in flips:
        b[pos % len(b)] = val
    if resize < 0:
        del b[resize:]
    else:
        b += bytes(resize)
    _decode_or_frameerror(bytes(b))


@FUZZ
@given(st.lists(st.binary(max_size=200), max_size=20))
def test_fuzz_reassembler_random(frags):
    r = Reassembler(4096, max_fragment=256)
    for f in frags:
        try:
            r.feed(b"EG\x01" + f if f[:1] == b"\x00" else f)
        except FrameError:
            return
        assert r.buffered <= 4096


@FUZZ
@given(st.binary(max_size=3000), st.integers(FRAGMENT_HEADER_SIZE + 1, 600),
       st.lists(st.tuples(st.integers(0, 100), st.integers(0, 10_000), st.integers(0, 255)), max_size=4))
def test_fuzz_reassembler_mutated(data, size, muts):
    frags = [bytearray(f) for f in fragment(data, size)]
    for which, pos, val in muts:
        f = frags[which % len(frags)]
        f[pos % len(f)] = val
    r = Reassembler(3000)
    out = None
    try:
        for f in frags:
            out = r.feed(bytes(f))
            assert r.buffered <= 3000
    except FrameError:
        return
    if not muts:
        assert out == data


def test_fuzz_memory_stays_bounded():
    """Thousands of hostile headers declaring huge payloads: peak memory stays small."""
    rng = np.random.default_rng(0)
    tracemalloc.start()
    try:
        for _ in range(3000):
            hdr = bytearray(rng.bytes(96))
            hdr[:5] = b"EAF\x01\x01"
            struct.pack_into("<Q", hdr, 64, int(rng.integers(0, 2**63)))
            with pytest.raises(FrameError):
                decode(bytes(hdr))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2 << 20
