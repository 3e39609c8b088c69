"""What an agent advertises about itself, and the compact TXT codec for it.

Why a hand-written codec: the record arrives from anyone on the LAN, so it is parsed as
untrusted bytes with every size checked before use, and any defect raises one error type
(`CapabilityDecodeError`, a ValueError) that callers can catch without guessing.

Wire form: a DNS TXT rdata (RFC 6763 section 6), i.e. length-prefixed ``key=value``
strings, all ASCII, in this fixed order::

    v  id  sw  r  sp  tp  m  us  b  sh  [unknown keys]  [mac]  sig

``sig`` is the agent's Ed25519 signature over ``SIGN_DOMAIN`` + the canonical TXT
encoding of every entry before ``mac``/``sig``; ``mac`` (private swarms only) is the swarm
key's HMAC over the same bytes, so a LAN host without the swarm secret cannot inject a
record into a private swarm. Unknown keys (from newer versions) are kept, signed and
re-encoded verbatim so forward-compatible records still verify.
"""

from __future__ import annotations

import base64
import hmac
import math
import re
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Iterable

from edge_agent.discovery.identity import verify as ed25519_verify

PROTOCOL_VERSION = 1
SIGN_DOMAIN = b"edge-agent capabilities v1\x00"
MAX_RECORD_BYTES = 400  # what we emit: one small mDNS packet with room to spare
MAX_DECODE_BYTES = 512  # what we accept: a little slack for newer versions' extra keys
MAX_ENTRIES = 24
MAX_SHARDS = 8
MAX_LAYER = 9999
MAX_FREE_MEM_MB = 99_999_999
MAX_US_PER_LAYER = 10_000_000  # 10 s per layer per token: anything slower is nonsense
MAC_BYTES = 16
ARITH_KEY = "ar"  # extra entry: the settings that change arithmetic (backend/n_ubatch/flash_attn/kv_type)
# extra entry: the node's compute class (runtime.compute_class: what decides its rounding),
# ``<8 hex>:<readable>``; it picks the audit tolerance tier (ledger.audit). Optional: a record
# without it (an older node) is of an unknown class; a malformed one is refused.
COMPUTE_KEY = "cc"
# extra entry: the step features the node serves, a bit set in lowercase hex (``fx=1``): short,
# and a newer feature is a new bit. A record without it (a node older than the entry) serves
# none: it refuses the step flags they need. Bits this version does not know are kept (signed).
FEATURES_KEY = "fx"
FEATURE_SPECULATION = 1 << 0  # REWIND and DRAFT steps (split.speculation)
FEATURE_NAMES = {FEATURE_SPECULATION: "spec"}
SERVED_FEATURES = FEATURE_SPECULATION  # what every node of this release serves
ROLES = ("peer", "client")

_HEX64 = re.compile(r"[0-9a-f]{64}\Z")
_TAG = re.compile(r"(?:[0-9a-f]{16}|open)\Z")
_MODEL = re.compile(r"[0-9a-f]{8,16}\Z")
_BACKEND = re.compile(r"[a-z0-9][a-z0-9_.-]{0,15}\Z")
_KEY = re.compile(r"[a-z][a-z0-9]{0,7}\Z")
_UINT = re.compile(r"(?:0|[1-9][0-9]{0,9})\Z")
_B64 = re.compile(r"[A-Za-z0-9_-]+\Z")
_EXTRA_VALUE = re.compile(r"[\x20-\x7e]{0,200}\Z")
_COMPUTE_CLASS = re.compile(r"[0-9a-f]{8}:[a-z0-9.-]{0,40}\Z")
_FEATURES = re.compile(r"(?:0|[1-9a-f][0-9a-f]{0,3})\Z")  # 16 bits at most, one spelling per set
_KNOWN = ("v", "id", "sw", "r", "sp", "tp", "m", "us", "b", "sh")
_TRAILER = ("mac", "sig")

Shard = tuple[str, int, int]  # (model hash prefix, first layer, end layer exclusive)


class CapabilityDecodeError(ValueError):
    """A TXT record that is not a well-formed edge-agent capability record."""


