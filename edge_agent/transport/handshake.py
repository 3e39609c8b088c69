"""Mutual authentication after the secure channel is up: identity + swarm membership.

Why an app-level step: TLS/DTLS certificates here are ephemeral and self-signed, so they
prove nothing about *who* the peer is.  Each side signs, with its long-term Ed25519 key, a
transcript that includes the channel binding (the hash of the TLS server certificate, or of
both WebRTC SDPs, which carry the DTLS fingerprints).  A man in the middle terminates the
secure channel with its own certificate, so the binding the victim sees differs from the
one the honest peer signed, and the signature check fails.  The swarm key adds an HMAC over
the same transcript, so an outsider without the key is refused even with a valid identity.

HELLO payload (struct "<4sH32s32s8s", 78 bytes):
  magic b"EAHS" | handshake version u16 | Ed25519 public key | 32-byte random nonce |
  swarm tag (8 bytes; zeros for the open swarm)
AUTH payload: 64-byte Ed25519 signature | proof length u8 | proof (0 or 32 bytes)
Order over a stream (TLS): HELLO both ways; client AUTH; server AUTH (sent only after the
client's checked out); client CONFIRM (b"EAOK").  All are HELLO-type frames.
Transcript: b"edge-agent handshake v1\\0" | kind | b"\\0" | binding | len-prefixed client
HELLO | len-prefixed server HELLO, then one role byte (b"C" or b"S") for the signer.
"""

from __future__ import annotations

import asyncio
import os
import struct
from dataclasses import dataclass
from typing import Awaitable, Callable

from ..discovery.identity import Identity, SwarmKey, verify
from .errors import FrameError, HandshakeError
from .frames import Frame, MsgType

HANDSHAKE_VERSION = 1
HELLO = struct.Struct("<4sH32s32s8s")
HELLO_MAGIC = b"EAHS"
SIG_SIZE = 64
CONTEXT = b"edge-agent handshake v1\x00"
DEFAULT_HANDSHAKE_TIMEOUT = 10.0
CONFIRM = b"EAOK"


@dataclass(frozen=True)
class Hello:
    raw: bytes
    version: int
    public_key: bytes
    nonce: bytes
    swarm_tag: bytes

    @property
    def agent_id(self) -> str:
        return self.public_key.hex()


def swarm_tag_bytes(swarm: SwarmKey) -> bytes:
    return b"\x00" * 8 if swarm.is_open else bytes.fromhex(swarm.tag())


def make_hello(identity: Identity, swarm: SwarmKey, nonce: bytes | None = None,
               version: int = HANDSHAKE_VERSION) -> bytes:
    return HELLO.pack(HELLO_MAGIC, version, identity.public_key, nonce or os.urandom(32), swarm_tag_bytes(swarm))


def parse_hello(raw: bytes, swarm: SwarmKey, own: Identity | None = None,
                expect_peer_id: str | None = None) -> Hello:
    """Check a peer's HELLO against our version, swarm and expectations."""
    if len(raw) != HELLO.size:
        raise HandshakeError(f"malformed HELLO ({len(raw)} bytes)")
    magic, version, pub, nonce, tag = HELLO.unpack(raw)
    if magic != HELLO_MAGIC:
        raise HandshakeError("malformed HELLO (magic)")
    if version != HANDSHAKE_VERSION:
        raise HandshakeError(f"protocol version mismatch: peer speaks {version}, we speak {HANDSHAKE_VERSION}")
    if tag != swarm_tag_bytes(swarm):
        raise HandshakeError("swarm mismatch: peer is not in our swarm (wrong or missing swarm key)")
    hello = Hello(bytes(raw), version, pub, nonce, tag)
    if own is not None and pub == own.public_key:
        raise HandshakeError("peer presented our own identity")
    if expect_peer_id is not None and hello.agent_id != expect_peer_id.lower():
        raise HandshakeError(f"unexpected peer {hello.agent_id[:16]}..., wanted {expect_peer_id[:16]}...")
    return hello


