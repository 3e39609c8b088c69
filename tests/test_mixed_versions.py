"""Mixed versions in a real swarm (separate `join` processes, real llama.cpp, real TLS): a node
whose record lacks the ``fx`` entry (older than speculative steps, which refuses their flags)
is never sent a step with REWIND or DRAFT, also not in a re-route's replay; the output stays
llama.cpp's.

The older node is a current one started with ``--test-no-features``, a test-only knob that
drops the entry from its record: an older release cannot be installed here. It would accept
the flags, so the test reads what the client sent (its hop records) rather than waiting for
a refusal."""

from __future__ import annotations

import asyncio
import logging

from conftest import reference_tokens
from edge_agent.node import AgentConfig, swarm_client
from edge_agent.runtime.engine import EngineOptions
from edge_agent.runtime.sampling import SamplingParams
from edge_agent.split.client import ClientConfig
from edge_agent.split.strategy import STEP_FLAGS
from swarm_util import peers  # noqa: F401 - a fixture

PROMPT = "Once upon a time"


def _generate(tmp_path, model, serving, n, on_token=None, **client_config):
    """(prompt, result, [(peer_id, flags)] of every hop step the client sent, replays included)."""
    cfg = AgentConfig(tmp_path / "client", manual_peers=[("127.0.0.1", p.ready["tls_port"]) for p in serving], mdns=False,
                      host="127.0.0.1")
    cfg.data_dir.mkdir(exist_ok=True)
    sent = []

    async def go():
        async with swarm_client(cfg, model, ClientConfig(**client_config), EngineOptions(n_ctx_per_request=512, max_requests=2),
                                discover_s=30.0) as client:
            client.observers.add(lambda r: sent.append((r.peer_id, r.flags)))
            tokens = client.tokenizer.encode(PROMPT)
            return tokens, await client.generate(tokens, SamplingParams(max_tokens=n), on_token)

    prompt, res = asyncio.run(go())
    return prompt, res, sent


def test_an_older_node_is_never_sent_a_speculative_step(tmp_path, peers, tiny_model):
    """The older node is the planner's first choice on its merits; the speculating request
    goes around it, and when its peer dies, to this device rather than to the older node."""
    older = peers(tiny_model, "1:4", "--test-no-features", "--test-advertise-ms", "0.001")
    newer = peers(tiny_model, "1:4", "--test-advertise-ms", "5")
    seen = []

    def on_token(tok, _text):
        seen.append(tok)
        if len(seen) == 10:
            newer.kill()  # mid-generation: the re-route replays the speculative steps

    prompt, res, sent = _generate(tmp_path, tiny_model, [older, newer], 24, on_token, speculate=4)
    assert res.token_ids == reference_tokens(tiny_model, prompt, 24)
    assert "off" not in res.stats["speculation"]
    assert older.agent_id not in {peer for peer, _ in sent}
    assert any(flags & STEP_FLAGS for peer, flags in sent if peer == newer.agent_id)
    assert [(r["from"], r["to"]) for r in res.stats["reroutes"]] == [(newer.agent_id, ["local"])]


def test_where_an_older_node_alone_serves_layers_the_request_runs_one_token_per_step(tmp_path, peers, tiny_model,
                                                                                       caplog):
    newer, older = peers(tiny_model, "1:3"), peers(tiny_model, "3:4", "--test-no-features")
    with caplog.at_level(logging.INFO, logger="edge_agent.split.client"):
        prompt, res, sent = _generate(tmp_path, tiny_model, [newer, older], 24, speculate=4)
    assert res.token_ids == reference_tokens(tiny_model, prompt, 24)
    assert [h["peer_id"] for h in res.stats["path"]] == [newer.agent_id, older.agent_id]
    assert sent and all(flags & STEP_FLAGS == 0 for _, flags in sent) and res.stats["reroutes"] == []
    assert "off" in res.stats["speculation"]
    assert sum("no speculation" in r.getMessage() for r in caplog.records) == 1
