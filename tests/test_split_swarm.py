"""Split inference across real OS processes on loopback: exactness, failover, slow peers."""

from __future__ import annotations

import asyncio

import pytest

from conftest import reference_tokens
from edge_agent.runtime.sampling import SamplingParams
from edge_agent.split.client import ClientConfig
from swarm_util import peers, swarm_generate  # noqa: F401 - peers is a fixture


@pytest.mark.parametrize("mode", ["star", "chain"])
def test_two_peers_match_llama_cpp_tiny(tmp_path, peers, tiny_model, mode):
    a, b = peers(tiny_model, "1:3"), peers(tiny_model, "3:4")
    prompt, res = swarm_generate(tmp_path, tiny_model, "Once upon a time", 40, [a, b], mode=mode)
    assert res.token_ids == reference_tokens(tiny_model, prompt, 40)
    assert res.stats["mode"] == mode
    assert [(h["peer_id"], h["range"]) for h in res.stats["path"]] == [(a.agent_id, "1:3"), (b.agent_id, "3:4")]
    assert res.stats["reroutes"] == []


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["star", "chain"])
def test_three_peers_over_mdns_match_llama_cpp_smollm(tmp_path, peers, smollm_path, mode):
    ps = [peers(smollm_path, r, mdns=True) for r in ("1:10", "10:20", "20:29")]
    prompt, res = swarm_generate(tmp_path, smollm_path, "The capital of France is", 16, ps, mdns=True, mode=mode)
    assert res.token_ids == reference_tokens(smollm_path, prompt, 16)
    assert [h["range"] for h in res.stats["path"]] == ["1:10", "10:20", "20:29"]


def test_killed_peer_in_chain_is_routed_around(tmp_path, peers, tiny_model):
    a = peers(tiny_model, "1:2")
    b = peers(tiny_model, "2:4", "--test-advertise-ms", "0.001")  # the planner's first choice for 2:4
    c = peers(tiny_model, "2:4", "--test-advertise-ms", "5")
    seen = []

    def on_token(tok, _text):
        seen.append(tok)
        if len(seen) == 8:
            b.kill()  # the last hop of the chain dies mid-generation

    prompt, res = swarm_generate(tmp_path, tiny_model, "Once upon a time", 30, [a, b, c], on_token=on_token, mode="chain")
    assert res.token_ids == reference_tokens(tiny_model, prompt, 30)
    assert len(res.stats["reroutes"]) == 1 and res.stats["reroutes"][0]["from"] == b.agent_id
    assert [h["peer_id"] for h in res.stats["path"]] == [a.agent_id, c.agent_id]
    assert res.stats["mode"] == "chain"


def test_killed_peer_is_routed_around_with_unchanged_output(tmp_path, peers, tiny_model):
    a, b = peers(tiny_model, "1:4"), peers(tiny_model, "1:4")
    ids = {a.agent_id: a, b.agent_id: b}
    seen = []

    def on_token(tok, _text):
        seen.append(tok)
        if len(seen) == 10:  # SIGKILL whichever peer holds the hop, mid-generation
            ids[first_path[0]].kill()

    first_path = []
    from edge_agent.split.strategy import Router

    orig = Router.open

    async def spy(self, plan, keep, policy):
        states = await orig(self, plan, keep, policy)
        if not first_path:
            first_path.append(plan.hops[0].peer_id)
        return states

    Router.open = spy
    try:
        prompt, res = swarm_generate(tmp_path, tiny_model, "Once upon a time", 40, [a, b], on_token=on_token)
    finally:
        Router.open = orig
    assert res.token_ids == reference_tokens(tiny_model, prompt, 40)
    assert len(res.stats["reroutes"]) == 1
    r = res.stats["reroutes"][0]
    assert r["from"] == first_path[0] and r["to"] == [next(i for i in ids if i != first_path[0])]
    assert r["step"] >= 10


@pytest.mark.parametrize("ledger", ["on", "off"])
def test_slow_peer_loses_its_hop(tmp_path, peers, tiny_model, monkeypatch, ledger):
    # Ledger on: both fresh peers are on probation (docs/discovery.md), so the replacement is
    # the other peer on probation; off: nobody is on probation.
    monkeypatch.setenv("EDGE_AGENT_LEDGER", ledger)
    slow = peers(tiny_model, "1:4", "--test-delay-ms", "300", "--test-advertise-ms", "0.001")
    fast = peers(tiny_model, "1:4")
    prompt, res = swarm_generate(tmp_path, tiny_model, "Once upon a time", 24, [slow, fast], target_tbt_ms=100.0)
    assert res.token_ids == reference_tokens(tiny_model, prompt, 24)
    assert [r["from"] for r in res.stats["reroutes"]] == [slow.agent_id]
    assert "deadline" in res.stats["reroutes"][0]["reason"]
    assert res.stats["path"][0]["peer_id"] == fast.agent_id
    assert res.stats["deadline_misses"] >= 1


