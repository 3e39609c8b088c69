"""Desktop mode (edge_agent/desktop.py) in this process: a real uvicorn server on loopback, a real
swarm client on SmolLM2 (no peers: this device runs every layer), real HTTP from urllib.
The browser opener is the one stub: $EDGE_AGENT_BROWSER runs a shell command that writes the URL."""

from __future__ import annotations

import asyncio
import configparser
import json
import shutil
import socket
import threading
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest

from conftest import ROOT, reference_tokens
from edge_agent.desktop import DesktopApp, DesktopSettings, browser_opener

JSON = {"Content-Type": "application/json"}


def call(url: str, method: str = "GET", body: dict | None = None, headers: dict | None = None) -> tuple[int, dict]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=120) as res:
            return res.status, json.loads(res.read() or b"null")
    except urllib.error.HTTPError as err:
        raw = err.read()
        return err.code, json.loads(raw) if err.headers.get_content_type() == "application/json" else {"text": raw.decode()}


def wait_for_phase(url: str, phases: tuple[str, ...], timeout_s: float = 180.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        _, info = call(url + "api/app")
        if info["phase"] in phases:
            return info
        time.sleep(0.2)
    raise AssertionError(f"phase stayed {info['phase']!r}: {info['message']}")


@contextmanager
def running(settings: DesktopSettings):
    """The app on its own event loop in a thread; stopped with the dashboard's stop request."""
    app = DesktopApp(settings)
    ready: dict = {}
    started = threading.Event()

    def on_ready(info: dict) -> None:
        ready.update(info)
        started.set()

    thread = threading.Thread(target=lambda: asyncio.run(app.run(on_ready)), daemon=True)
    thread.start()
    assert started.wait(60), "the dashboard did not come up"
    try:
        yield app, ready["url"]
    finally:
        try:
            call(ready["url"] + "api/app/stop", "POST", {}, JSON)
        except OSError:  # stopped by the test already
            pass
        thread.join(60)
        assert not thread.is_alive(), "the app did not stop"


def settings_for(tmp_path: Path, model: Path | None = None, **extra) -> DesktopSettings:
    return DesktopSettings(tmp_path / "data", model, port=0, mdns=False, ctx=256, max_concurrent=1, discover_s=0.2, **extra)


def test_no_model_the_dashboard_explains_and_opens_a_local_gguf(tmp_path, smollm_path):
    with running(settings_for(tmp_path)) as (app, url):
        info = wait_for_phase(url, ("no_model",))
        assert "EDGE_AGENT_MODEL" in info["how_to_get_a_model"] and "never downloads" in info["how_to_get_a_model"]
        assert info["message"] == "This device has no model yet." and info["stoppable"]
        with urllib.request.urlopen(url, timeout=30) as res:
            assert b'id="model-picker"' in res.read()  # the page answers before any model
        assert call(url + "health")[1]["status"] == "no_model"
        status, body = call(url + "v1/models")
        assert status == 503 and body["error"]["code"] == "model_not_loaded"

        not_gguf = tmp_path / "notes.gguf"
        not_gguf.write_text("not a model")
        for path, words in (("relative.gguf", "full path"), (str(tmp_path / "missing.gguf"), "not found"),
                            (str(not_gguf), "not a valid GGUF")):
            status, body = call(url + "api/app/model", "POST", {"path": path}, JSON)
            assert status == 400 and words in body["error"]["message"], body
        assert call(url + "api/app/model", "POST", {"nope": 1}, JSON)[0] == 400

        status, body = call(url + "api/app/model", "POST", {"path": str(smollm_path)}, JSON)
        assert status == 202 and body["phase"] == "loading"
        assert wait_for_phase(url, ("ready", "error"))["phase"] == "ready"
        # the choice is remembered where resolve_model looks next time
        assert (tmp_path / "data" / "models" / smollm_path.name).resolve() == smollm_path.resolve()
        assert call(url + "api/app/model", "POST", {"path": str(smollm_path)}, JSON)[0] == 409

        model_id = smollm_path.name.removesuffix(".gguf")
        assert call(url + "health")[1]["status"] == "ok"
        status, body = call(url + "v1/completions", "POST", {"model": model_id, "prompt": "The capital of France is",
                                                               "max_tokens": 8, "temperature": 0}, JSON)
        assert status == 200, body
        from edge_agent.runtime.tokenizer import Tokenizer

        tok = Tokenizer(smollm_path)
        want = reference_tokens(smollm_path, tok.encode("The capital of France is"), 8)
        assert body["choices"][0]["text"] == tok.decode(want)  # token-exact against llama.cpp alone


def test_state_changes_only_from_this_machines_dashboard(tmp_path):
    with running(settings_for(tmp_path)) as (_app, url):
        wait_for_phase(url, ("no_model",))
        port = url.rstrip("/").rsplit(":", 1)[1]
        refused = [
            ({"Content-Type": "application/json", "Host": f"evil.example:{port}"}, 400),  # DNS re-pointed at us
            ({"Content-Type": "application/json", "Origin": "http://evil.example"}, 403),  # another site's page
            ({"Content-Type": "text/plain"}, 415),  # what a cross-site form or no-cors fetch can send
        ]
        for headers, code in refused:
            for path in ("api/app/stop", "api/app/model"):
                status, body = call(url + path, "POST", {"path": "/x.gguf"}, headers)
                assert status == code, (path, headers, body)
        for path in ("api/app", "health", ""):  # nothing at all for a rebound name, not even the page
            req = urllib.request.Request(url + path, headers={"Host": f"evil.example:{port}"})
            with pytest.raises(urllib.error.HTTPError, match="400"):
                urllib.request.urlopen(req, timeout=30)
        assert call(url + "api/app")[1]["phase"] == "no_model"  # still running
        status, body = call(url + "api/app/stop", "POST", {}, {**JSON, "Origin": url.rstrip("/")})
        assert status == 200 and body["phase"] == "stopping"


def test_model_given_at_start_is_served_and_the_browser_gets_the_url(tmp_path, smollm_path):
    seen = tmp_path / "opened.txt"
    opener = browser_opener({"EDGE_AGENT_BROWSER": f"sh -c 'echo \"$1\" > {seen}' sh"})
    with running(settings_for(tmp_path, smollm_path, open_browser=opener)) as (_app, url):
        assert wait_for_phase(url, ("ready", "error"))["phase"] == "ready"
        status, body = call(url + "v1/models")
        assert status == 200 and body["data"][0]["id"] == smollm_path.name.removesuffix(".gguf")
        deadline = time.monotonic() + 30
        while not (seen.exists() and seen.read_text().strip()) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert seen.read_text().strip() == url
        # the API has no key on loopback: a cross-site page's no-cors POST (text/plain) may not use it
        body = {"model": body["data"][0]["id"], "prompt": "Hi", "max_tokens": 1}
        assert call(url + "v1/completions", "POST", body, {"Content-Type": "text/plain"})[0] == 415
        assert call(url + "v1/completions", "POST", body, {**JSON, "Origin": "http://evil.example"})[0] == 403
        assert call(url + "v1/completions", "POST", body, JSON)[0] == 200


def test_a_taken_port_falls_back_to_a_free_one(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        settings = settings_for(tmp_path)
        settings.port = port
        with running(settings) as (_app, url):
            assert not url.endswith(f":{port}/")
            assert call(url + "api/app")[0] == 200


def test_settings_from_the_environment(tmp_path, smollm_path, monkeypatch):
    assert browser_opener({"EDGE_AGENT_NO_BROWSER": "1"}) is None
    assert browser_opener({}) is not None  # Python's webbrowser (not called here)
    monkeypatch.setenv("EDGE_AGENT_DATA_DIR", str(tmp_path / "d"))
    monkeypatch.setenv("EDGE_AGENT_MODEL", str(smollm_path))
    s = DesktopSettings.from_env({"EDGE_AGENT_APP_PORT": "0", "EDGE_AGENT_MDNS_INTERFACE": "127.0.0.1, ::1",
                                  "EDGE_AGENT_PEER": "127.0.0.1:7000", "EDGE_AGENT_BOOTSTRAP": "10.0.0.2:7001",
                                  "EDGE_AGENT_NO_BROWSER": "1"})
    assert (s.model, s.port, s.mdns_interfaces, s.peers, s.bootstrap, s.open_browser) == (
        smollm_path, 0, ["127.0.0.1", "::1"], ["127.0.0.1:7000"], ["10.0.0.2:7001"], None)
    monkeypatch.setenv("EDGE_AGENT_MODEL", str(tmp_path / "gone.gguf"))
    s = DesktopSettings.from_env({})
    assert s.model is None and "gone.gguf" in s.no_model_reason and s.port == 8000
    with pytest.raises(ValueError, match="EDGE_AGENT_APP_PORT"):
        DesktopSettings.from_env({"EDGE_AGENT_APP_PORT": "http"})
    for bad in ({"peers": ["no-port-here"]}, {"bootstrap": ["host:port"]}):
        with pytest.raises(ValueError):
            DesktopApp(DesktopSettings(tmp_path, **bad))


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian chromium not installed (.ci/run installs it)")
def test_the_page_picks_a_model_and_stops_the_app(tmp_path, smollm_path):
    """Real headless chromium: the model picker refuses a wrong path, opens SmolLM2, the swarm
    panels appear once it is loaded, and the stop button ends the app."""
    from playwright.sync_api import sync_playwright

    from test_dashboard import CHROMIUM_ARGS

    with running(settings_for(tmp_path)) as (_app, url), sync_playwright() as pw:
        ctx = pw.chromium.launch_persistent_context(str(tmp_path / "profile"), executable_path=shutil.which("chromium"),
                                                    headless=True, args=CHROMIUM_ARGS)
        try:
            page = ctx.new_page()
            page.goto(url)
            page.wait_for_selector("#model-picker:not([hidden])", timeout=30_000)
            assert page.evaluate("document.body.classList.contains('setup')") and page.is_visible("#stop")
            assert not page.is_visible("#layers-card")  # nothing to show until a model is loaded
            page.fill("#model-path", str(tmp_path / "nowhere.gguf"))
            page.click("#model-open")
            page.wait_for_function("document.querySelector('#model-error').textContent.includes('not found')", timeout=30_000)
            page.fill("#model-path", str(smollm_path))
            page.click("#model-open")
            page.wait_for_selector("#live.on", timeout=180_000)  # loaded: the swarm's event stream is live
            assert page.is_visible("#layers-card") and not page.is_visible("#app-card")
            page.click("#stop")
            page.wait_for_function("document.querySelector('#app-phase').textContent === '(stopped)'", timeout=30_000)
        finally:
            ctx.close()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                call(url + "api/app")
            except OSError:
                break  # the server is gone
            time.sleep(0.2)
        else:
            raise AssertionError("the app still answers after the stop button")


def test_linux_desktop_entry_launches_the_app_with_its_icon():
    entry = configparser.ConfigParser(interpolation=None)
    entry.optionxform = str  # keys are case-sensitive
    entry.read(ROOT / "packaging" / "linux" / "edge-agent.desktop")
    desk = entry["Desktop Entry"]
    assert (desk["Type"], desk["Exec"], desk["Terminal"]) == ("Application", "edge-agent", "false")
    import xml.etree.ElementTree as ET

    icon = ET.parse(ROOT / "packaging" / "linux" / f"{desk['Icon']}.svg").getroot()
    assert icon.tag.endswith("svg") and icon.get("viewBox") == "0 0 128 128"
