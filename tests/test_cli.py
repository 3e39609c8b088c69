"""The command line as a user meets it (real subprocesses): --json on the reporting commands,
results on stdout and logs on stderr, --log-level, progress only on a terminal, help with
examples, shell completion, and doctor's memory figure for a node."""

from __future__ import annotations

import json
import os
import pty
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def cli(*args: str, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    res = subprocess.run([sys.executable, "-m", "edge_agent", *args], capture_output=True, text=True, timeout=120,
                         env=dict(os.environ if env is None else env), cwd=ROOT)
    if check:
        assert res.returncode == 0, res.stderr[-2000:]
    return res


def test_json_on_reporting_commands(tiny_model, tmp_path):
    keys = json.loads(cli("keys", "show", "--json", "--data-dir", str(tmp_path)).stdout)
    assert len(keys["agent_id"]) == 64 and keys["data_dir"] == str(tmp_path)
    assert cli("keys", "show", "--data-dir", str(tmp_path)).stdout.strip() == keys["agent_id"]
    info = json.loads(cli("model", "info", "--json", str(tiny_model)).stdout)
    assert info["n_layer"] == 5 and len(info["model_hash"]) == 64
    shard = json.loads(cli("model", "split", "--json", str(tiny_model), "--layers", "1:3", "-o", str(tmp_path / "m.gguf")).stdout)
    assert shard["role"] == "middle" and shard["layer_range"] == [1, 3] and Path(shard["out"]).is_file()
    trust = json.loads(cli("trust", "list", "--json", "--data-dir", str(tmp_path)).stdout)
    assert trust["peers"] == []
    doctor = json.loads(cli("doctor", "--json", "--data-dir", str(tmp_path)).stdout)
    assert {"cpu_count", "memory", "node_memory", "dependencies"} <= set(doctor)


def test_doctor_reports_what_a_node_will_hold(smollm_path, tmp_path):
    def node(*args: str) -> dict:
        return json.loads(cli("doctor", "--json", "-m", str(smollm_path), "--data-dir", str(tmp_path), *args).stdout)["node_memory"]

    half = node("--layers", "1:15")
    assert (half["layers"], half["max_requests"], half["n_ctx"]) == (14, 2, 2048)  # join's defaults
    assert half["total_mb"] == pytest.approx(half["runtime_mb"] + half["weights_mb"] + half["kv_mb"], abs=0.2)
    bounded = node("--max-memory", "250M")  # no --layers: the layers that fit
    assert 0 < bounded["layers"] < 30 and bounded["total_mb"] <= 250
    squeezed = node("--layers", "1:15", "--max-requests", "8", "--max-memory", "260M")  # fewer requests fit
    assert 1 <= squeezed["max_requests"] < 8 and squeezed["total_mb"] <= 260
    assert squeezed["kv_mb"] == pytest.approx(squeezed["max_requests"] / 2 * half["kv_mb"], rel=0.01)
    text = cli("doctor", "-m", str(smollm_path), "--layers", "1:15", "--data-dir", str(tmp_path)).stdout
    assert "node memory" in text and "14 layers x 2 requests x 2048 positions" in text


def test_logs_go_to_stderr_results_to_stdout(tmp_path):
    env = dict(os.environ, EDGE_AGENT_LOG_LEVEL="debug")
    res = cli("peers", "--json", "--timeout", "0.3", "--mdns-interface", "127.0.0.1", "--data-dir", str(tmp_path), env=env)
    assert isinstance(json.loads(res.stdout), list)  # nothing but the result on stdout
    assert " DEBUG " in res.stderr
    quiet = cli("--log-level", "error", "peers", "--json", "--timeout", "0.3", "--mdns-interface", "127.0.0.1",
                "--data-dir", str(tmp_path), env=env)  # the option wins over the environment
    assert " DEBUG " not in quiet.stderr
    bad = cli("--log-level", "loud", "doctor", check=False)
    assert bad.returncode == 2 and "loud" in bad.stderr


def _stderr_on_a_terminal(*args: str) -> str:
    """Run the CLI with stderr on a pseudo-terminal; what it drew there."""
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "edge_agent", *args], stdout=subprocess.PIPE, stderr=slave, cwd=ROOT)
    os.close(slave)
    drawn = b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        drawn += chunk
    proc.wait(120)
    os.close(master)
    assert proc.returncode == 0
    return drawn.decode("utf-8", "replace")


def test_progress_only_on_a_terminal_and_never_with_json(tiny_model, tmp_path):
    split = ["model", "split", str(tiny_model), "--layers", "0:2"]
    piped = cli(*split, "-o", str(tmp_path / "a.gguf"))
    assert piped.stderr == ""  # not a terminal: no progress
    assert "layers 0:2" in _stderr_on_a_terminal(*split, "-o", str(tmp_path / "b.gguf"))
    assert "layers 0:2" not in _stderr_on_a_terminal(*split, "--json", "-o", str(tmp_path / "c.gguf"))


def test_help_has_examples_and_completion_exists():
    for command in ("join", "run", "serve"):
        text = cli(command, "--help").stdout
        assert "Examples" in text and f"edge-agent {command}" in text, command
    assert "--install-completion" in cli("--help").stdout
    script = cli("--show-completion", "bash", env=dict(os.environ, _TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION="1")).stdout
    assert "complete" in script and "edge" in script


def test_bootstrap_addresses_from_the_data_dirs_file(tmp_path):
    """`<data dir>/bootstrap.txt` adds to --bootstrap (an agent started without a terminal needs it)."""
    from edge_agent.commands.common import _agent_config

    (tmp_path / "bootstrap.txt").write_text("# site B\n10.0.2.7:41000\n\n[fd00::2]:41000  # v6\n10.0.2.7:41000\n")
    cfg = _agent_config(tmp_path, None, "127.0.0.1", 0, 0, [], True, [], "auto", [], ["10.0.3.1:41000"])
    assert cfg.bootstrap == [("10.0.3.1", 41000), ("10.0.2.7", 41000), ("fd00::2", 41000)]
    (tmp_path / "bootstrap.txt").write_text("10.0.2.7\n")
    out = subprocess.run([sys.executable, "-m", "edge_agent", "run", "--no-mdns", "--data-dir", str(tmp_path), "Hi"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "bootstrap.txt line 1" in out.stderr and "Traceback" not in out.stderr
