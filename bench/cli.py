"""The command line's own costs: time to `edge-agent --help`, and what a `join` node holds in
memory with given settings against edge_agent/sizing.py's estimate.

    .venv/bin/python bench/cli.py help                                  # median of 7 runs
    .venv/bin/python bench/cli.py memory --layers 1:15 --max-requests 8 # one node: RSS once ready

`memory` starts a real node (loopback, no mDNS, 1 thread), waits for its ready line, waits
1 s, reads VmRSS / VmHWM from /proc and stops it. Linux only (/proc).
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EXE = [sys.executable, "-m", "edge_agent"]


def time_help(runs: int = 7) -> None:
    took = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run([*EXE, "--help"], check=True, capture_output=True, cwd=ROOT)
        took.append(time.perf_counter() - t0)
    print(json.dumps({"help_s_median": round(statistics.median(took), 3), "help_s_min": round(min(took), 3), "runs": runs}))


def _proc_kb(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def node_memory(join_args: list[str]) -> None:
    from edge_agent.doctor import node_memory as estimate

    data_dir = tempfile.mkdtemp(prefix="bench-cli-")
    args = [*EXE, "join", "--data-dir", data_dir, "--host", "127.0.0.1", "--no-mdns", "--threads", "1", *join_args]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        line = proc.stdout.readline()
        if not line.startswith('{"ready"'):
            raise SystemExit(f"join did not start: {proc.stderr.read()[-2000:]}")
        ready = json.loads(line)["ready"]
        time.sleep(1.0)
        rss, hwm = _proc_kb(proc.pid, "VmRSS") / 1024, _proc_kb(proc.pid, "VmHWM") / 1024
    finally:
        proc.terminate()
        proc.wait(10)

    def opt(name: str, default):
        return type(default)(join_args[join_args.index(name) + 1]) if name in join_args else default

    a, b = ready["layers"]
    mem = opt("--max-memory", "")
    budget = float(mem[:-1]) * (1000 if mem.upper().endswith("G") else 1) if mem else None
    est = estimate(None, opt("--model", ""), f"{a}:{b}", opt("--ctx", 2048), opt("--max-requests", 2), budget)
    print(json.dumps({"args": " ".join(join_args), "layers": f"{a}:{b}", "rss_mb": round(rss), "peak_mb": round(hwm),
                      "estimate_mb": est.get("total_mb"), "estimated_requests": est.get("max_requests")}))


if __name__ == "__main__":
    if sys.argv[1:2] == ["help"]:
        time_help()
    elif sys.argv[1:2] == ["memory"]:
        node_memory(sys.argv[2:])
    else:
        raise SystemExit(__doc__)
