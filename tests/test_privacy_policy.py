"""--privacy open|trusted|local: the allow-list, and a policy that never silently weakens,
not even when a trusted peer dies mid-generation next to an untrusted one (real peers)."""

from __future__ import annotations

import json
import stat

import pytest
from typer.testing import CliRunner

from conftest import reference_tokens
from edge_agent.cli import app
from edge_agent.discovery.trust import TrustError, TrustList, privacy_policy
from edge_agent.split.planner import NoRouteError
from edge_agent.split.policy import PolicyError, PrivacyPolicy
from swarm_util import peers, swarm_generate  # noqa: F401 - peers is a fixture

A, B = "a" * 64, "b" * 64


def test_levels():
    assert PrivacyPolicy.for_level("open").admits(A)
    trusted = PrivacyPolicy.for_level("trusted", trusted=[A])
    assert trusted.admits(A) and not trusted.admits(B) and trusted.strict
    local = PrivacyPolicy.for_level("local")
    assert not local.admits(A) and not local.strict  # the middle layers run here
    with pytest.raises(PolicyError, match="open, trusted, local"):
        PrivacyPolicy.for_level("paranoid")


def test_trust_list_file_and_cli(tmp_path):
    t = TrustList(tmp_path)
    t.add(A.upper(), "office laptop")
    assert t.ids() == {A}
    assert stat.S_IMODE(t.path.stat().st_mode) == 0o600
    with pytest.raises(TrustError, match="not a peer id"):
        t.add("nope")
    run = CliRunner().invoke
    assert run(app, ["trust", "add", B, "--name", "nas", "--data-dir", str(tmp_path)]).exit_code == 0
    out = json.loads(run(app, ["trust", "list", "--json", "--data-dir", str(tmp_path)]).stdout)
    assert [(p["id"], p["name"]) for p in out["peers"]] == [(A, "office laptop"), (B, "nas")]
    assert run(app, ["trust", "remove", A, "--data-dir", str(tmp_path)]).exit_code == 0
    res = run(app, ["trust", "remove", A, "--data-dir", str(tmp_path)])
    assert res.exit_code == 2 and "not on the trust list" in res.stderr
    assert privacy_policy("trusted", 1, 1, tmp_path).trusted == {B}
    t.set_private_swarm(True)  # the whole private swarm: only with a swarm key
    with pytest.raises(TrustError, match="needs a private swarm key"):
        privacy_policy("trusted", 1, 1, tmp_path)
    assert privacy_policy("trusted", 1, 1, tmp_path, swarm_key="s3cret-team-key").trusted is None


def test_trusted_without_a_trusted_peer_fails_naming_the_layers(tmp_path, peers, tiny_model):
    untrusted = peers(tiny_model, "1:4")
    with pytest.raises(NoRouteError, match=r"no trusted peer holds layers 1-3 .*untrusted peers serve them: "
                                           + untrusted.agent_id[:12]):
        swarm_generate(tmp_path, tiny_model, "Once upon a time", 4, [untrusted], discover_s=3.0,
                       policy=PrivacyPolicy.for_level("trusted", trusted=[]))


@pytest.mark.parametrize("given", ["client default", "per request"])
def test_failover_under_trusted_never_reaches_the_untrusted_peer(tmp_path, peers, tiny_model, monkeypatch, given):
    """``per request``: the client's default is open and only the request says trusted, so a
    re-route that planned with the client's default instead of the request's would pick the
    untrusted peer."""
    from edge_agent.directory import PeerDirectory

    untrusted = peers(tiny_model, "1:4", "--test-advertise-ms", "0.001")  # the planner's favourite under open
    first = peers(tiny_model, "1:4", "--test-advertise-ms", "0.002")
    second = peers(tiny_model, "1:4", "--test-advertise-ms", "5")
    linked, seen = [], []
    real_link = PeerDirectory.link

    async def record_link(self, peer_id):  # every peer the client opens a link to
        linked.append(peer_id)
        return await real_link(self, peer_id)

    def on_token(tok, _text):
        seen.append(tok)
        if len(seen) == 6:
            first.kill()  # a trusted hop dies; the untrusted peer is the fastest replacement
        if len(seen) == 14:
            second.kill()  # the last trusted peer dies: the request must fail, not go untrusted

    monkeypatch.setattr(PeerDirectory, "link", record_link)
    if given == "client default":
        how = dict(policy=PrivacyPolicy.for_level("trusted", trusted=[first.agent_id, second.agent_id]))
    else:  # the trust list in the client's data dir, read when the request asks for `trusted`
        (tmp_path / "client").mkdir()
        for p in (first, second):
            TrustList(tmp_path / "client").add(p.agent_id)
        how = dict(policy=PrivacyPolicy.for_level("open"), privacy="trusted")
    with pytest.raises(NoRouteError, match="no trusted peer holds layers 1-3") as err:
        swarm_generate(tmp_path, tiny_model, "Once upon a time", 30, [untrusted, first, second], on_token=on_token, **how)
    assert untrusted.agent_id[:12] in str(err.value)  # named as the peer that could, but may not
    assert set(linked) == {first.agent_id, second.agent_id}
    assert len(seen) == 14  # the re-route to the second trusted peer kept generating

    # the same swarm under open re-routes to anyone: the untrusted peer serves
    prompt, res = swarm_generate(tmp_path, tiny_model, "Once upon a time", 8, [untrusted], policy=PrivacyPolicy.for_level("open"))
    assert res.token_ids == reference_tokens(tiny_model, prompt, 8)
    assert res.stats["privacy"] == {"policy": "open", "k": 1, "m": 1, "peers_saw_activations": [untrusted.agent_id]}


def test_local_sends_no_activation_even_with_peers_around(tmp_path, peers, tiny_model, monkeypatch):
    from edge_agent.directory import PeerDirectory

    peer = peers(tiny_model, "1:4")
    linked = []
    real_link = PeerDirectory.link

    async def record_link(self, peer_id):
        linked.append(peer_id)
        return await real_link(self, peer_id)

    monkeypatch.setattr(PeerDirectory, "link", record_link)
    prompt, res = swarm_generate(tmp_path, tiny_model, "Once upon a time", 8, [peer], discover_s=1.0,
                                 policy=PrivacyPolicy.for_level("local"))
    assert res.token_ids == reference_tokens(tiny_model, prompt, 8)
    assert linked == [] and res.stats["privacy"]["peers_saw_activations"] == []


def test_swarm_key_on_the_command_line_warns_and_never_reaches_logs(tmp_path, peers, tiny_model, monkeypatch):
    from edge_agent.node import AgentConfig

    secret = "team-secret-5f1c9a0e7d"
    peer = peers(tiny_model, "1:4", "--swarm-key", secret)
    monkeypatch.setenv("EDGE_AGENT_SWARM_KEY", secret)  # the client: the way the warning recommends
    prompt, res = swarm_generate(tmp_path, tiny_model, "Once upon a time", 4, [peer])
    assert res.token_ids == reference_tokens(tiny_model, prompt, 4)  # a real generation in the private swarm
    peer.stop()
    err, out = peer.log.read_text(), (peer.log.parent / "stdout.log").read_text()
    assert "--swarm-key is visible to every user" in err
    assert secret not in err and secret not in out
    assert secret not in repr(AgentConfig(tmp_path, secret))
