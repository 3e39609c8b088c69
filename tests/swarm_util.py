"""Start real `edge-agent join` peers as separate OS processes, on loopback only."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

READY_TIMEOUT_S = 90.0


class Peer:
    def __init__(self, proc: subprocess.Popen, ready: dict, log: Path):
        self.proc, self.ready, self.log = proc, ready, log

    @property
    def agent_id(self) -> str:
        return self.ready["agent_id"]

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.ready['tls_port']}"

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()


def start_peer(model: Path | None, layers: str | None, data_dir: Path, *extra: str, mdns: bool = False,
               prefix: tuple[str, ...] = ()) -> Peer:
    """``prefix``: what the command runs under (e.g. ``ip netns exec NS``); a later ``--host`` in
    ``extra`` replaces the loopback one."""
    data_dir.mkdir(parents=True, exist_ok=True)
    log = data_dir / "join.log"
    args = [*prefix, sys.executable, "-m", "edge_agent", "join", *(["--model", str(model)] if model else []),
            *(["--layers", layers] if layers else []),
            "--data-dir", str(data_dir), "--host", "127.0.0.1", "--threads", "1", "--ctx", "512", *extra]
    args += ["--mdns-interface", "127.0.0.1"] if mdns else ["--no-mdns"]
    env = dict(os.environ, EDGE_AGENT_TEST_HOOKS="1")  # allows --test-* options
    return Peer(*start_agent(args, data_dir, log, env))


def start_agent(args: list[str], data_dir: Path, log: Path, env: dict) -> tuple[subprocess.Popen, dict, Path]:
    """Start an agent process; wait (bounded) for its `{"ready": ...}` line on stdout."""
    env = dict(env, EDGE_AGENT_DATA_DIR=str(data_dir))
    out = open(data_dir / "stdout.log", "w+")
    proc = subprocess.Popen(args, stdout=out, stderr=open(log, "w"), env=env, cwd=Path(__file__).parent.parent)
    name = next((a for a in args if a in ("join", "serve")), args[0])
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        out.seek(0)
        for line in out.read().splitlines():
            if line.startswith('{"ready"'):
                return proc, json.loads(line)["ready"], log
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with {proc.returncode}: {log.read_text()[-2000:]}")
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"{name} not ready in {READY_TIMEOUT_S} s: {log.read_text()[-2000:]}")


@pytest.fixture
def peers(tmp_path):
    """``peers(model, layers, *join_args, mdns=False)`` starts one; all are stopped after the test."""
    started = []

    def start(model, layers, *extra, mdns=False):
        p = start_peer(model, layers, tmp_path / f"peer{len(started)}", *extra, mdns=mdns)
        started.append(p)
        return p

    yield start
    for p in started:
        p.stop()


def swarm_generate(tmp_path, model, prompt, n, peer_list, *, mdns=False, on_token=None, discover_s=30.0, privacy=None,
                   options=None, **client):
    """(prompt token ids, result) of ``node.run`` through ``peer_list`` (TLS addresses, or mDNS);
    ``privacy``: the request's level; ``options``: the client's EngineOptions (default: run's);
    ``client``: ``ClientConfig`` fields. The client's data dir
    is ``tmp_path / "client"``."""
    from edge_agent.node import AgentConfig, run
    from edge_agent.runtime.sampling import SamplingParams
    from edge_agent.split.client import ClientConfig

    cfg = AgentConfig(tmp_path / "client", manual_peers=[] if mdns else [("127.0.0.1", p.ready["tls_port"]) for p in peer_list],
                      mdns=mdns, interfaces=["127.0.0.1"] if mdns else None, host="127.0.0.1")
    cfg.data_dir.mkdir(exist_ok=True)
    box = {}

    def tokens(tok):
        box["prompt"] = tok.encode(prompt)
        return box["prompt"]

    res = asyncio.run(run(cfg, model, tokens, SamplingParams(max_tokens=n), ClientConfig(**client), discover_s=discover_s,
                          n_ctx=512, options=options, on_token=on_token, privacy=privacy))
    return box["prompt"], res