def transcript(kind: str, binding: bytes, client_hello: bytes, server_hello: bytes) -> bytes:
    def lp(b: bytes) -> bytes:
        return struct.pack("<I", len(b)) + b
    return CONTEXT + kind.encode() + b"\x00" + lp(binding) + lp(client_hello) + lp(server_hello)


def make_auth(identity: Identity, swarm: SwarmKey, base: bytes, role: bytes) -> bytes:
    """Our signature and swarm proof over the transcript, for `role` b"C" or b"S"."""
    msg = base + role
    proof = swarm.prove(msg)
    return identity.sign(msg) + bytes([len(proof)]) + proof


def check_auth(peer: Hello, swarm: SwarmKey, base: bytes, peer_role: bytes, auth: bytes) -> None:
    """Verify the peer's AUTH; HandshakeError names what failed (swarm proof or identity)."""
    if len(auth) < SIG_SIZE + 1 or len(auth) != SIG_SIZE + 1 + auth[SIG_SIZE]:
        raise HandshakeError("malformed AUTH")
    msg = base + peer_role
    sig, proof = auth[:SIG_SIZE], auth[SIG_SIZE + 1:]
    if not swarm.check(msg, proof):
        raise HandshakeError("bad swarm proof (wrong or missing swarm key)")
    if not verify(peer.public_key, msg, sig):
        raise HandshakeError("bad identity signature (forged identity or man in the middle)")


SendFn = Callable[[Frame], Awaitable[None]]
RecvFn = Callable[[], Awaitable[Frame]]


async def _recv_hs(recv: RecvFn) -> bytes:
    try:
        frame = await recv()
    except FrameError as exc:
        raise HandshakeError(f"bad handshake frame: {exc.reason}") from None
    except (asyncio.IncompleteReadError, ConnectionError, EOFError) as exc:
        raise HandshakeError(f"peer closed during handshake ({type(exc).__name__})") from None
    if frame.type == MsgType.ERROR:
        raise HandshakeError("peer refused: " + bytes(frame.payload[:200]).decode("utf-8", "replace"))
    if frame.type != MsgType.HELLO:
        raise HandshakeError(f"unexpected {frame.type.name} frame during handshake")
    return bytes(frame.payload)


async def run_handshake(send: SendFn, recv: RecvFn, identity: Identity, swarm: SwarmKey, *, kind: str,
                        binding: bytes, is_client: bool, expect_peer_id: str | None = None,
                        version: int = HANDSHAKE_VERSION) -> Hello:
    """HELLO both ways, then client AUTH, server AUTH (only after checking the client's), client
    CONFIRM: each side learns whether the other accepted it.  Returns the peer's verified
    HELLO.  On failure tells the peer why (one ERROR frame) and raises HandshakeError."""
    mine = make_hello(identity, swarm, version=version)
    try:
        await send(Frame.from_bytes(MsgType.HELLO, mine))
        peer = parse_hello(await _recv_hs(recv), swarm, identity, expect_peer_id)
        ch, sh = (mine, peer.raw) if is_client else (peer.raw, mine)
        base = transcript(kind, binding, ch, sh)
        if is_client:  # the client proves first; the server answers only a verified client
            await send(Frame.from_bytes(MsgType.HELLO, make_auth(identity, swarm, base, b"C")))
            check_auth(peer, swarm, base, b"S", await _recv_hs(recv))
            await send(Frame.from_bytes(MsgType.HELLO, CONFIRM))
        else:
            check_auth(peer, swarm, base, b"C", await _recv_hs(recv))
            await send(Frame.from_bytes(MsgType.HELLO, make_auth(identity, swarm, base, b"S")))
            if await _recv_hs(recv) != CONFIRM:
                raise HandshakeError("malformed confirmation")
        return peer
    except HandshakeError as exc:
        if not exc.reason.startswith("peer "):
            try:
                await asyncio.wait_for(send(Frame.from_bytes(MsgType.ERROR, exc.reason.encode()[:200])), 0.5)
            except Exception:  # noqa: BLE001 - the connection is being dropped anyway
                pass
        raise
