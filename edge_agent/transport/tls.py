"""TLS 1.3 over TCP: the fast transport for peers that can reach each other directly.

Why this shape: Python's ssl gives TLS 1.3 with AES-GCM in OpenSSL; each side presents an
ephemeral self-signed ECDSA certificate (so no private key of ours is ever in a TLS library's
hands except a throwaway one), and identity is proven *after* TLS by the Ed25519 handshake in
handshake.py, bound to the server certificate hash.  Frames are parsed in the protocol
callbacks (an asyncio BufferedProtocol, no reader task) to keep the one-token hop short.
"""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import logging
import os
import ssl
import tempfile
import time
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from ..discovery.identity import Identity, SwarmKey
from . import hoptrace
from .channel import ChannelHandler, FrameChannel, hand_over
from .errors import FrameError, HandshakeError, PeerLostError
from .frames import HEADER_SIZE, Frame, MsgType, check_header, decode_parts, encode_parts
from .handshake import DEFAULT_HANDSHAKE_TIMEOUT, HANDSHAKE_VERSION, run_handshake

log = logging.getLogger(__name__)
_HANDSHAKE_MAX_PAYLOAD = 1024  # unauthenticated peers get tiny frames only
_HANDSHAKE_MAX_BUFFERED = 8192
MAX_PENDING_HANDSHAKES = 64
_CERTS: dict[str, tuple[bytes, bytes]] = {}


def _certificate(identity: Identity) -> tuple[bytes, bytes]:
    """(cert PEM, key PEM) of a per-process ephemeral self-signed P-256 certificate."""
    cached = _CERTS.get(identity.agent_id)
    if cached:
        return cached
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "edge-agent " + identity.agent_id[:32])])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .sign(key, hashes.SHA256()))
    pair = (cert.public_bytes(serialization.Encoding.PEM),
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()))
    _CERTS[identity.agent_id] = pair
    return pair


