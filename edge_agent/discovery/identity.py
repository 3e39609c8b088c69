"""Agent identity (Ed25519) and the swarm key (shared secret for private swarms).

Why here: every other layer (discovery, transport handshakes, ledger receipts) needs the
same two primitives - "who is this peer" (an Ed25519 public key, its hex is the agent id)
and "is this peer in my swarm" (an HMAC proof keyed by the swarm secret).  No home-made
crypto: signatures are pynacl (libsodium), MACs are the standard library's HMAC-SHA256.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import tempfile
from pathlib import Path

from nacl.exceptions import BadSignatureError, CryptoError
from nacl.signing import SigningKey, VerifyKey

IDENTITY_FILE = "identity.key"
SWARM_FILE = "swarm.key"
SWARM_ENV = "EDGE_AGENT_SWARM_KEY"
_KEY_FILE_MAGIC = b"edge-agent ed25519 v1\n"
_SWARM_KDF_CONTEXT = b"edge-agent swarm key v1"
_SWARM_TAG_INFO = b"edge-agent swarm tag v1"


class IdentityError(Exception):
    """The identity file exists but cannot be used (corrupt, wrong size)."""


class Identity:
    """An agent's persistent Ed25519 key pair.  `agent_id` is the hex public key."""

    __slots__ = ("_sk", "public_key", "agent_id")

    def __init__(self, signing_key: SigningKey) -> None:
        self._sk = signing_key
        self.public_key: bytes = bytes(signing_key.verify_key)
        self.agent_id: str = self.public_key.hex()

    def __repr__(self) -> str:  # never print the private key
        return f"Identity(agent_id={self.agent_id[:16]}...)"

    @classmethod
    def generate(cls) -> "Identity":
        """A fresh in-memory identity (tests, throwaway peers)."""
        return cls(SigningKey.generate())

    @classmethod
    def load_or_create(cls, data_dir: Path) -> "Identity":
        """Load `data_dir/identity.key`, creating it (mode 0600) on first run.

        The file holds a magic line plus the 32-byte seed.  It is written to a private temp
        file and hard-linked into place, so it appears complete or not at all, and two agents
        starting at once cannot both install a different key: the loser loads the winner's.
        """
        data_dir = Path(data_dir)
        data_dir.mkdir(parents=True, exist_ok=True)
        path = data_dir / IDENTITY_FILE
        if path.exists():
            return cls._load(path)
        sk = SigningKey.generate()
        blob = _KEY_FILE_MAGIC + bytes(sk)
        fd, tmp = tempfile.mkstemp(prefix=".identity-", dir=data_dir)  # created 0600
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(blob)
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp, path)
            except FileExistsError:
                return cls._load(path)
            except OSError:  # no hard links on this filesystem: exclusive create instead
                try:
                    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                except FileExistsError:
                    return cls._load(path)
                with os.fdopen(fd, "wb") as f:
                    f.write(blob)
        finally:
            os.unlink(tmp)
        return cls(sk)

    @classmethod
    def _load(cls, path: Path) -> "Identity":
        raw = path.read_bytes()
        if len(raw) != len(_KEY_FILE_MAGIC) + 32 or not raw.startswith(_KEY_FILE_MAGIC):
            raise IdentityError(f"{path}: not an edge-agent identity file")
        mode = path.stat().st_mode & 0o777
        if mode & 0o077:
            # Tighten rather than refuse: a copied key file should not stop the agent.
            os.chmod(path, 0o600)
        return cls(SigningKey(raw[len(_KEY_FILE_MAGIC):]))

    def sign(self, message: bytes) -> bytes:
        """Detached 64-byte Ed25519 signature over `message`."""
        return self._sk.sign(bytes(message)).signature


def verify(public_key: bytes, message: bytes, signature: bytes) -> bool:
    """True iff `signature` is a valid Ed25519 signature; never raises on malformed input."""
    try:
        if not isinstance(public_key, (bytes, bytearray)) or len(public_key) != 32:
            return False
        if not isinstance(signature, (bytes, bytearray)) or len(signature) != 64:
            return False
        VerifyKey(bytes(public_key)).verify(bytes(message), bytes(signature))
        return True
    except (BadSignatureError, CryptoError, ValueError, TypeError):
        return False


def public_key_from_agent_id(agent_id: str) -> bytes | None:
    """Decode a 64-hex agent id to its public key; None when malformed."""
    try:
        raw = bytes.fromhex(agent_id)
    except (ValueError, TypeError):
        return None
    return raw if len(raw) == 32 else None


class SwarmKey:
    """The shared secret that gates discovery and signalling for a private swarm.

    The open swarm (no secret) proves nothing and accepts only other open-swarm peers:
    a private-swarm agent never talks to an open one, and vice versa.  Secrets are hashed
    to a 32-byte key, so any string works, but only a high-entropy one resists offline
    guessing from an observed proof (use `SwarmKey.new_secret()`).
    """

    __slots__ = ("_key", "is_open")

    def __init__(self, key: bytes | None) -> None:
        self._key = key
        self.is_open: bool = key is None

    def __repr__(self) -> str:
        return f"SwarmKey(tag={self.tag()})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SwarmKey) and hmac.compare_digest(self.tag(), other.tag())

    def __hash__(self) -> int:
        return hash(self.tag())

    @staticmethod
    def new_secret() -> str:
        """A fresh 256-bit secret, URL-safe, for `edge-agent join --swarm-key`."""
        return secrets.token_urlsafe(32)

    @classmethod
    def from_secret(cls, secret: str | bytes | None) -> "SwarmKey":
        """Derive the key from a user secret; None or empty means the open swarm."""
        if secret is None:
            return cls(None)
        raw = secret.encode("utf-8") if isinstance(secret, str) else bytes(secret)
        raw = raw.strip()
        if not raw:
            return cls(None)
        return cls(hmac.new(_SWARM_KDF_CONTEXT, raw, hashlib.sha256).digest())

    @classmethod
    def resolve(cls, cli_value: str | None, data_dir: Path) -> "SwarmKey":
        """--swarm-key value, else $EDGE_AGENT_SWARM_KEY, else data_dir/swarm.key, else open."""
        if cli_value:
            return cls.from_secret(cli_value)
        env = os.environ.get(SWARM_ENV)
        if env:
            return cls.from_secret(env)
        path = Path(data_dir) / SWARM_FILE
        if path.is_file():
            return cls.from_secret(path.read_bytes())
        return cls(None)

    def tag(self) -> str:
        """Public, non-secret swarm label for discovery records; "open" for the open swarm."""
        if self._key is None:
            return "open"
        return hmac.new(self._key, _SWARM_TAG_INFO, hashlib.sha256).hexdigest()[:16]

    def prove(self, transcript: bytes) -> bytes:
        """HMAC-SHA256 over a handshake transcript; b"" for the open swarm."""
        if self._key is None:
            return b""
        return hmac.new(self._key, bytes(transcript), hashlib.sha256).digest()

    def check(self, transcript: bytes, proof: bytes) -> bool:
        """Constant-time check of a peer's proof (open swarm: the proof must be empty)."""
        if not isinstance(proof, (bytes, bytearray)):
            return False
        if self._key is None:
            return len(proof) == 0
        expected = hmac.new(self._key, bytes(transcript), hashlib.sha256).digest()
        return hmac.compare_digest(expected, bytes(proof))
