"""The compute class in the signed capability record (``cc``) and the audit tier it selects."""

from __future__ import annotations

import re
from dataclasses import replace

import pytest

from edge_agent.discovery.capabilities import (
    ARITH_KEY, COMPUTE_KEY, MAX_RECORD_BYTES, CapabilityDecodeError, Capabilities, decode_txt)
from edge_agent.discovery.identity import Identity, SwarmKey
from edge_agent.ledger.audit import CROSS_CLASS_RATE_FACTOR, TIGHT_TOLERANCE, TOLERANCE, Auditor
from edge_agent.ledger.evidence import MIN_TOLERANCE
from edge_agent.runtime.compute_class import MAX_READABLE, ComputeClass, compute_class

PRIV = SwarmKey.from_secret("test swarm secret")
MINE = compute_class("llamacpp")


def _sealed(cc: str | None, sk: SwarmKey = PRIV, **kw) -> Capabilities:
    ident = Identity.generate()
    extra = [(ARITH_KEY, "llamacpp/512/0/f16")] + ([(COMPUTE_KEY, cc)] if cc is not None else []) + [("w", "1")]
    return Capabilities(ident.agent_id, extra=tuple(extra), **kw).sealed(ident, sk)


def test_this_agents_class_round_trips_in_a_signed_record():
    text = MINE.to_text()
    assert MINE.exact and text.split(":")[1].startswith("llamacpp-") and "-cpu" in text
    c = decode_txt(_sealed(text).to_txt())
    assert c.compute_class == text and c.verify(PRIV)
    assert compute_class("llamacpp").to_text() == text  # stable within a process (and across: a hash of what is fixed)


def test_an_older_record_without_a_class_still_parses():
    c = decode_txt(_sealed(None).to_txt())
    assert c.compute_class is None and c.verify(PRIV)


def test_the_worst_realistic_node_record_fits():
    longest = "f" * 8 + ":" + "a" * MAX_READABLE
    c = _sealed(longest, signal_port=65535, tls_port=65535, free_mem_mb=99_999_999, ms_per_layer=10_000.0,
                shards=(("f" * 16, 9000, 9999),), backend="a" * 16)
    assert len(c.to_txt()) <= MAX_RECORD_BYTES and decode_txt(c.to_txt()).compute_class == longest


def _replaced(raw: bytes, key: str, value: str) -> bytes:
    """The TXT rdata ``raw`` with ``key``'s value replaced (its signature no longer matters: decoding comes first)."""
    out, pos = bytearray(), 0
    while pos < len(raw):
        n = raw[pos]
        item = raw[pos + 1:pos + 1 + n]
        if item.startswith(key.encode() + b"="):
            item = f"{key}={value}".encode()
        out += bytes([len(item)]) + item
        pos += 1 + n
    return bytes(out)


@pytest.mark.parametrize("bad", ["b521f74:llamacpp", "B521F746:llamacpp", "b521f746", "b521f746:Llamacpp",
                                 "b521f746:" + "a" * (MAX_READABLE + 1), "b521f746:cpu avx", ""])
def test_a_malformed_class_is_refused_cleanly(bad):
    with pytest.raises(ValueError, match=COMPUTE_KEY):
        _sealed(bad)
    raw = _replaced(_sealed(MINE.to_text()).to_txt(), COMPUTE_KEY, bad)
    with pytest.raises(CapabilityDecodeError, match=COMPUTE_KEY):
        decode_txt(raw)


def test_every_rounding_source_changes_the_class():
    # one CPU feature of this build switched off, whichever it has (AVX-512 on some machines
    # of this kind, AVX2 only on others)
    fewer_features = re.sub(r" = 1\b", " = 0", MINE.system, count=1)
    assert fewer_features != MINE.system, MINE.system
    for change in ({"version": "0.3.37"}, {"system": fewer_features},
                   {"machine": "Linux-aarch64-glibc-2.36"}, {"build": "0" * 32}, {"device": "gpu"}):
        other = replace(MINE, **change)
        assert other.to_text() != MINE.to_text(), change
    assert not replace(MINE, device="gpu").exact and not compute_class("onnx").exact


def _auditor(own: ComputeClass | None, classes: dict[str, str]) -> Auditor:
    return Auditor(Identity.generate(), None, lambda a, b: None, rate=0.03, own_class=own, class_of=classes.get)


def test_the_tier_follows_the_advertised_class():
    other = replace(MINE, build="0" * 32).to_text()
    auditor = _auditor(MINE, {"same": MINE.to_text(), "other": other})
    same = auditor.tier("same")
    assert (same.name, same.tolerance, same.rate) == ("same-class", TIGHT_TOLERANCE, 0.03)
    for peer in ("other", "unknown"):  # another class, or none advertised (an older node)
        tier = auditor.tier(peer)
        assert (tier.name, tier.tolerance) == ("cross-class", TOLERANCE)
        assert tier.rate == pytest.approx(0.03 * CROSS_CLASS_RATE_FACTOR)
    # only llama.cpp on the CPU was measured bit-exact: an ONNX auditor keeps the loose tier even for its own class
    onnx = compute_class("onnx")
    assert _auditor(onnx, {"same": onnx.to_text()}).tier("same").tolerance == TOLERANCE
    assert _auditor(None, {"same": MINE.to_text()}).tier("same").tolerance == TOLERANCE
    assert Auditor(Identity.generate(), None, lambda a, b: None, rate=0.5).tier("x").rate == 1.0  # capped


def test_evidence_admits_the_tight_tier():
    assert MIN_TOLERANCE <= TIGHT_TOLERANCE < TOLERANCE


def test_a_build_that_cannot_be_identified_shares_no_class(tmp_path):
    """Without its libraries the build is not pinned: two such processes must not look alike."""
    from edge_agent.runtime.compute_class import _libraries_hash

    assert _libraries_hash(tmp_path) != _libraries_hash(tmp_path / "absent")
    assert _libraries_hash(tmp_path).startswith("unpinned-")
