"""Load spread and newcomer trials in the planner (``PlannerConfig.spread`` / ``trial_share``):
deterministic per request key, off without one, and never at the cost of the target."""

from __future__ import annotations

import pytest

from edge_agent.split.planner import PeerCapability, PlannerConfig, plan_path
from edge_agent.split.policy import PrivacyPolicy
from edge_agent.split.spread import is_trial, peer_weights, unit_draw

POLICY = PrivacyPolicy(k=1, m=1)
N_LAYER = 10  # remote range [1, 9)
KEYS = [i.to_bytes(16, "big") for i in range(400)]


def peer(pid: str, ms: float, rtt: float = 10.0, reputation: float | None = 0.9, rng=(1, 9)) -> PeerCapability:
    return PeerCapability(pid, (rng,), 1000.0, ms, rtt, reputation=reputation)


def plan(peers, key=None, eligible=False, target=500.0, **cfg):
    return plan_path(N_LAYER, POLICY, peers, target_tbt_ms=target, mode="star", config=PlannerConfig(**cfg),
                     request_key=key, trial_eligible=eligible)


def test_unit_draw_is_uniform_and_fixed_by_its_inputs():
    draws = [unit_draw(k, "p") for k in KEYS]
    assert draws == [unit_draw(k, "p") for k in KEYS]
    assert all(0.0 <= d < 1.0 for d in draws)
    assert 0.4 < sum(draws) / len(draws) < 0.6
    assert unit_draw(KEYS[0], "p") != unit_draw(KEYS[0], "q")


def test_without_a_request_key_the_knobs_change_nothing():
    peers = [peer("a", 2.0), peer("b", 2.1), peer("new", 5.0, reputation=None)]
    base = plan(peers)
    assert plan(peers, spread=0.5, trial_share=1.0, eligible=True) == base
    assert peer_weights([("a", 0.9)], None, 0.5, True, 0.1) == {}


def test_spread_shares_near_equal_peers_and_is_deterministic():
    peers = [peer("a", 2.0), peer("b", 2.1)]
    firsts = [plan(peers, k, spread=0.2).peer_ids for k in KEYS]
    share_b = sum(ids == ("b",) for ids in firsts) / len(firsts)
    assert 0.2 < share_b < 0.5  # b is 5% slower: it wins some requests, a most
    assert firsts == [plan(list(reversed(peers)), k, spread=0.2).peer_ids for k in KEYS]  # order-independent
    assert all(plan(peers, k).peer_ids == ("a",) for k in KEYS)  # no spread: always the best


def test_spread_never_picks_a_peer_worse_than_its_bound():
    peers = [peer("a", 2.0), peer("slow", 3.0)]  # 50% slower per layer, same rtt: > 20% worse
    assert all(plan(peers, k, spread=0.2).peer_ids == ("a",) for k in KEYS)


def test_trial_share_selects_that_share_of_keys():
    share = sum(is_trial(k, 0.25) for k in KEYS) / len(KEYS)
    assert 0.18 < share < 0.32
    assert not any(is_trial(k, 0.0) for k in KEYS) and not is_trial(None, 1.0)
    assert all(is_trial(k, 1.0) for k in KEYS)


def test_trial_puts_a_newcomer_on_eligible_requests_only():
    peers = [peer("est", 1.0), peer("new", 4.0, reputation=None)]
    trial = [k for k in KEYS if is_trial(k, 0.5)]
    other = [k for k in KEYS if not is_trial(k, 0.5)]
    assert all(plan(peers, k, eligible=True, trial_share=0.5).peer_ids == ("new",) for k in trial)
    assert all(plan(peers, k, eligible=True, trial_share=0.5).peer_ids == ("est",) for k in other)
    assert all(plan(peers, k, eligible=False, trial_share=1.0).peer_ids == ("est",) for k in KEYS)  # latency-critical


def test_trial_gives_overlapping_newcomers_turns():
    peers = [peer("est", 1.0), peer("n1", 4.0, reputation=None), peer("n2", 4.0, reputation=None)]
    used = {plan(peers, k, eligible=True, trial_share=1.0, trial_weight=0.1).peer_ids for k in KEYS[:100]}
    assert used == {("n1",), ("n2",)}


def test_trial_that_misses_the_target_falls_back():
    peers = [peer("est", 1.0), peer("new", 100.0, reputation=None)]  # 8 layers x 100 ms: misses 500 ms
    for k in KEYS[:50]:
        got = plan(peers, k, eligible=True, trial_share=1.0)
        assert got.peer_ids == ("est",) and got.meets_target


def test_trial_with_previous_keeps_healthy_hops():
    peers = [peer("a", 1.0, rng=(1, 5)), peer("b", 1.0, rng=(5, 9)), peer("c", 1.2, rng=(5, 9))]
    first = plan(peers)
    assert first.peer_ids == ("a", "b")
    newcomer = peer("new", 3.0, reputation=None, rng=(1, 9))
    again = plan_path(N_LAYER, POLICY, peers + [newcomer], target_tbt_ms=500, mode="star", previous=first,
                      exclude={"b"}, config=PlannerConfig(trial_share=1.0), request_key=KEYS[0], trial_eligible=True)
    assert again.peer_ids[0] == "a" and again.hops[0].end == 5  # the kept hop stays
    assert again.peer_ids[1] == "new"  # the gap went to the newcomer on this trial request


@pytest.mark.parametrize("kw", [dict(spread=-0.1), dict(trial_share=1.5), dict(trial_weight=-1.0), dict(spread=float("nan"))])
def test_config_rejects_bad_values(kw):
    with pytest.raises(ValueError):
        PlannerConfig(**kw)


def test_request_key_must_be_bytes():
    with pytest.raises(ValueError):
        plan([peer("a", 1.0)], key="not-bytes")  # type: ignore[arg-type]
