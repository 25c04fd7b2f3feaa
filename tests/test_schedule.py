"""The competition schedule: rate, warm-up, cap, determinism."""

import numpy as np

from competesmoe.moe.config import CompetitionConfig
from competesmoe.moe.schedule import CompetitionSchedule, _nearest_free_step, competition_plan


def test_rate_matches_the_draws_after_warmup():
    plan = competition_plan(seed=3, total_steps=20000, num_layers=4, rate=0.07, warmup=0.1, cap=4)
    assert not plan[:2000].any()
    rate = plan[2000:].mean()
    assert abs(rate - 0.07) < 0.005  # binomial std ~0.001 for 72000 draws


def test_cap_limits_layers_per_step_and_moves_surplus():
    uncapped = competition_plan(seed=5, total_steps=2000, num_layers=8, rate=0.15, warmup=0.0, cap=8)
    capped = competition_plan(seed=5, total_steps=2000, num_layers=8, rate=0.15, warmup=0.0, cap=2)
    assert uncapped.sum(1).max() > 2
    assert capped.sum(1).max() <= 2
    # surplus draws move to other steps (there is room), so no draw is lost and each layer keeps its count
    assert np.array_equal(capped.sum(0), uncapped.sum(0))


def test_surplus_moves_to_nearest_free_step_later_first():
    plan = np.zeros((10, 3), dtype=bool)
    plan[6, 0] = True  # layer 0 already competes at step 6
    plan[4, 1] = plan[4, 2] = True  # step 4 is full at cap 2
    assert _nearest_free_step(plan, step=5, layer=0, first=0, cap=2) == 7
    assert _nearest_free_step(plan, step=5, layer=1, first=0, cap=2) == 6
    plan[6, 1] = True  # now step 6 is full
    assert _nearest_free_step(plan, step=5, layer=2, first=0, cap=2) == 7
    assert _nearest_free_step(plan, step=9, layer=2, first=0, cap=2) == 8


def test_plan_is_a_pure_function_of_its_arguments():
    a = competition_plan(seed=11, total_steps=500, num_layers=6, rate=0.1, warmup=0.05, cap=3)
    b = competition_plan(seed=11, total_steps=500, num_layers=6, rate=0.1, warmup=0.05, cap=3)
    c = competition_plan(seed=12, total_steps=500, num_layers=6, rate=0.1, warmup=0.05, cap=3)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_schedule_object_queries_the_plan():
    cfg = CompetitionConfig(rate=0.2, warmup=0.1, cap=2)
    sched = CompetitionSchedule(cfg, seed=1, total_steps=300, num_layers=4, enabled=True)
    plan = competition_plan(1, 300, 4, 0.2, 0.1, 2)
    for step in range(300):
        assert sched.layers_at(step) == frozenset(np.flatnonzero(plan[step]).tolist())
    assert all(sched.layers_at(s) == frozenset() for s in range(30))
    off = CompetitionSchedule(cfg, seed=1, total_steps=300, num_layers=4, enabled=False)
    assert all(off.layers_at(s) == frozenset() for s in range(300))


def test_v1_draws_per_micro_batch():
    cfg = CompetitionConfig(rate=0.5, warmup=0.0, variant="v1")
    sched = CompetitionSchedule(cfg, seed=1, total_steps=100, num_layers=4, enabled=True)
    draws = [sched.layers_at(s, m) for s in range(50) for m in range(2)]
    assert any(draws[2 * i] != draws[2 * i + 1] for i in range(50))
    assert sched.layers_at(7, 1) == CompetitionSchedule(cfg, 1, 100, 4, True).layers_at(7, 1)
    share = np.mean([len(d) / 4 for d in draws])
    assert abs(share - 0.5) < 0.1


def test_v1_regime_competes_on_every_forward_of_every_layer():
    """The v1 scripts' --freq 1.0 with no warm-up (moe/presets.py 'competesmoe-v1')."""
    cfg = CompetitionConfig(variant="v1", rate=1.0, warmup=0.0, cap=1)  # the cap is the v2 plan's, not v1's
    sched = CompetitionSchedule(cfg, seed=3, total_steps=20, num_layers=4, enabled=True)
    assert all(sched.layers_at(s, m) == frozenset(range(4)) for s in range(20) for m in range(3))
