"""The dashboard in real headless Debian chromium (Playwright with executable_path; no browser
download) against a real client + 2 peers swarm: peers, layer bar, a streamed chat answer."""

from __future__ import annotations

import shutil
import struct

import pytest

from api_util import start_swarm
from conftest import reference_tokens

CHROMIUM = shutil.which("chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Debian chromium not installed (.ci/run installs it)")


@pytest.fixture(scope="module")
def swarm(smollm_path, tmp_path_factory):
    peers, server = start_swarm(smollm_path, tmp_path_factory.mktemp("dash"))
    yield peers, server
    server.stop()
    for p in peers:
        p.stop()


@pytest.fixture(scope="module")
def page(swarm, tmp_path_factory):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        # a fresh profile directory per run (Playwright passes it as --user-data-dir)
        ctx = pw.chromium.launch_persistent_context(str(tmp_path_factory.mktemp("chromium-profile")), executable_path=CHROMIUM,
                                                    headless=True, args=CHROMIUM_ARGS, viewport={"width": 1280, "height": 1000})
        pg = ctx.new_page()
        pg.goto(swarm[1].url + "/")
        yield pg
        ctx.close()


def test_page_shows_both_peers_and_the_layer_bar(swarm, page):
    peers = swarm[0]
    page.wait_for_selector("#live.on", timeout=30_000)
    page.wait_for_function("document.querySelectorAll('#peers tbody td.peer').length === 2", timeout=30_000)
    shown = page.eval_on_selector_all("#peers tbody td.peer", "cells => cells.map(c => c.title)")
    assert sorted(shown) == sorted(p.agent_id for p in peers)
    owners = page.eval_on_selector_all("#layer-bar rect.layer", "rs => rs.map(r => [+r.dataset.layer, r.dataset.peer])")
    by_layer = {layer: peer for layer, peer in owners}
    assert len(owners) == 30 and by_layer[0] == by_layer[29] == "local"
    assert {by_layer[i] for i in range(1, 15)} == {peers[0].agent_id} and {by_layer[i] for i in range(15, 29)} == {peers[1].agent_id}
    assert page.locator("#layer-bar rect.uncovered").count() == 0


@pytest.mark.slow
def test_chat_box_streams_an_exact_answer(swarm, page, smollm_path):
    from edge_agent.runtime.tokenizer import Tokenizer

    question = "What is the capital of France?"
    tok = Tokenizer(smollm_path)
    try:
        prompt = tok.encode(tok.apply_chat_template([{"role": "user", "content": question}]), add_special=True, parse_special=True)
        want = tok.decode(reference_tokens(smollm_path, prompt, 128))
    finally:
        tok.close()
    page.fill("#chat-input", question)
    page.click("#chat-send")
    page.wait_for_selector(".msg.assistant[data-done='1']", timeout=120_000)
    assert page.text_content(".msg.assistant .content") == want
    via = page.inner_text(".msg.assistant .via")
    assert "1:15" in via and "15:29" in via
    # the finished request reaches the plots through the live feed
    page.wait_for_function("document.querySelector('#flights tbody td.empty') !== null", timeout=30_000)


def test_screenshot_renders(page, tmp_path):
    page.wait_for_selector("#layer-bar rect.layer")
    shot = page.screenshot(full_page=True)
    (tmp_path / "dashboard.png").write_bytes(shot)
    assert shot[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", shot[16:24])  # IHDR
    assert width == 1280 and height >= 900
    assert len(shot) > 40_000  # a blank or unstyled page compresses to far less
