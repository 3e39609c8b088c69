"""Measure the one-file app: file size, time to `--help`, and time from a no-argument start to the
dashboard answering and to the model being ready. Prints one JSON object (docs/benchmarks.md).

    .venv/bin/python packaging/pyinstaller/measure.py [--binary dist/edge-agent] [--runs 5]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import statistics
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from edge_agent.config import packaged_model

POLL_S = 0.01


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def answers(url: str) -> bytes | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as res:
            return res.read()
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return None


def time_help(binary: Path, runs: int) -> dict:
    walls, cpus = [], []
    for _ in range(runs):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        subprocess.run([str(binary), "--help"], check=True, capture_output=True)
        walls.append(time.perf_counter() - t0)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpus.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
    return {"help_wall_s_median": round(statistics.median(walls), 3), "help_wall_s_min": round(min(walls), 3),
            "help_cpu_s_median": round(statistics.median(cpus), 3)}


def time_start(binary: Path, model: Path, data: str, timeout_s: float = 300.0) -> dict:
    """One no-argument start: seconds until GET / answers, and until /api/app says ready."""
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    env = dict(os.environ, EDGE_AGENT_DATA_DIR=data, EDGE_AGENT_MODEL=str(model), EDGE_AGENT_APP_PORT=str(port),
               EDGE_AGENT_NO_BROWSER="1", EDGE_AGENT_MDNS_INTERFACE="127.0.0.1")
    t0 = time.perf_counter()
    proc = subprocess.Popen([str(binary)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = t0 + timeout_s
        while answers(url) is None and time.perf_counter() < deadline:
            time.sleep(POLL_S)
        dashboard = time.perf_counter() - t0
        while time.perf_counter() < deadline and json.loads(answers(url + "api/app") or b"{}").get("phase") != "ready":
            time.sleep(POLL_S)
        ready = time.perf_counter() - t0
        stop = urllib.request.Request(url + "api/app/stop", b"{}", {"Content-Type": "application/json"}, method="POST")
        urllib.request.urlopen(stop, timeout=10).read()
        t1 = time.perf_counter()
        proc.wait(60)
        return {"dashboard_s": round(dashboard, 3), "ready_s": round(ready, 3), "stop_s": round(time.perf_counter() - t1, 3)}
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--binary", type=Path, default=Path("dist/edge-agent"))
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--model", type=Path, default=packaged_model())
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as data:  # the first start writes this device's shards there; later ones reuse them
        first, *later = [time_start(args.binary, args.model, data) for _ in range(1 + max(1, args.runs // 2))]
    out = {"binary": str(args.binary), "size_mb": round(args.binary.stat().st_size / 2**20, 1), **time_help(args.binary, args.runs),
           "first_start": first,
           "start_to_dashboard_s_median": statistics.median(s["dashboard_s"] for s in later),
           "start_to_model_ready_s_median": statistics.median(s["ready_s"] for s in later),
           "stop_button_to_exit_s_median": statistics.median(s["stop_s"] for s in later),
           "model": args.model.name, "load_average": os.getloadavg()[0], "cpus": os.cpu_count()}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
