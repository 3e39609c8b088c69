"""Settings that change arithmetic are enforced: real `edge-agent join` processes on loopback.

A peer started with another flash-attention setting or another n_ubatch would change the
output bit-wise, so the client never routes to it (even when it advertises itself as the
fastest), `edge-agent peers` shows it as incompatible with the reason, and a request that
only such a peer could serve fails with an error naming the setting and both values.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import reference_tokens
from edge_agent.split.planner import NoRouteError
from swarm_util import peers, swarm_generate  # noqa: F401 - peers is a fixture

PROMPT = "Once upon a time there was a little girl who lived in a village near the forest"


@pytest.mark.slow
def test_peers_with_other_arithmetic_are_never_used(tmp_path, peers, tiny_model):
    ok = peers(tiny_model, "1:4", mdns=True)
    # both advertise themselves as far faster than `ok`: only their settings keep them off the path
    flash = peers(tiny_model, "1:4", "--flash-attn", "--test-advertise-ms", "0.001", mdns=True)
    ubatch = peers(tiny_model, "1:4", "--ubatch", "8", "--test-advertise-ms", "0.001", mdns=True)

    prompt, res = swarm_generate(tmp_path, tiny_model, PROMPT, 24, [ok, flash, ubatch], mdns=True)
    assert len(prompt) > 8  # the prompt spans several micro-batches of the --ubatch 8 peer
    assert res.token_ids == reference_tokens(tiny_model, prompt, 24)
    assert [h["peer_id"] for h in res.stats["path"]] == [ok.agent_id]
    assert res.stats["reroutes"] == []

    env = dict(os.environ, EDGE_AGENT_DATA_DIR=str(tmp_path / "lister"))
    out = subprocess.run([sys.executable, "-m", "edge_agent", "peers", "--json", "--timeout", "3", "--mdns-interface",
                          "127.0.0.1"], capture_output=True, text=True, env=env, timeout=60, check=True)
    listed = {row["agent_id"]: row for row in json.loads(out.stdout)}
    assert listed[ok.agent_id]["incompatible"] is None
    assert listed[flash.agent_id]["incompatible"] == "flash_attn on on the peer, off on this device"
    assert listed[ubatch.agent_id]["incompatible"] == "n_ubatch 8 on the peer, 512 on this device"


@pytest.mark.parametrize("setting, message", [(("--flash-attn",), "flash_attn on on the peer, off on this device"),
                                              (("--ubatch", "64"), "n_ubatch 64 on the peer, 512 on this device")])
def test_a_route_only_through_an_incompatible_peer_fails_naming_the_setting(tmp_path, peers, tiny_model, setting, message):
    only = peers(tiny_model, "1:4", *setting)
    with pytest.raises(NoRouteError, match=f"layers 1-3.*{message}"):
        # the client waits for covering peers at most discover_s: none of these ever covers
        swarm_generate(tmp_path, tiny_model, PROMPT, 4, [only], local_fallback=False, discover_s=3.0)