def _context(identity: Identity, server: bool) -> tuple[ssl.SSLContext, bytes]:
    """TLS 1.3-only context and the DER hash of our certificate (the channel binding)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # pinned by the Ed25519 handshake, not by a CA
    cert_pem, key_pem = _certificate(identity)
    binding = hashlib.sha256(x509.load_pem_x509_certificate(cert_pem).public_bytes(serialization.Encoding.DER)).digest()
    if server:
        # ssl can only load keys from files: write a 0600 temp file and remove it at once.
        fd, path = tempfile.mkstemp(prefix="ea-tls-", suffix=".pem")
        try:
            os.fchmod(fd, 0o600)
            os.write(fd, cert_pem + key_pem)
            os.close(fd)
            ctx.load_cert_chain(path)
        finally:
            os.unlink(path)
    return ctx, binding


_HANDSHAKE_TYPES = frozenset((MsgType.HELLO, MsgType.ERROR, MsgType.HEARTBEAT, MsgType.CLOSE))
STAGE_SIZE = 256 * 1024
DIRECT_THRESHOLD = 64 * 1024
WRITE_CHUNK = 256 * 1024
WRITE_HIGH, WRITE_LOW = 2 << 20, 512 * 1024


class TlsChannel(FrameChannel, asyncio.BufferedProtocol):
    """A Channel over one TLS connection; also the asyncio Protocol that parses it."""

    kind = "tls"

    def __init__(self, **kw: Any) -> None:
        FrameChannel.__init__(self, "", **kw)
        self._full_max_payload, self._full_max_buffered = self.max_payload, self.max_buffered
        self.max_payload, self.max_buffered = _HANDSHAKE_MAX_PAYLOAD, _HANDSHAKE_MAX_BUFFERED
        self._transport: asyncio.Transport | None = None
        self._stage = bytearray(STAGE_SIZE)
        self._sview = memoryview(self._stage)
        self._lo = self._hi = 0
        self._header = b""
        self._authed = False
        self._pbuf: bytearray | None = None
        self._pfill = 0
        self._send_lock = asyncio.Lock()
        self._write_ok = asyncio.Event()
        self._write_ok.set()
        self._graceful = False
        self._detached = False  # the connection now carries a relay circuit (relay.py): leave it open
        self.connected = asyncio.get_running_loop().create_future()

    # -- asyncio.BufferedProtocol -----------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        if self._lost is not None:  # refused before TLS finished (e.g. too many pending)
            transport.abort()  # type: ignore[attr-defined]
            return
        # asyncio's 64 KiB default makes a multi-MB frame stop and start dozens of times.
        transport.set_write_buffer_limits(high=WRITE_HIGH, low=WRITE_LOW)  # type: ignore[attr-defined]
        self._touch()
        if not self.connected.done():
            self.connected.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(f"connection lost: {exc!r}" if exc else "peer closed the connection")

    def eof_received(self) -> bool:
        return False

    def pause_writing(self) -> None:
        self._write_ok.clear()

    def resume_writing(self) -> None:
        self._write_ok.set()

    # Reading: a BufferedProtocol, so asyncio's SSL layer decrypts straight into our buffers.
    # Small frames are parsed out of a staging buffer; a big payload gets its own bytearray
    # (sized after peek_header checked it) that TLS then fills in place - no extra copies.
    def get_buffer(self, sizehint: int) -> memoryview:
        if self._pbuf is not None:
            return memoryview(self._pbuf)[self._pfill:]
        if self._hi == STAGE_SIZE:
            self._compact()
            if self._hi == STAGE_SIZE:  # only possible while data is parked before auth
                self._fail("peer sent too much data before authenticating")
                return memoryview(bytearray(65536))  # scratch: asyncio needs somewhere to write
        return self._sview[self._hi:]

    def buffer_updated(self, nbytes: int) -> None:
        if self._lost is not None:
            return
        self._last_rx = time.monotonic()
        if hoptrace.ON:
            self._rx_ns = hoptrace.now()
        try:
            if self._pbuf is not None:
                self._pfill += nbytes
                if self._pfill == len(self._pbuf):
                    payload, self._pbuf = self._pbuf, None
                    self._deliver(decode_parts(self._header, payload, self.max_payload))
                return
            self._hi += nbytes
            self._parse()
        except FrameError as exc:
            self._fail(f"protocol error from peer: {exc.reason}")
            return
        if self.rx_full and self._transport is not None and not self._transport.is_closing():
            self._transport.pause_reading()

    def _compact(self) -> None:
        n = self._hi - self._lo
        self._sview[:n] = self._sview[self._lo:self._hi]
        self._lo, self._hi = 0, n

    def _parse(self) -> None:
        sv = self._sview
        while self._hi - self._lo >= HEADER_SIZE and self._lost is None:
            lo = self._lo
            if not self._authed and sv[lo + 5] not in _HANDSHAKE_TYPES:
                # Application data right behind the handshake: hold it until the handshake
                # task has checked the peer and lifted the limits (see _authenticate).
                if self._transport is not None:
                    self._transport.pause_reading()
                return
            hdr = sv[lo:lo + HEADER_SIZE]
            fields = check_header(hdr, self.max_payload)
            plen = fields[16]
            end = lo + HEADER_SIZE + plen
            if end <= self._hi:
                self._lo = end
                self._deliver(decode_parts(hdr, bytes(sv[lo + HEADER_SIZE:end]) if plen else b"",
                                           self.max_payload, fields))
                continue
            if plen > DIRECT_THRESHOLD:
                have = self._hi - lo - HEADER_SIZE
                self._header = bytes(sv[lo:lo + HEADER_SIZE])
                self._pbuf = bytearray(plen)  # size already checked against max_payload
                self._pbuf[:have] = sv[lo + HEADER_SIZE:self._hi]
                self._pfill = have
                self._lo = self._hi = 0
                return
            if end > STAGE_SIZE:
                self._compact()
            return
        if self._lo == self._hi:
            self._lo = self._hi = 0

    # -- FrameChannel hooks -----------------------------------------------------------------
    async def _transmit(self, header: bytes, payload: bytes) -> None:
        t = self._transport
        if t is None or t.is_closing():
            raise ConnectionResetError("transport closed")
        if len(payload) <= WRITE_CHUNK and not self._send_lock.locked():
            t.writelines((header, payload)) if payload else t.write(header)  # atomic: no await
        else:
            # Big payloads go to TLS in slices, each encrypted and handed to the socket at once,
            # instead of asyncio holding a payload-sized ciphertext copy.  The lock keeps other
            # senders (and heartbeats) from interleaving while we wait between slices.
            async with self._send_lock:
                t.write(header)
                view = memoryview(payload)
                for off in range(0, len(view), WRITE_CHUNK):
                    t.write(view[off:off + WRITE_CHUNK])
                    if not self._write_ok.is_set():
                        await self._guard(self._write_ok.wait())
        if not self._write_ok.is_set():
            await self._guard(self._write_ok.wait())

    def _transmit_nowait(self, header: bytes) -> bool:
        if self._send_lock.locked():
            return False  # a big frame is going out: its bytes keep the peer's timer fresh
        t = self._transport
        if t is None or t.is_closing():
            raise ConnectionResetError("transport closed")
        t.write(header)
        return True

    async def _flush(self) -> None:
        t = self._transport
        deadline = time.monotonic() + 1.0
        while t is not None and t.get_write_buffer_size() > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        self._graceful = True

    def _abort(self) -> None:
        t = self._transport
        if t is not None and not t.is_closing() and not self._detached:
            t.close() if self._graceful else t.abort()

    def _on_rx_drained(self) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.resume_reading()

    async def _authenticate(self, identity: Identity, swarm: SwarmKey, binding: bytes, is_client: bool,
                            expect_peer_id: str | None, timeout: float, version: int) -> None:
        try:
            peer = await asyncio.wait_for(
                run_handshake(self.send, self.recv, identity, swarm, kind="tls", binding=binding,
                              is_client=is_client, expect_peer_id=expect_peer_id, version=version), timeout)
        except PeerLostError as exc:
            self._fail("handshake failed")
            raise HandshakeError(f"peer closed during handshake: {exc.reason}") from None
        except asyncio.TimeoutError:
            self._fail("handshake timeout")
            raise HandshakeError(f"handshake timed out after {timeout:.1f} s") from None
        except BaseException:
            self._fail("handshake failed")
            raise
        self.peer_id = peer.agent_id
        self.max_payload, self.max_buffered = self._full_max_payload, self._full_max_buffered
        self._authed = True
        self._last_rx = time.monotonic()
        self._start()
        try:
            self._parse()
        except FrameError as exc:
            self._fail(f"protocol error from peer: {exc.reason}")
            raise PeerLostError(self._lost.reason if self._lost else exc.reason) from None
        if self._transport is not None and not self._transport.is_closing() and not self.rx_full:
            self._transport.resume_reading()


    # -- relay circuits (relay.py) ----------------------------------------------------------
    def quiesce(self) -> None:
        """Stop heartbeats and the liveness check: this connection is about to carry a relay
        circuit, where a heartbeat sent later would land inside the other protocol's bytes.
        The caller bounds its own waits from here on.  Only on an authenticated channel."""
        if self._watchdog is not None:
            self._watchdog.cancel()

    def detach(self, final: Frame | None = None) -> tuple[asyncio.Transport, bytes]:
        """Hand the TLS connection over, open: write `final` as the last frame it carries, stop
        parsing, and return the transport (reading paused: the new owner resumes it, as start_tls
        does) and the bytes that arrived after the last parsed frame.  The channel itself is lost
        from here on (its readers get PeerLostError)."""
        t = self._transport
        if t is None or t.is_closing() or self._lost is not None or self._pbuf is not None:
            raise PeerLostError(self._lost.reason if self._lost else "connection not in a state to hand over")
        t.pause_reading()  # what comes next is for the new owner: it stays queued until that one reads
        if final is not None:
            header, payload = encode_parts(final, self.max_payload)
            t.write(header + payload)
        leftover = bytes(self._sview[self._lo:self._hi])
        self._lo = self._hi = 0
        self._detached = True
        self._fail("handed over to a relay circuit")
        return t, leftover


class TlsServer:
    """Listening socket; `port` is the bound port, `close()` stops it and its channels."""

    def __init__(self, server: asyncio.base_events.Server, channels: set[TlsChannel]) -> None:
        self._server = server
        self._channels = channels
        self.port: int = server.sockets[0].getsockname()[1]

    def close(self) -> "asyncio.Future[None]":
        """Stop listening and drop every channel; returns an already-done awaitable."""
        self._server.close()
        for ch in list(self._channels):
            ch._fail("server closed")
        fut = asyncio.get_running_loop().create_future()
        fut.set_result(None)
        return fut


async def listen(identity: Identity, swarm: SwarmKey, host: str, port: int, on_channel: ChannelHandler, *,
                 handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT, **channel_kw: Any) -> TlsServer:
    """Accept TLS peers; `on_channel(channel)` runs (as a task) for each authenticated one."""
    ctx, binding = _context(identity, server=True)
    loop = asyncio.get_running_loop()
    channels: set[TlsChannel] = set()
    pending: set[asyncio.Task[None]] = set()

    async def accept(ch: TlsChannel) -> None:
        try:
            # TLS handshake first; a failed one never reaches connection_made.
            await asyncio.wait_for(ch.connected, handshake_timeout + 1.0)
            await ch._authenticate(identity, swarm, binding, False, None, handshake_timeout, HANDSHAKE_VERSION)
        except (HandshakeError, PeerLostError) as exc:
            log.info("tls: refused a peer: %s", exc)
            return
        except asyncio.TimeoutError:
            ch._fail("TLS handshake did not complete")
            return
        await hand_over(ch, channels, on_channel)

    def factory() -> TlsChannel:
        ch = TlsChannel(**channel_kw)
        if len(pending) >= MAX_PENDING_HANDSHAKES:
            ch._fail("too many pending handshakes")
            return ch
        task = loop.create_task(accept(ch))
        pending.add(task)
        task.add_done_callback(pending.discard)
        return ch

    server = await loop.create_server(factory, host, port, ssl=ctx, ssl_handshake_timeout=handshake_timeout)
    return TlsServer(server, channels)


async def connect(identity: Identity, swarm: SwarmKey, host: str, port: int, expect_peer_id: str | None = None,
                  *, timeout: float = DEFAULT_HANDSHAKE_TIMEOUT, _version: int = HANDSHAKE_VERSION,
                  **channel_kw: Any) -> TlsChannel:
    """Open an authenticated channel; HandshakeError if the peer is not who/what we expect."""
    ctx, _ = _context(identity, server=False)
    loop = asyncio.get_running_loop()
    try:
        transport, ch = await asyncio.wait_for(
            loop.create_connection(lambda: TlsChannel(**channel_kw), host, port, ssl=ctx,
                                   server_hostname="edge-agent", ssl_handshake_timeout=timeout), timeout)
    except (OSError, ssl.SSLError, asyncio.TimeoutError) as exc:
        raise PeerLostError(f"cannot connect to {host}:{port}: {exc!r}") from None
    der = transport.get_extra_info("ssl_object").getpeercert(binary_form=True)
    binding = hashlib.sha256(der or b"").digest()
    await ch._authenticate(identity, swarm, binding, True, expect_peer_id, timeout, _version)
    return ch


async def over(transport: asyncio.Transport, identity: Identity, swarm: SwarmKey, *, server_side: bool,
               expect_peer_id: str | None = None, timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
               **channel_kw: Any) -> TlsChannel:
    """An authenticated channel *inside* an open connection (a relay circuit, relay.py): TLS 1.3
    over `transport` (itself a TLS transport: TLS in TLS, which asyncio's loop and uvloop both
    support in `start_tls`), then the same Ed25519 + swarm handshake as `connect`/`listen`, so
    the relay in the middle forwards ciphertext it cannot read or alter unnoticed."""
    ctx, own_binding = _context(identity, server=server_side)
    loop = asyncio.get_running_loop()
    ch = TlsChannel(**channel_kw)
    try:
        inner = await asyncio.wait_for(
            loop.start_tls(transport, ch, ctx, server_side=server_side,
                           server_hostname=None if server_side else "edge-agent", ssl_handshake_timeout=timeout), timeout)
    except (OSError, ssl.SSLError, asyncio.TimeoutError) as exc:
        transport.abort()
        raise PeerLostError(f"TLS through the relay failed: {exc!r}") from None
    ch.connection_made(inner)  # start_tls does not call it
    if server_side:
        binding = own_binding
    else:
        binding = hashlib.sha256(inner.get_extra_info("ssl_object").getpeercert(binary_form=True) or b"").digest()
    await ch._authenticate(identity, swarm, binding, not server_side, expect_peer_id, timeout, HANDSHAKE_VERSION)
    return ch