@dataclass(frozen=True)
class Capabilities:
    """One agent's self-description; immutable so a signed record cannot drift."""

    agent_id: str
    swarm_tag: str = "open"
    signal_port: int = 0
    tls_port: int = 0
    role: str = "peer"
    shards: tuple[Shard, ...] = ()
    free_mem_mb: int = 0
    ms_per_layer: float = 0.0
    backend: str = "llamacpp"
    version: int = PROTOCOL_VERSION
    extra: tuple[tuple[str, str], ...] = ()
    mac: bytes = b""
    signature: bytes = field(default=b"", repr=False)

    def __post_init__(self) -> None:
        # Validation lives here so a record built in code obeys the same rules as a
        # decoded one; errors are ValueError (the decoder re-raises them as its own).
        if not isinstance(self.agent_id, str) or not _HEX64.match(self.agent_id):
            raise ValueError("agent_id must be 64 lowercase hex chars")
        if not isinstance(self.swarm_tag, str) or not _TAG.match(self.swarm_tag):
            raise ValueError("swarm_tag must be 16 lowercase hex chars or 'open'")
        for name in ("signal_port", "tls_port"):
            _check_int(name, getattr(self, name), 0, 65535)
        if self.role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}")
        shards = tuple(tuple(s) for s in self.shards)
        if len(shards) > MAX_SHARDS:
            raise ValueError(f"at most {MAX_SHARDS} shards")
        for s in shards:
            if len(s) != 3 or not isinstance(s[0], str) or not _MODEL.match(s[0]):
                raise ValueError("shard model hash prefix must be 8-16 lowercase hex chars")
            _check_int("shard start", s[1], 0, MAX_LAYER - 1)
            _check_int("shard end", s[2], s[1] + 1, MAX_LAYER)
        object.__setattr__(self, "shards", shards)
        _check_int("free_mem_mb", self.free_mem_mb, 0, MAX_FREE_MEM_MB)
        ms = self.ms_per_layer
        if isinstance(ms, bool) or not isinstance(ms, (int, float)) or not math.isfinite(ms):
            raise ValueError("ms_per_layer must be a finite number")
        us = round(ms * 1000)
        if not 0 <= us <= MAX_US_PER_LAYER:
            raise ValueError("ms_per_layer out of range")
        object.__setattr__(self, "ms_per_layer", us / 1000)  # wire precision: 1 us
        if not isinstance(self.backend, str) or not _BACKEND.match(self.backend):
            raise ValueError("backend must match [a-z0-9][a-z0-9_.-]{0,15}")
        _check_int("version", self.version, 1, 65535)
        extra = tuple((str(k), str(v)) for k, v in self.extra)
        for k, v in extra:
            if not _KEY.match(k) or k in _KNOWN or k in _TRAILER or not _EXTRA_VALUE.match(v):
                raise ValueError(f"bad extra entry {k!r}")
        if len({k for k, _ in extra}) != len(extra):
            raise ValueError("duplicate extra key")
        cc = dict(extra).get(COMPUTE_KEY)
        if cc is not None and not _COMPUTE_CLASS.match(cc):
            raise ValueError(f"{COMPUTE_KEY} must be <8 hex>:<at most 40 of [a-z0-9.-]>")
        fx = dict(extra).get(FEATURES_KEY)
        if fx is not None and not _FEATURES.match(fx):
            raise ValueError(f"{FEATURES_KEY} must be 1-4 lowercase hex digits without leading zeros")
        object.__setattr__(self, "extra", extra)
        if len(self.mac) not in (0, MAC_BYTES):
            raise ValueError(f"mac must be empty or {MAC_BYTES} bytes")
        if len(self.signature) not in (0, 64):
            raise ValueError("signature must be empty or 64 bytes")

    # -- signing ---------------------------------------------------------------------
    def signing_bytes(self) -> bytes:
        """The exact bytes the signature and the swarm MAC cover."""
        return SIGN_DOMAIN + _pack(self._body_entries())

    def sealed(self, identity: Any, swarm_key: Any) -> "Capabilities":
        """A copy stamped with `identity`'s id, `swarm_key`'s tag, MAC and signature."""
        body = replace(self, agent_id=identity.agent_id, swarm_tag=swarm_key.tag(),
                       mac=b"", signature=b"")
        msg = body.signing_bytes()
        mac = b"" if swarm_key.is_open else swarm_key.prove(msg)[:MAC_BYTES]
        return replace(body, mac=mac, signature=identity.sign(msg))

    def verify(self, swarm_key: Any) -> bool:
        """True iff the record belongs to `swarm_key`'s swarm and its signature holds."""
        if self.swarm_tag != swarm_key.tag() or len(self.signature) != 64:
            return False
        msg = self.signing_bytes()
        if swarm_key.is_open:
            if self.mac:
                return False
        elif len(self.mac) != MAC_BYTES or not hmac.compare_digest(
                swarm_key.prove(msg)[:MAC_BYTES], self.mac):
            return False
        return ed25519_verify(bytes.fromhex(self.agent_id), msg, self.signature)

    @property
    def arithmetic(self) -> str | None:
        """The node's arithmetic settings as it advertises them (``runtime.engine.Arithmetic.to_text``)."""
        return dict(self.extra).get(ARITH_KEY)

    @property
    def compute_class(self) -> str | None:
        """The node's compute class as it advertises it (``runtime.compute_class.ComputeClass.to_text``), or None."""
        return dict(self.extra).get(COMPUTE_KEY)

    @property
    def features(self) -> int:
        """The step features the node advertises (``FEATURE_*`` bits); 0 for a record without them."""
        return int(dict(self.extra).get(FEATURES_KEY, "0"), 16)

    def has_feature(self, feature: int) -> bool:
        """True when the node advertises every bit of ``feature``."""
        return self.features & feature == feature

    def with_changes(self, **changes: Any) -> "Capabilities":
        """A copy with fields changed and the seal dropped (re-seal before advertising)."""
        return replace(self, mac=b"", signature=b"", **changes)

    # -- codec -----------------------------------------------------------------------
    def _body_entries(self) -> list[tuple[str, str]]:
        sh = ",".join(f"{m}:{a}-{b}" for m, a, b in self.shards)
        return [("v", str(self.version)), ("id", self.agent_id), ("sw", self.swarm_tag),
                ("r", self.role), ("sp", str(self.signal_port)), ("tp", str(self.tls_port)),
                ("m", str(self.free_mem_mb)), ("us", str(round(self.ms_per_layer * 1000))),
                ("b", self.backend), ("sh", sh), *self.extra]

    def to_txt(self) -> bytes:
        """The TXT rdata to publish; the record must be sealed first."""
        if len(self.signature) != 64:
            raise ValueError("capabilities must be sealed (signed) before encoding")
        entries = self._body_entries()
        if self.mac:
            entries.append(("mac", _b64e(self.mac)))
        entries.append(("sig", _b64e(self.signature)))
        data = _pack(entries)
        if len(data) > MAX_RECORD_BYTES:
            raise ValueError(f"record is {len(data)} bytes, over {MAX_RECORD_BYTES}: fewer shards")
        return data

    @classmethod
    def from_txt(cls, data: bytes) -> "Capabilities":
        """Parse untrusted TXT rdata. Raises CapabilityDecodeError and nothing else."""
        return decode_txt(data)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form for `edge-agent peers --json` and the dashboard."""
        d = asdict(self)
        d["shards"] = [{"model": m, "start": a, "end": b} for m, a, b in self.shards]
        d["extra"] = dict(self.extra)
        d["features"] = [name for bit, name in FEATURE_NAMES.items() if self.has_feature(bit)]
        d["mac"] = self.mac.hex()
        d["signature"] = self.signature.hex()
        return d


def features_entry(features: int = SERVED_FEATURES) -> tuple[str, str]:
    """The extra entry that advertises ``features`` (``FEATURE_*`` bits)."""
    return FEATURES_KEY, format(features, "x")


def decode_txt(data: bytes) -> Capabilities:
    """Bounded parser for TXT rdata; every failure is a CapabilityDecodeError."""
    try:
        return _decode(data)
    except CapabilityDecodeError:
        raise
    except (ValueError, TypeError, UnicodeError, IndexError) as exc:
        raise CapabilityDecodeError(f"invalid capability record: {exc}") from None


def _decode(data: bytes) -> Capabilities:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise CapabilityDecodeError("record must be bytes")
    data = bytes(data)
    if len(data) > MAX_DECODE_BYTES:
        raise CapabilityDecodeError(f"record is {len(data)} bytes, limit {MAX_DECODE_BYTES}")
    fields: dict[str, str] = {}
    order: list[str] = []
    pos = 0
    while pos < len(data):
        if len(order) >= MAX_ENTRIES:
            raise CapabilityDecodeError(f"more than {MAX_ENTRIES} entries")
        n = data[pos]
        pos += 1
        if n == 0 or pos + n > len(data):
            raise CapabilityDecodeError(f"entry length {n} at offset {pos - 1} is empty or overruns")
        raw = data[pos:pos + n]
        pos += n
        if any(c < 0x20 or c > 0x7E for c in raw):
            raise CapabilityDecodeError("entry contains non-printable or non-ASCII bytes")
        key, sep, value = raw.decode("ascii").partition("=")
        if not sep or not _KEY.match(key):
            raise CapabilityDecodeError(f"malformed entry key {key[:12]!r}")
        if key in fields:
            raise CapabilityDecodeError(f"duplicate key {key!r}")
        fields[key] = value
        order.append(key)
    missing = [k for k in (*_KNOWN, "sig") if k not in fields]
    if missing:
        raise CapabilityDecodeError(f"missing keys {missing}")
    if order[-1] != "sig" or ("mac" in fields and order[-2] != "mac"):
        raise CapabilityDecodeError("'mac' and 'sig' must be the last entries")
    extra = tuple((k, fields[k]) for k in order if k not in _KNOWN and k not in _TRAILER)
    return Capabilities(
        agent_id=fields["id"], swarm_tag=fields["sw"], role=fields["r"],
        signal_port=_uint(fields, "sp"), tls_port=_uint(fields, "tp"),
        shards=_shards(fields["sh"]), free_mem_mb=_uint(fields, "m"),
        ms_per_layer=_uint(fields, "us") / 1000, backend=fields["b"],
        version=_uint(fields, "v"), extra=extra,
        mac=_b64d(fields["mac"], MAC_BYTES) if "mac" in fields else b"",
        signature=_b64d(fields["sig"], 64))


def _shards(text: str) -> tuple[Shard, ...]:
    if not text:
        return ()
    parts = text.split(",", MAX_SHARDS)
    if len(parts) > MAX_SHARDS:
        raise CapabilityDecodeError(f"more than {MAX_SHARDS} shards")
    out = []
    for p in parts:
        model, sep, span = p.partition(":")
        a, sep2, b = span.partition("-")
        if not (sep and sep2 and _UINT.match(a) and _UINT.match(b)):
            raise CapabilityDecodeError(f"malformed shard {p[:24]!r}")
        out.append((model, int(a), int(b)))
    return tuple(out)


def _uint(fields: dict[str, str], key: str) -> int:
    text = fields[key]
    if not _UINT.match(text):
        raise CapabilityDecodeError(f"{key!r} is not a small unsigned integer")
    return int(text)


def _pack(entries: Iterable[tuple[str, str]]) -> bytes:
    out = bytearray()
    for k, v in entries:
        item = f"{k}={v}".encode("ascii")
        if len(item) > 255:
            raise ValueError(f"TXT entry {k!r} is over 255 bytes")
        out.append(len(item))
        out += item
    return bytes(out)


def _b64e(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _b64d(text: str, size: int) -> bytes:
    if len(text) != (size * 4 + 2) // 3 or not _B64.match(text):
        raise CapabilityDecodeError(f"expected {size} bytes of unpadded base64url")
    raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    if len(raw) != size or _b64e(raw) != text:  # reject non-canonical trailing bits
        raise CapabilityDecodeError("non-canonical base64url")
    return raw


def _check_int(name: str, value: Any, lo: int, hi: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ValueError(f"{name} must be an integer in [{lo}, {hi}]")

