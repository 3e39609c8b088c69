"""Planner benchmark: how long `plan_path` takes on a large swarm (pure computation).

    .venv/bin/python bench/planner.py [--rounds N]

The swarm is the one `tests/test_planner.py::test_large_swarm_plan_is_feasible` checks for
feasibility: 40 peers with random ranges and memory over an 80-layer model, plus a
backbone. Speed lives here, not in that test, so a loaded machine cannot fail it.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from test_planner import large_swarm  # noqa: E402

from edge_agent.split.planner import plan_path  # noqa: E402
from edge_agent.split.policy import PrivacyPolicy  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    peers = large_swarm()
    times = []
    for _ in range(args.rounds):
        t0 = time.perf_counter()
        plan = plan_path(80, PrivacyPolicy(), peers, target_tbt_ms=400, local_ms=15)
        times.append(time.perf_counter() - t0)
    print(f"plan_path, 41 peers, 80 layers: median {statistics.median(times) * 1000:.1f} ms, "
          f"max {max(times) * 1000:.1f} ms over {args.rounds} rounds; path {' '.join(plan.peer_ids)}")


if __name__ == "__main__":
    main()