def test_node_without_model_fetches_its_range_and_serves_exact_tokens(tmp_path, peers, tiny_model):
    from edge_agent.runtime.shards import inspect_model

    model_hash = inspect_model(tiny_model).model_hash
    source = peers(tiny_model, "1:2")
    fetched = peers(None, "2:4", "--model-hash", model_hash, "--peer", source.address)
    assert fetched.ready["layers"] == [2, 4]
    prompt, res = swarm_generate(tmp_path, tiny_model, "Once upon a time", 24, [source, fetched])
    assert res.token_ids == reference_tokens(tiny_model, prompt, 24)
    assert [h["peer_id"] for h in res.stats["path"]] == [source.agent_id, fetched.agent_id]


@pytest.mark.slow
def test_peer_with_tampered_weights_is_refused(tmp_path, peers, tiny_model):
    import gguf

    from edge_agent.runtime.shards import inspect_model

    model_hash = inspect_model(tiny_model).model_hash
    bad = tmp_path / "tampered.gguf"
    bad.write_bytes(tiny_model.read_bytes())
    t = next(t for t in gguf.GGUFReader(str(bad)).tensors if t.name == "blk.2.ffn_up.weight")
    with open(bad, "r+b") as f:  # flip one weight: the file is still a valid model
        f.seek(t.data_offset + 8)
        f.write(b"\x01\x02\x03\x04")
    # A real peer never advertises a hash its file does not have; this test-only flag makes one
    # lie, the only way to put a tampered model behind a genuine hash.
    liar = peers(bad, "1:2", "--test-claim-model-hash", model_hash)
    with pytest.raises(RuntimeError, match="tampered"):
        peers(None, "2:4", "--model-hash", model_hash, "--peer", liar.address)
    assert not list((tmp_path / "peer1" / "shards").glob("*.gguf"))


def test_tampered_shard_file_fails_tensor_check(tmp_path, tiny_model):
    from edge_agent.runtime.shards import inspect_model, tensor_manifest, write_shard
    from edge_agent.split.weights import WeightsError, verify_shard

    info = inspect_model(tiny_model)
    shard = tmp_path / "s.gguf"
    write_shard(tiny_model, shard, 2, 4)
    verify_shard(shard, tensor_manifest(tiny_model), info.model_hash, 2, 4)  # genuine: accepted
    import gguf

    t = next(t for t in gguf.GGUFReader(str(shard)).tensors if t.name == "blk.1.ffn_down.weight")
    data = bytearray(shard.read_bytes())
    data[t.data_offset + 40] ^= 0xFF  # one weight byte
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match="tampered"):
        verify_shard(bad, tensor_manifest(tiny_model), info.model_hash, 2, 4)


def test_layers_no_peer_serves_run_on_the_client(tmp_path, peers, tiny_model):
    only = peers(tiny_model, "1:4")
    seen = []

    def on_token(tok, _text):
        seen.append(tok)
        if len(seen) == 6:
            only.kill()  # no other peer holds 1:4: the client takes the layers itself

    prompt, res = swarm_generate(tmp_path, tiny_model, "Once upon a time", 24, [only], on_token=on_token)
    assert res.token_ids == reference_tokens(tiny_model, prompt, 24)
    assert res.stats["reroutes"][0]["to"] == ["local"]
    assert [h["peer_id"] for h in res.stats["path"]] == ["local"]


def test_no_route_error_names_the_missing_layers(tmp_path, peers, tiny_model):
    from edge_agent.node import AgentConfig, run
    from edge_agent.split.planner import NoRouteError

    only = peers(tiny_model, "1:3")
    cfg = AgentConfig(tmp_path / "c", manual_peers=[("127.0.0.1", only.ready["tls_port"])], mdns=False, host="127.0.0.1")
    cfg.data_dir.mkdir()
    with pytest.raises(NoRouteError, match="layer 3"):
        asyncio.run(run(cfg, tiny_model, lambda tok: tok.encode("Hi"), SamplingParams(max_tokens=4),
                        ClientConfig(local_fallback=False), discover_s=3.0, n_ctx=512))


