"""Identity (Ed25519) and swarm key: persistence, signatures, proofs."""

from __future__ import annotations

import os
import stat

import pytest

from edge_agent.discovery.identity import (IDENTITY_FILE, SWARM_ENV, SWARM_FILE, Identity, IdentityError,
                                           SwarmKey, public_key_from_agent_id, verify)


def test_identity_file_created_0600_and_reloaded_identical(tmp_path):
    ident = Identity.load_or_create(tmp_path)
    path = tmp_path / IDENTITY_FILE
    assert path.is_file()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    again = Identity.load_or_create(tmp_path)
    assert again.agent_id == ident.agent_id and again.public_key == ident.public_key
    msg = b"same key signs the same"
    assert again.sign(msg) == ident.sign(msg)  # Ed25519 is deterministic
    assert len(ident.agent_id) == 64 and ident.agent_id == ident.agent_id.lower()
    assert bytes.fromhex(ident.agent_id) == ident.public_key
    assert public_key_from_agent_id(ident.agent_id) == ident.public_key


def test_identity_file_permissions_are_tightened(tmp_path):
    Identity.load_or_create(tmp_path)
    path = tmp_path / IDENTITY_FILE
    os.chmod(path, 0o644)
    Identity.load_or_create(tmp_path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_private_key_not_in_repr(tmp_path):
    ident = Identity.load_or_create(tmp_path)
    seed = (tmp_path / IDENTITY_FILE).read_bytes()[-32:]
    assert seed.hex() not in repr(ident) and seed.hex() not in str(ident)


def test_corrupt_identity_file_is_refused(tmp_path):
    (tmp_path / IDENTITY_FILE).write_bytes(b"garbage")
    with pytest.raises(IdentityError):
        Identity.load_or_create(tmp_path)


def test_generate_is_random_and_sign_verify():
    a, b = Identity.generate(), Identity.generate()
    assert a.agent_id != b.agent_id
    sig = a.sign(b"hello")
    assert len(sig) == 64
    assert verify(a.public_key, b"hello", sig)
    assert not verify(b.public_key, b"hello", sig)
    assert not verify(a.public_key, b"hellO", sig)
    bad = bytearray(sig)
    bad[0] ^= 1
    assert not verify(a.public_key, b"hello", bytes(bad))


@pytest.mark.parametrize("pub,msg,sig", [
    (b"", b"m", b"\x00" * 64), (b"\x00" * 31, b"m", b"\x00" * 64), (b"\x00" * 32, b"m", b"\x00" * 63),
    (None, b"m", b"\x00" * 64), (b"\x00" * 32, b"m", None), ("ab" * 32, b"m", b"\x00" * 64),
    (b"\xff" * 32, b"m", b"\xff" * 64), (b"\x00" * 32, None, b"\x00" * 64),
])
def test_verify_never_raises(pub, msg, sig):
    assert verify(pub, msg, sig) is False


def test_swarm_open_default():
    open_ = SwarmKey.from_secret(None)
    assert open_.is_open and open_.tag() == "open"
    assert open_.prove(b"t") == b""
    assert open_.check(b"t", b"")
    assert not open_.check(b"t", b"x" * 32)
    assert SwarmKey.from_secret("").is_open and SwarmKey.from_secret(b"  ").is_open


def test_swarm_tag_and_proof():
    k1, k2 = SwarmKey.from_secret("team-secret"), SwarmKey.from_secret(b"team-secret")
    other = SwarmKey.from_secret("other")
    assert not k1.is_open
    assert k1.tag() == k2.tag() and len(k1.tag()) == 16 and k1.tag() != other.tag()
    int(k1.tag(), 16)
    proof = k1.prove(b"transcript")
    assert len(proof) == 32
    assert k2.check(b"transcript", proof)
    assert not other.check(b"transcript", proof)
    assert not k1.check(b"transcripT", proof)
    assert not k1.check(b"transcript", b"")
    assert not k1.check(b"transcript", None)  # type: ignore[arg-type]
    assert "team-secret" not in repr(k1)


def test_swarm_resolve_order(tmp_path, monkeypatch):
    monkeypatch.delenv(SWARM_ENV, raising=False)
    assert SwarmKey.resolve(None, tmp_path).is_open
    (tmp_path / SWARM_FILE).write_text("from-file\n")
    assert SwarmKey.resolve(None, tmp_path) == SwarmKey.from_secret("from-file")
    monkeypatch.setenv(SWARM_ENV, "from-env")
    assert SwarmKey.resolve(None, tmp_path) == SwarmKey.from_secret("from-env")
    assert SwarmKey.resolve("from-cli", tmp_path) == SwarmKey.from_secret("from-cli")
    assert len(SwarmKey.new_secret()) >= 40


def test_concurrent_first_runs_agree_on_one_key(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(8) as pool:
        ids = list(pool.map(lambda _: Identity.load_or_create(tmp_path).agent_id, range(16)))
    assert len(set(ids)) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [IDENTITY_FILE]  # no temp files left
