"""A real swarm behind a real `edge-agent serve`: two `join` peers and the API process, on loopback."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from swarm_util import Peer, start_agent, start_peer

API_KEY = "test-api-key-0123"


@dataclass
class Server:
    proc: subprocess.Popen
    ready: dict
    log: Path

    @property
    def url(self) -> str:
        return self.ready["url"]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def start_server(model: Path, peers: list[Peer], data_dir: Path, *extra: str) -> Server:
    data_dir.mkdir(parents=True, exist_ok=True)
    log = data_dir / "serve.log"
    args = [sys.executable, "-m", "edge_agent", "serve", "--model", str(model), "--data-dir", str(data_dir), "--no-mdns",
            "--port", "0", "--ctx", "512", "--discover", "30", *extra]
    for p in peers:
        args += ["--peer", p.address]
    return Server(*start_agent(args, data_dir, log, dict(os.environ)))


def start_swarm(model: Path, base: Path, *serve_extra: str, peer_extra: tuple[str, ...] = ()) -> tuple[list[Peer], Server]:
    """Peers for layers 1:15 and 15:29 of a 30-layer model, and the API in front of them."""
    peers = [start_peer(model, layers, base / f"peer{i}", *peer_extra) for i, layers in enumerate(("1:15", "15:29"))]
    try:
        return peers, start_server(model, peers, base / "api", *serve_extra)
    except Exception:
        for p in peers:
            p.stop()
        raise
