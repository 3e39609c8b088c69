"""A device with no model: a thin client from head and tail shards, fetched from a LAN peer.

Real parts throughout: `edge-agent join` peers as OS processes on loopback with SmolLM2,
the desktop app in this process (real uvicorn, real HTTP), llama.cpp alone as the reference.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from conftest import reference_tokens
from edge_agent.runtime.engine import EngineError
from edge_agent.runtime.shards import ensure_shard, inspect_model
from edge_agent.split.planner import NoRouteError
from edge_agent.split.thin import ThinModel, fetch_thin, thin_model
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


async def fetch_from(peer, data_dir: Path, dest: Path) -> tuple[ThinModel, list[tuple[int, int]]]:
    """A thin client's shards from ``peer``'s offer, and every progress report on the way."""
    from edge_agent.desktop_fetch import PeerModels
    from edge_agent.node import AgentConfig

    config = AgentConfig(data_dir, host="127.0.0.1", mdns=False, manual_peers=[("127.0.0.1", peer.ready["tls_port"])])
    async with PeerModels(config, dest) as finder:
        watching = asyncio.create_task(finder.watch())
        try:
            await asyncio.wait_for(until(lambda: peer.agent_id in finder.offers), 60)
        finally:
            watching.cancel()
        seen: list[tuple[int, int]] = []
        offer = finder.offers[peer.agent_id]
        link = await finder.directory.link(peer.agent_id)
        return await fetch_thin(link, offer, dest, progress=lambda done, total: seen.append((done, total))), seen


async def until(condition) -> None:
    while not condition():
        await asyncio.sleep(0.1)


@pytest.mark.slow
def test_thin_client_fetched_from_a_real_peer_is_token_exact(tmp_path, peers, smollm_path):
    peer = peers(smollm_path, "1:29")  # shares its weights (join's default)
    (tmp_path / "client").mkdir()
    model, seen = asyncio.run(fetch_from(peer, tmp_path / "client", tmp_path / "thin"))
    info = inspect_model(smollm_path)
    assert (model.model_hash, model.n_layer) == (info.model_hash, 30)
    total = model.head.stat().st_size + model.tail.stat().st_size
    assert seen[-1] == (total, total) and all(a[0] <= b[0] and a[1] == total for a, b in zip(seen, seen[1:]))
    prompt, res = swarm_generate(tmp_path, model, "The capital of France is", 16, [peer])
    assert res.token_ids == reference_tokens(smollm_path, prompt, 16)
    assert [(h["peer_id"], h["range"]) for h in res.stats["path"]] == [(peer.agent_id, "1:29")]
    # no local fallback: with no peer for the middle, a thin client says what it lacks
    with pytest.raises(NoRouteError, match="layers 1-28"):
        swarm_generate(tmp_path, model, "Hi", 2, [], discover_s=0.2)
    with pytest.raises(NoRouteError, match="thin client"):
        swarm_generate(tmp_path, model, "Hi", 2, [peer], privacy="local")


@pytest.mark.slow
def test_app_without_a_model_fetches_its_layers_from_a_peer_and_chats_exactly(tmp_path, peers, smollm_path):
    import time

    from edge_agent.desktop_fetch import KNOWN_MODELS
    from edge_agent.runtime.shards import tensor_manifest
    from edge_agent.runtime.tokenizer import Tokenizer
    from edge_agent.split.weights import verify_shard
    from test_desktop import JSON, call, running, settings_for, wait_for_phase

    info = inspect_model(smollm_path)
    assert info.model_hash in KNOWN_MODELS  # the app knows the default model's content hash
    peer = peers(smollm_path, "1:29")  # shares its weights (join's default)
    # A real peer never advertises a hash its file does not have; this test-only flag makes one lie
    # (one flipped weight behind the genuine hash): the app must never offer its weights. It serves
    # a layer the thin client runs itself, so no request goes through it (a thin client cannot audit).
    liar = peers(tampered_copy(smollm_path, tmp_path / "tampered.gguf"), "29:30", "--test-claim-model-hash", info.model_hash)
    with running(settings_for(tmp_path, peers=[peer.address, liar.address])) as (app, url):
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not (app.peer_models and liar.agent_id in app.peer_models.refused
                                                   and wait_for_phase(url, ("no_model",)).get("offers")):
            time.sleep(0.2)
        assert "tampered" in app.peer_models.refused[liar.agent_id]
        state = wait_for_phase(url, ("no_model",))
        [offer] = state["offers"]
        assert (offer["peer_id"], offer["model_hash"], offer["known"]) == (peer.agent_id, info.model_hash, True)
        assert 0 < offer["bytes"] < info.file_size and "cannot run them itself" in state["thin_client_note"]
        status, body = call(url + "api/app/fetch", "POST", {"peer_id": "0" * 64}, JSON)
        assert status == 400 and body["error"]["param"] == "peer_id"

        click_the_offer(url, tmp_path / "profile", peer.agent_id)  # the dashboard's button, in real chromium
        assert wait_for_phase(url, ("ready", "error"))["phase"] == "ready"
        assert call(url + "api/app/fetch", "POST", {"peer_id": peer.agent_id}, JSON)[0] == 409

        # what came: the first and the last layer (embedding, LM head, vocabulary), verified, not the model
        shards = tmp_path / "data" / "shards"
        head, tail = shards / f"{info.model_hash[:16]}-0-1.gguf", shards / f"{info.model_hash[:16]}-29-30.gguf"
        assert sorted(p.name for p in shards.glob("*.gguf")) == sorted([head.name, tail.name])
        for path, (a, b) in ((head, (0, 1)), (tail, (29, 30))):
            verify_shard(path, tensor_manifest(smollm_path), info.model_hash, a, b)
            assert path.stat().st_size < info.file_size / 2
        assert head.stat().st_size + tail.stat().st_size == offer["bytes"]

        [model] = call(url + "v1/models")[1]["data"]
        assert model["id"] == smollm_path.name.removesuffix(".gguf")  # as a client with the whole file names it
        question = [{"role": "user", "content": "What is the capital of France?"}]
        status, body = call(url + "v1/chat/completions", "POST", {"model": model["id"], "messages": question,
                                                                   "max_tokens": 12, "temperature": 0}, JSON)
        assert status == 200, body
        tok = Tokenizer(smollm_path)
        try:
            want = reference_tokens(smollm_path, tok.encode(tok.apply_chat_template(question), parse_special=True), 12)
            assert body["choices"][0]["message"]["content"] == tok.decode(want)  # token-exact vs llama.cpp alone
        finally:
            tok.close()
        assert body["usage"]["completion_tokens"] == len(want)


def click_the_offer(url: str, profile: Path, peer_id: str) -> None:
    """Real headless chromium: the no-model panel lists the peer's offer; a click fetches it and
    the swarm's panels appear once the thin client is up."""
    import shutil

    from playwright.sync_api import sync_playwright

    from test_dashboard import CHROMIUM_ARGS

    with sync_playwright() as pw:
        ctx = pw.chromium.launch_persistent_context(str(profile), executable_path=shutil.which("chromium"), headless=True,
                                                    args=CHROMIUM_ARGS)
        try:
            page = ctx.new_page()
            page.goto(url)
            button = page.wait_for_selector("#offers button.offer", timeout=30_000)
            assert f"from peer {peer_id[:12]}" in button.text_content() and " MB" in button.text_content()
            button.click()
            page.wait_for_selector("#live.on", timeout=180_000)  # loaded: the swarm's event stream is live
            assert page.is_visible("#layers-card") and not page.is_visible("#app-card")
        finally:
            ctx.close()


def tampered_copy(model: Path, out: Path) -> Path:
    """``model`` with one weight of layer 5 changed: still a valid GGUF, another content hash."""
    import gguf

    out.write_bytes(model.read_bytes())
    t = next(t for t in gguf.GGUFReader(str(out)).tensors if t.name == "blk.5.ffn_up.weight")
    with open(out, "r+b") as f:
        f.seek(t.data_offset + 8)
        f.write(b"\x01\x02\x03\x04")
    return out
