"""A real capacity refusal (a `join` peer with one request slot, real llama.cpp, real TLS):
two concurrent requests through it, and no other peer and no local fallback. The second is
refused (CapacityError), waits for the slot (strategy.SlotWait) instead of failing, and both
give llama.cpp's own tokens."""

from __future__ import annotations

import asyncio

from conftest import reference_tokens
from edge_agent.node import AgentConfig, swarm_client
from edge_agent.runtime.engine import EngineOptions
from edge_agent.runtime.sampling import SamplingParams
from edge_agent.split.client import ClientConfig
from swarm_util import peers  # noqa: F401 - a fixture

PROMPTS = ("Once upon a time", "The capital of France is")
N_TOKENS = 24


def test_a_refused_request_waits_for_the_only_slot_and_matches_llama_cpp(tmp_path, peers, tiny_model):
    only = peers(tiny_model, "1:4", "--max-requests", "1")
    cfg = AgentConfig(tmp_path / "client", manual_peers=[("127.0.0.1", only.ready["tls_port"])], mdns=False,
                      host="127.0.0.1")
    cfg.data_dir.mkdir()

    async def go():
        async with swarm_client(cfg, tiny_model, ClientConfig(local_fallback=False),
                                EngineOptions(n_ctx_per_request=512, max_requests=2), discover_s=30.0) as client:
            prompts = [client.tokenizer.encode(p) for p in PROMPTS]
            # both run to their end before the client closes (a failed one must not close it under the other)
            results = await asyncio.gather(*(client.generate(t, SamplingParams(max_tokens=N_TOKENS)) for t in prompts),
                                           return_exceptions=True)
            return prompts, results

    prompts, results = asyncio.run(go())
    assert not [r for r in results if isinstance(r, BaseException)], results
    for prompt, res in zip(prompts, results):
        assert res.token_ids == reference_tokens(tiny_model, prompt, N_TOKENS)
        assert [h["peer_id"] for h in res.stats["path"]] == [only.agent_id]
    refused = [r for res in results for r in res.stats["reroutes"] if "CapacityError" in r["reason"]]
    assert refused, [res.stats["reroutes"] for res in results]  # one of them did meet the busy slot, and waited
    assert all(r["from"] == r["to"][0] == only.agent_id for r in refused)  # ... for the same peer, not another