@pytest.mark.slow
def test_concurrent_requests_share_the_peers(tmp_path, peers, random_models):
    """Three requests at once through one client and the same two peers (quantized weights:
    nodes batch them); a fourth, cancelled mid-way, ends on every hop."""
    from edge_agent.node import AgentConfig, swarm_client
    from edge_agent.runtime.engine import EngineOptions

    model = random_models("q8_0")
    # room for the three requests only: the cancelled one must give its KV slots back
    a, b = peers(model, "1:3", "--max-requests", "3"), peers(model, "3:5", "--max-requests", "3")
    prompts = [[1, 300, 301, 302], [1, 400, 401, 402, 403, 404], [1, 500]]

    async def main():
        cfg = AgentConfig(tmp_path / "c", manual_peers=[("127.0.0.1", p.ready["tls_port"]) for p in (a, b)], mdns=False)
        cfg.data_dir.mkdir()
        opts = EngineOptions(n_ctx_per_request=512, max_requests=4)
        async with swarm_client(cfg, model, ClientConfig(local_fallback=False), opts, discover_s=30) as client:
            client.end_hooks.append(ends.append)
            started = asyncio.Event()
            doomed = asyncio.create_task(client.generate([1, 600], SamplingParams(max_tokens=400),
                                                         lambda _t, _s: started.set()))
            await started.wait()
            doomed.cancel()
            with pytest.raises(asyncio.CancelledError):
                await doomed
            return await asyncio.gather(*(client.generate(p, SamplingParams(max_tokens=16)) for p in prompts))

    ends = []  # RequestEnd of every request, the cancelled one included
    results = asyncio.run(main())
    for p, res in zip(prompts, results):
        assert res.token_ids == reference_tokens(model, p, 16)
        assert res.stats["reroutes"] == []
    assert len(ends) == 4 and all(e.hops == [(a.agent_id, 1, 3), (b.agent_id, 3, 5)] for e in ends)


def test_idle_requests_are_evicted_and_say_so(tiny_model):
    """A node frees the KV cache of an abandoned request and tells a returning client why."""
    import numpy as np

    from edge_agent.discovery.identity import Identity, SwarmKey
    from edge_agent.runtime.engine import EngineOptions
    from edge_agent.runtime.llamacpp import LlamaCppEngine
    from edge_agent.split.links import HopFailed, PeerLink
    from edge_agent.split.serve import HopServer
    from edge_agent.transport import Frame, MsgType, tls

    async def main():
        ident, swarm = Identity.generate(), SwarmKey.from_secret(None)
        server = HopServer([LlamaCppEngine.from_model(tiny_model, 1, 4, EngineOptions(n_ctx_per_request=512, max_requests=2))],
                           ident.agent_id, idle_timeout_s=0.3)
        await server.start()
        srv = await tls.listen(ident, swarm, "127.0.0.1", 0, server.handle)
        link = PeerLink(ident.agent_id, await tls.connect(Identity.generate(), swarm, "127.0.0.1", srv.port))
        x = np.zeros((2, 64), dtype=np.float32)
        rid = b"r" * 16

        def frame(step, rows):
            return Frame.from_array(MsgType.ACTIVATION, x[:rows], request_id=rid, step=step, n_positions=rows,
                                    layer_start=1, layer_end=4, seq=link.next_seq())

        try:
            await link.request(frame(0, 2), 10)
            await asyncio.sleep(1.0)
            with pytest.raises(HopFailed) as err:
                await link.request(frame(2, 1), 10)
            return err.value
        finally:
            await link.close()
            srv.close()
            await server.stop()

    err = asyncio.run(main())
    assert err.code == "evicted" and "replay" in err.reason


def test_node_serves_part_of_its_range_when_the_planner_asks(tmp_path, peers, tiny_model):
    a = peers(tiny_model, "1:4", "--test-advertise-ms", "50")  # slow: the planner gives it layer 1 only
    b = peers(tiny_model, "2:4", "--test-advertise-ms", "0.001")
    # a loose deadline: b over-promises, and a tight one would (rightly) move its hop to a
    prompt, res = swarm_generate(tmp_path, tiny_model, "Once upon a time", 24, [a, b], target_tbt_ms=60_000)
    assert res.token_ids == reference_tokens(tiny_model, prompt, 24)
    assert [(h["peer_id"], h["range"]) for h in res.stats["path"]] == [(a.agent_id, "1:2"), (b.agent_id, "2:4")]
    assert res.stats["reroutes"] == []


def test_joining_without_layers_fills_the_least_served_span(tmp_path, peers, tiny_model):
    first = peers(tiny_model, "1:3")
    # room for one layer beside the runtime (edge_agent/sizing.py: 170 MB + 0.37 MB a layer of the tiny
    # model with KV for 2 requests); layers 1-2 are served, layer 3 is not
    newcomer = peers(tiny_model, None, "--max-memory", "170.55M", "--peer", first.address)
    assert newcomer.ready["layers"] == [3, 4]
