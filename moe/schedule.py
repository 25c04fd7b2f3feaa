"""When a layer competes: a pure function of (seed, total steps, layer count, rate, warm-up, cap).

Every rank computes the same plan without communicating, and a resumed run repeats the decisions
because nothing here depends on what happened during training.
"""

from __future__ import annotations

import numpy as np

from competesmoe.moe.config import CompetitionConfig

_SCHEDULE_STREAM = 0x5C4ED  # keeps the schedule's random stream apart from other uses of the seed


def competition_plan(seed: int, total_steps: int, num_layers: int, rate: float, warmup: float, cap: int) -> np.ndarray:
    """Boolean [total_steps, num_layers]: does layer l compete at optimizer step t (v2 schedule).

    After the first floor(warmup * total_steps) steps, each layer competes with probability `rate`,
    independently per step. A step never has more than `cap` competing layers: the surplus (chosen
    at random among the drawn layers) moves to the nearest step with room, later step first on ties.
    """
    plan = np.zeros((total_steps, num_layers), dtype=bool)
    first = min(int(warmup * total_steps), total_steps)
    if num_layers == 0 or rate <= 0 or first >= total_steps:
        return plan
    rng = np.random.default_rng([seed, _SCHEDULE_STREAM])
    plan[first:] = rng.random((total_steps - first, num_layers)) < rate
    for step in range(first, total_steps):
        drawn = np.flatnonzero(plan[step])
        if drawn.size <= cap:
            continue
        surplus = rng.permutation(drawn)[cap:]
        plan[step, surplus] = False
        for layer in surplus:
            target = _nearest_free_step(plan, step, layer, first, cap)
            if target is not None:
                plan[target, layer] = True
    return plan


def _nearest_free_step(plan: np.ndarray, step: int, layer: int, first: int, cap: int) -> int | None:
    total = plan.shape[0]
    for distance in range(1, total):
        for candidate in (step + distance, step - distance):
            if first <= candidate < total and not plan[candidate, layer] and plan[candidate].sum() < cap:
                return candidate
    return None


class CompetitionSchedule:
    """The plan for one run; `layers_at(step, micro)` names the MoE layers that compete."""

    def __init__(self, cfg: CompetitionConfig, seed: int, total_steps: int, num_layers: int, enabled: bool):
        self.cfg = cfg
        self.seed = seed
        self.num_layers = num_layers
        self.enabled = enabled and num_layers > 0 and cfg.rate > 0
        self.first_step = int(cfg.warmup * total_steps)
        self.plan = (competition_plan(seed, total_steps, num_layers, cfg.rate, cfg.warmup, cfg.cap)
                     if self.enabled and cfg.variant == "v2" else None)

    def layers_at(self, step: int, micro: int = 0) -> frozenset[int]:
        if not self.enabled or step < self.first_step:
            return frozenset()
        if self.plan is not None:
            if step >= self.plan.shape[0]:
                return frozenset()
            return frozenset(np.flatnonzero(self.plan[step]).tolist())
        # v1: every forward of every layer competes with probability `rate`, drawn per micro-batch.
        rng = np.random.default_rng([self.seed, _SCHEDULE_STREAM, step, micro])
        return frozenset(np.flatnonzero(rng.random(self.num_layers) < self.cfg.rate).tolist())
