"""The swarm simulation (bench/swarm_sim.py): small swarms, a few simulated minutes, seconds of CPU.

It drives the real planner, Router, StarStrategy and DeadlineTracker over simulated links;
the only fake is the link (a hop computed at once, its duration simulated), since a
10,000-node swarm with churn cannot be caused for real. No timing is asserted here: the
figures live in docs/benchmarks.md.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

from swarmsim.dht import K, Dht  # noqa: E402
from swarmsim.nodes import SWARM, draw_node, sealed_record  # noqa: E402
from swarmsim.view import PROBATION_SHARE, trial_slices  # noqa: E402
from swarmsim.world import Config, World  # noqa: E402

from edge_agent.discovery.capabilities import decode_txt  # noqa: E402
from edge_agent.discovery.identity import Identity  # noqa: E402


@pytest.fixture(scope="module")
def churned():
    """200 nodes, 5% of them leaving (and as many joining) per minute, 50 Sybils, 4 minutes;
    half the requests are batch ones, so the probation quota opens."""
    return World(Config(nodes=200, churn_per_min=0.05, minutes=4.0, seed=7, sybils=50, clients=20, tokens=16,
                        interactive_share=0.5)).run()


def test_requests_complete_with_unchanged_output_under_churn(churned):
    r = churned
    assert r.requests >= 100
    assert r.reroutes > 0  # churn did hit running requests, and they were re-routed
    assert r.exact == r.completed  # every completed request's output equals the reference
    assert r.completed / r.requests >= 0.97, r.failures


def test_every_plan_of_the_real_planner_is_feasible(churned):
    assert churned.plan_ms and churned.replan_ms
    assert churned.infeasible == 0


def test_sybils_get_no_interactive_hop_and_a_bounded_share(churned):
    steps = churned.layer_steps
    batch = sum(v for (_, interactive), v in steps.items() if not interactive)
    assert churned.sybil_interactive_hops == 0
    assert steps[("sybil", True)] == 0
    assert steps[("sybil", False)] > 0  # they were let in (the quota opened), and no further than it says
    assert steps[("sybil", False)] <= PROBATION_SHARE * batch  # the quota: charged before a request runs


def test_joiners_are_used_and_control_bytes_counted(churned):
    assert any(used is not None for *_, used in churned.joined)
    assert churned.node_bytes_per_min > 0 and churned.client_bytes_per_min > 0
    assert set(churned.bytes_by_kind) == {"find", "store", "get"}


def test_staked_joiners_are_used_within_30_simulated_seconds(churned):
    """The target's joiners (staked, up for their first 30 s): every one used within 30 s here,
    through newcomer keys and trials on batch requests; never more than the batch work."""
    target = [used for _, eligible, *_, used in churned.joined if eligible]
    assert len(target) >= 10
    assert all(used is not None and used <= 30.0 for used in target)
    batch = sum(v for (_, interactive), v in churned.layer_steps.items() if not interactive)
    assert 0 < churned.unknown_steps[False] < 0.5 * batch


def test_trial_slices_give_overlapping_newcomers_their_own_layers():
    rng = random.Random(4)
    nodes = [draw_node(i, rng, 0.0) for i in range(4)]
    for node, span in zip(nodes, [(1, 9), (1, 7), (3, 12), (1, 9)]):
        node.span = span
    slices = trial_slices(nodes)
    assert len(slices) == 4
    for node in nodes:
        a, b = slices[node.idx]
        assert node.span[0] <= a < b <= node.span[1]  # inside what it serves
    taken = sorted(slices.values())
    assert all(x[1] <= y[0] for x, y in zip(taken, taken[1:]))  # no two share a layer


def test_records_are_real_signed_records():
    node = draw_node(0, random.Random(3), 0.0)
    assert 200 < node.record_bytes <= 400
    ident = Identity.generate()
    caps = decode_txt(sealed_record(ident, node.span, 100, node.claimed_ms, "llamacpp"))
    assert caps.verify(SWARM) and caps.agent_id == ident.agent_id


def test_kademlia_lookup_finds_the_k_closest():
    rng = random.Random(5)
    dht = Dht(rng)
    ids = [rng.getrandbits(64) for _ in range(2000)]
    for i, x in enumerate(ids):
        dht.join(x, i)
    for _ in range(20):
        target = rng.getrandbits(64)
        assert dht.lookup(-1, rng.getrandbits(64), target) == sorted(ids, key=lambda x: x ^ target)[:K]
    assert dht.queries / dht.lookups < 40  # O(log n) messages, not a walk over the swarm
