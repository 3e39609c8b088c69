"""The one-file app (packaging/pyinstaller) as a person runs it: built by build.sh (or reused when
newer than its sources), then `--version`, `doctor --json`, a one-process `generate` on SmolLM2,
and the no-argument start (what a double-click does): the dashboard answers on its port, takes a
local GGUF, and the stop button ends the process. The browser opener is the one stub
($EDGE_AGENT_BROWSER runs a shell command that writes the URL down)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import ROOT, reference_tokens
from test_desktop import JSON, call, wait_for_phase

pytestmark = pytest.mark.slow
BINARY = ROOT / "dist" / "edge-agent"
SOURCES = (ROOT / "edge_agent", ROOT / "packaging" / "pyinstaller", ROOT / "pyproject.toml")
BUILD_TIMEOUT_S = 1800


def newest_source() -> float:
    files = [p for src in SOURCES for p in ([src] if src.is_file() else src.rglob("*")) if p.is_file()
             and "__pycache__" not in p.parts]
    return max(p.stat().st_mtime for p in files)


@pytest.fixture(scope="module")
def binary() -> Path:
    if not BINARY.is_file() or BINARY.stat().st_mtime < newest_source():
        subprocess.run(["bash", "packaging/pyinstaller/build.sh"], cwd=ROOT, check=True, timeout=BUILD_TIMEOUT_S)
    return BINARY


def app_env(tmp_path: Path, **extra: str) -> dict:
    """A person's environment: a fresh data dir, no model named; loopback-only mDNS for the test."""
    env = {k: v for k, v in os.environ.items() if k not in ("EDGE_AGENT_MODEL", "EDGE_AGENT_SWARM_KEY")}
    return dict(env, EDGE_AGENT_DATA_DIR=str(tmp_path / "data"), EDGE_AGENT_MDNS_INTERFACE="127.0.0.1", **extra)


def run(binary: Path, *args: str, env: dict) -> str:
    done = subprocess.run([str(binary), *args], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_version(binary, tmp_path):
    from edge_agent import __version__

    assert run(binary, "--version", env=app_env(tmp_path)).strip() == f"edge-agent {__version__}"


def test_doctor_json(binary, tmp_path):
    report = json.loads(run(binary, "doctor", "--json", env=app_env(tmp_path)))
    deps = report["dependencies"]
    assert not [name for name, status in deps.items() if status.startswith("MISSING")], deps
    assert "error" not in report["llama_cpp"]
    assert report["default_model"].startswith("none")  # no weights inside the binary


def test_generate_in_one_process(binary, tmp_path, smollm_path):
    from edge_agent.runtime.tokenizer import Tokenizer

    prompt = "The capital of France is"
    out = json.loads(run(binary, "generate", "--model", str(smollm_path), "--json", "-n", "8", "--ctx", "256",
                         "--threads", "2", prompt, env=app_env(tmp_path)))
    tok = Tokenizer(smollm_path)
    assert out["token_ids"] == reference_tokens(smollm_path, tok.encode(prompt), 8)


def start_app(binary: Path, tmp_path: Path, env: dict) -> tuple[subprocess.Popen, str]:
    """The binary with no arguments; its URL from the `{"ready": ...}` line (bounded wait)."""
    out, err = tmp_path / "app.out", tmp_path / "app.err"
    proc = subprocess.Popen([str(binary)], stdout=out.open("w"), stderr=err.open("w"), env=env, stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        ready = [json.loads(line)["ready"] for line in out.read_text().splitlines() if line.startswith('{"ready"')]
        if ready:
            return proc, ready[0]["url"]
        time.sleep(0.1)
    proc.kill()
    raise AssertionError(f"no ready line (exit {proc.poll()}): {err.read_text()[-3000:]}")


def test_no_argument_start_serves_the_dashboard_until_stopped(binary, tmp_path, smollm_path):
    opened = tmp_path / "opened.txt"
    env = app_env(tmp_path, EDGE_AGENT_APP_PORT="0", EDGE_AGENT_BROWSER=f"sh -c 'echo \"$1\" > {opened}' sh")
    proc, url = start_app(binary, tmp_path, env)
    try:
        assert wait_for_phase(url, ("no_model",), 60)["stoppable"]
        import urllib.request

        with urllib.request.urlopen(url, timeout=30) as res:
            assert res.status == 200 and b"edge-agent" in res.read()
        deadline = time.monotonic() + 30
        while not (opened.exists() and opened.read_text().strip()) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert opened.read_text().strip() == url
        assert call(url + "api/app/model", "POST", {"path": str(smollm_path)}, JSON)[0] == 202
        assert wait_for_phase(url, ("ready", "error"))["phase"] == "ready"
        assert call(url + "health")[1]["status"] == "ok"
        assert call(url + "api/app/stop", "POST", {}, JSON)[0] == 200
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_ctrl_c_stops_the_app(binary, tmp_path):
    proc, url = start_app(binary, tmp_path, app_env(tmp_path, EDGE_AGENT_APP_PORT="0", EDGE_AGENT_NO_BROWSER="1"))
    try:
        wait_for_phase(url, ("no_model",), 60)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
