"""Planning at swarm scale: a discrete-event simulation of the control plane (issue 17).

    .venv/bin/python bench/swarm_sim.py [--nodes N] [--churn-per-min 0.05] [--minutes M] [--seed S]
                                        [--sybils 1000] [--tokens 32] [--clients C]
                                        [--spread 0] [--trial-share 1.0] [--no-newcomer-keys]
                                        [--refusal-memory S]

``--trial-share 0 --no-newcomer-keys`` is the client as it was before newcomer trials
(the "before" figures in docs/benchmarks.md); ``--spread 0.2`` spreads load (PlannerConfig.spread).

Real planner (``split/planner.py``), deadlines (``split/deadlines.py``) and failure handling
(``split/strategy.py``'s Router through ``split/star.py``), real signed capability records;
simulated devices, links, time and a Kademlia-style membership whose bytes are counted.
The model and the rule for newcomers: docs/discovery.md, "Planning at swarm scale".
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from swarmsim.nodes import N_LAYER, draw_node, rtt_ms, seeded_identity  # noqa: E402
from swarmsim.requests import LOCAL_MS, PLANNER, POLICY  # noqa: E402
from swarmsim.view import PROBATION_SHARE, Client  # noqa: E402
from swarmsim.world import Config, Results, World, median  # noqa: E402

from edge_agent.split.planner import plan_path  # noqa: E402


def pct(xs, q: float) -> float:
    return statistics.quantiles(xs, n=100)[q - 1] if len(xs) >= 2 else float("nan")


def report(r: Results, wall_s: float) -> list[tuple[str, str]]:
    c = r.config
    done = r.completed / r.requests if r.requests else float("nan")
    exact = r.exact / r.requests if r.requests else float("nan")
    steps = r.layer_steps
    total = sum(steps.values()) or 1
    batch = sum(v for (k, inter), v in steps.items() if not inter) or 1
    sybil = steps[("sybil", False)] + steps[("sybil", True)]
    fresh = steps[("newcomer", False)] + steps[("newcomer", True)]
    def within(xs) -> str:
        return f"{sum(1 for x in xs if x is not None and x <= 30.0)}/{len(xs)}"

    seen = [s for _, _, s, _, _ in r.joined]
    offered = [o for _, _, _, o, _ in r.joined]
    used = [u for *_, u in r.joined]
    gpu = [u for kind, *_, u in r.joined if kind == "gpu"]
    target = [u for _, eligible, *_, u in r.joined if eligible]
    rows = [
        ("nodes / clients / sybils", f"{c.nodes} / {c.clients} / {c.sybils}"
                                     f"{'' if c.staked_joiners else ' (joiners without stake)'}"),
        ("planner spread / trial share of batch requests", f"{c.spread:g} / {c.trial_share:g}"
                                                           f"{', newcomer keys' if c.newcomer_keys else ''}"),
        ("churn per minute, minutes", f"{c.churn_per_min:.0%}, {c.minutes:g}"),
        ("requests", f"{r.requests}"),
        ("completed with unchanged output", f"{exact:.2%} (completed {done:.2%}: {r.completed}, {r.reroutes} re-routes)"),
        ("failures", ", ".join(f"{k} x{v}" for k, v in r.failures.most_common(3)) or "none"),
        ("infeasible plans (checker)", f"{r.infeasible}"),
        ("out-of-turn view refreshes (no route in the view)", f"{r.refills}"),
        ("waits for a free slot: count, median / p95 / max s", f"{len(r.slot_waits)}, {median(r.slot_waits):.2f} / "
         f"{pct(r.slot_waits, 95):.2f} / {max(r.slot_waits, default=0):.2f}"),
        ("error replies (engine refusals)", ", ".join(f"{k} x{v}" for k, v in r.refusals.most_common()) or "none"),
        ("planning ms per request, median / p99", f"{median(r.plan_ms):.2f} / {pct(r.plan_ms, 99):.2f} wall, "
         f"{median(r.plan_cpu_ms):.2f} / {pct(r.plan_cpu_ms, 99):.2f} CPU"),
        ("candidates handed to the planner, median / max", f"{median(r.candidates):.0f} / {max(r.candidates, default=0)}"),
        ("re-planning ms, median / p99", f"{median(r.replan_ms):.2f} / {pct(r.replan_ms, 99):.2f} ({len(r.replan_ms)})"),
        ("time between tokens ms, median / p95", f"{median(r.tbt_ms):.0f} / {pct(r.tbt_ms, 95):.0f}; interactive "
         f"{median(r.tbt_interactive_ms):.0f} / {pct(r.tbt_interactive_ms, 95):.0f}"),
        ("control bytes per serving node per minute", f"{r.node_bytes_per_min:,.0f}"),
        ("  of which lookups / stores / gets (once per message)",
         " / ".join(f"{r.bytes_by_kind.get(k, 0):,.0f}" for k in ("find", "store", "get"))),
        ("control bytes per client per minute", f"{r.client_bytes_per_min:,.0f}"),
        ("signed record bytes (median)", f"{median(r.record_bytes):.0f}"),
        ("joiners in a client's view within 30 s", f"{within(seen)}; median "
         f"{median([s for s in seen if s is not None]):.1f} s"),
        ("joiners offered to a planner within 30 s", f"{within(offered)}; median "
         f"{median([o for o in offered if o is not None]):.1f} s"),
        ("joiners used within 30 s (all / GPUs)", f"{within(used)} / {within(gpu)}; median "
         f"{median([u for u in used if u is not None]):.1f} s"),
        ("joiners used at all; of those, within 30 s", f"{sum(u is not None for u in used)}; "
         f"{within([u for u in used if u is not None])}"),
        ("target's joiners (staked, up >= 30 s) used within 30 s", f"{within(target)} "
         f"({sum(1 for u in target if u is not None and u <= 30) / max(1, len(target)):.1%})"),
        ("KV slots in use, mean / p95 / max of each second", f"{statistics.fmean(r.slot_use or [0]):.0%} / "
         f"{pct(r.slot_use, 95):.0%} / {max(r.slot_use, default=0):.0%}"),
        ("sybil share of layer-steps (all / batch)", f"{sybil / total:.2%} / {steps[('sybil', False)] / batch:.2%} "
         f"(bound {PROBATION_SHARE:.0%} of batch)"),
        ("sybil hops on interactive requests", f"{r.sybil_interactive_hops}"),
        ("unstaked honest newcomers' share of layer-steps", f"{fresh / total:.2%}"),
        ("staked newcomers' (no history yet) share: interactive / batch",
         f"{r.unknown_steps[True] / max(1, total - batch):.2%} / {r.unknown_steps[False] / batch:.2%}"),
        ("simulation wall time", f"{wall_s:.0f} s"),
    ]
    return rows


def planner_scaling(seed: int, sizes: list[int]) -> None:
    """The real planner over a whole swarm vs over a client's pre-selected view of it."""
    rng = random.Random(seed)
    print(f"{'swarm':>6}  {'plan over all (ms)':>18}  {'expected ms':>11}  {'view':>4}  {'plan over view (ms)':>19}  "
          f"{'expected ms':>11}")
    for n in sizes:
        nodes = [draw_node(i, rng, 0.0) for i in range(n)]
        for node in nodes:
            node.reputation = round(rng.uniform(0.6, 1.0), 3)
        client = Client(-1, seeded_identity(rng).agent_id, (rng.random(), rng.random()), rng)
        everyone = [node.capability(rtt_ms(client.pos, node.pos), node.kv_capacity_mb, node.reputation) for node in nodes]
        t0 = time.perf_counter()
        full = plan_path(N_LAYER, POLICY, everyone, target_tbt_ms=500, local_ms=LOCAL_MS, mode="star")
        t1 = time.perf_counter()
        client.merge([(node, 0.0, node.kv_capacity_mb) for node in nodes], 0.0)
        t2 = time.perf_counter()
        view = client.candidates(0.0)
        mine = plan_path(N_LAYER, POLICY, view, target_tbt_ms=500, local_ms=LOCAL_MS, mode="star")
        t3 = time.perf_counter()
        print(f"{n:>6}  {(t1 - t0) * 1000:>18.1f}  {full.expected_ms:>11.1f}  {len(view):>4}  {(t3 - t2) * 1000:>19.2f}  "
              f"{mine.expected_ms:>11.1f}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", type=int, default=1000)
    ap.add_argument("--churn-per-min", type=float, default=0.05)
    ap.add_argument("--minutes", type=float, default=3.0)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--sybils", type=int, default=0)
    ap.add_argument("--clients", type=int, default=0, help="requesting devices (default: nodes / 20, at least 5)")
    ap.add_argument("--tokens", type=int, default=32, help="decode tokens per request (after an 8-position prefill)")
    ap.add_argument("--unstaked-joiners", action="store_true", help="honest joiners put up no stake (probation)")
    ap.add_argument("--spread", type=float, default=PLANNER.spread, help="PlannerConfig.spread (0: no load spread)")
    ap.add_argument("--trial-share", type=float, default=PLANNER.trial_share,
                    help="PlannerConfig.trial_share: batch requests newcomers are tried on (0: none)")
    ap.add_argument("--no-newcomer-keys", action="store_true", help="joiners are found through the segment keys only")
    ap.add_argument("--refusal-memory", type=float, default=float("inf"), metavar="S",
                    help="a client plans around a peer that refused it for S seconds (default: until a newer record)")
    ap.add_argument("--planner-scaling", type=int, nargs="*", metavar="N",
                    help="instead: time plan_path over swarms of N peers, all of them vs a client's view")
    args = ap.parse_args(argv)
    if args.planner_scaling is not None:
        planner_scaling(args.seed, args.planner_scaling or [100, 1000, 10000])
        return 0
    if (args.nodes < 20 or not 0 <= args.churn_per_min < 1 or args.minutes <= 1.0 or args.tokens < 1
            or args.spread < 0 or not 0 <= args.trial_share <= 1 or args.refusal_memory < 0):
        print("error: need --nodes >= 20, 0 <= --churn-per-min < 1, --minutes > 1, --tokens >= 1, --spread >= 0,"
              " 0 <= --trial-share <= 1, --refusal-memory >= 0", file=sys.stderr)
        return 2
    cfg = Config(nodes=args.nodes, churn_per_min=args.churn_per_min, minutes=args.minutes, seed=args.seed,
                 sybils=args.sybils, clients=args.clients or max(5, args.nodes // 20), tokens=args.tokens,
                 staked_joiners=not args.unstaked_joiners, spread=args.spread, trial_share=args.trial_share,
                 newcomer_keys=not args.no_newcomer_keys, full_for_s=args.refusal_memory)
    t0 = time.perf_counter()
    result = World(cfg).run()
    rows = report(result, time.perf_counter() - t0)
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
