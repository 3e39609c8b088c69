"""A device with no model: a thin client from head and tail shards, fetched from a LAN peer.

Real parts throughout: `edge-agent join` peers as OS processes on loopback with SmolLM2,
the desktop app in this process (real uvicorn, real HTTP), llama.cpp alone as the reference.
"""

from __future__ import annotations

import pytest

from conftest import reference_tokens
from edge_agent.runtime.engine import EngineError
from edge_agent.runtime.shards import ensure_shard, inspect_model
from edge_agent.split.planner import NoRouteError
from edge_agent.split.thin import thin_model
from swarm_util import peers, swarm_generate  # noqa: F401 - peers is a fixture


def test_a_head_and_a_tail_shard_make_a_thin_model(tmp_path, smollm_path):
    info = inspect_model(smollm_path)
    head, tail = ensure_shard(smollm_path, 0, 1, tmp_path), ensure_shard(smollm_path, 29, 30, tmp_path)
    model = thin_model(head, tail)
    assert (model.model_hash, model.n_layer) == (info.model_hash, 30)
    from edge_agent.runtime.tokenizer import Tokenizer

    whole, thin = Tokenizer(smollm_path), Tokenizer(head)  # the head shard keeps the vocabulary and chat template
    try:
        assert thin.prompt_tokens("What is 2+2?", chat=True) == whole.prompt_tokens("What is 2+2?", chat=True)
    finally:
        whole.close()
        thin.close()
    with pytest.raises(EngineError, match="head and a tail"):
        thin_model(tail, head)
    middle = ensure_shard(smollm_path, 5, 6, tmp_path)
    with pytest.raises(EngineError, match="head and a tail"):
        thin_model(head, middle)


@pytest.mark.slow
def test_thin_client_through_a_real_peer_is_token_exact(tmp_path, peers, smollm_path):
    shards = tmp_path / "thin"
    model = thin_model(ensure_shard(smollm_path, 0, 1, shards), ensure_shard(smollm_path, 29, 30, shards))
    peer = peers(smollm_path, "1:29")
    prompt, res = swarm_generate(tmp_path, model, "The capital of France is", 16, [peer])
    assert res.token_ids == reference_tokens(smollm_path, prompt, 16)
    assert [(h["peer_id"], h["range"]) for h in res.stats["path"]] == [(peer.agent_id, "1:29")]
    # no local fallback: with no peer for the middle, a thin client says what it lacks
    with pytest.raises(NoRouteError, match="layers 1-28"):
        swarm_generate(tmp_path, model, "Hi", 2, [], discover_s=0.2)
    with pytest.raises(NoRouteError, match="thin client"):
        swarm_generate(tmp_path, model, "Hi", 2, [peer], privacy="local")
