"""The step features a node advertises in its signed capability record (``fx``, a hex bit set)."""

from __future__ import annotations

import pytest

from edge_agent.discovery.capabilities import (
    ARITH_KEY, COMPUTE_KEY, FEATURE_SPECULATION, FEATURES_KEY, MAX_RECORD_BYTES, SERVED_FEATURES, CapabilityDecodeError,
    Capabilities, decode_txt, features_entry)
from edge_agent.discovery.identity import Identity, SwarmKey
from edge_agent.runtime.compute_class import MAX_READABLE
from edge_agent.split.needs import speculation_loses_layers
from edge_agent.split.planner import PeerCapability
from test_capabilities_class import _replaced

PRIV = SwarmKey.from_secret("test swarm secret")


def _sealed(*entries: tuple[str, str], **kw) -> Capabilities:
    ident = Identity.generate()
    return Capabilities(ident.agent_id, extra=((ARITH_KEY, "llamacpp/512/0/f16"), *entries), **kw).sealed(ident, PRIV)


def test_a_node_of_this_release_advertises_speculation():
    assert SERVED_FEATURES & FEATURE_SPECULATION and features_entry() == (FEATURES_KEY, "1")
    c = decode_txt(_sealed(features_entry()).to_txt())
    assert c.verify(PRIV) and c.features == FEATURE_SPECULATION and c.has_feature(FEATURE_SPECULATION)
    assert c.to_dict()["features"] == ["spec"]


def test_an_older_record_without_the_entry_serves_no_feature():
    c = decode_txt(_sealed().to_txt())
    assert c.verify(PRIV) and c.features == 0 and not c.has_feature(FEATURE_SPECULATION)
    assert c.to_dict()["features"] == []


def test_bits_of_newer_features_are_kept_and_signed():
    c = decode_txt(_sealed((FEATURES_KEY, "a3")).to_txt())  # bits 1, 5 and 7: features of a later release
    assert c.verify(PRIV) and c.has_feature(FEATURE_SPECULATION) and c.features == 0xA3
    assert c.to_dict()["features"] == ["spec"]


@pytest.mark.parametrize("bad", ["", "01", "A", "g", "12345", " 1", "1,2", "-1"])
def test_a_malformed_entry_is_refused_cleanly(bad):
    with pytest.raises(ValueError, match=FEATURES_KEY):
        _sealed((FEATURES_KEY, bad))
    raw = _replaced(_sealed(features_entry()).to_txt(), FEATURES_KEY, bad)
    with pytest.raises(CapabilityDecodeError, match=FEATURES_KEY):
        decode_txt(raw)


def test_the_worst_realistic_node_record_still_fits():
    """Every extra entry a node sends, each at its longest: 391 bytes of 400 (386 without ``fx``)."""
    c = _sealed((COMPUTE_KEY, "f" * 8 + ":" + "a" * MAX_READABLE), ("w", "1"), features_entry(),
                signal_port=65535, tls_port=65535, free_mem_mb=99_999_999, ms_per_layer=10_000.0,
                shards=(("f" * 16, 9000, 9999),), backend="a" * 16)
    assert len(c.to_txt()) <= MAX_RECORD_BYTES and decode_txt(c.to_txt()).features == FEATURE_SPECULATION


def test_speculation_is_off_only_where_older_nodes_alone_serve_layers():
    new, old, old_too = (PeerCapability(pid, (r,), 1000.0, 1.0, 1.0) for pid, r in
                         (("new", (1, 4)), ("old", (1, 4)), ("old2", (3, 5))))
    able = {"new"}.__contains__
    assert speculation_loses_layers((1, 5), [new, old], able) == []  # the older node is only avoided
    assert speculation_loses_layers((1, 5), [new, old, old_too], able) == ["old2"]  # layer 4: only old2 serves it
    assert speculation_loses_layers((1, 4), [new, old, old_too], able) == []  # layer 4 is the client's own
    assert speculation_loses_layers((1, 5), [], able) == []
