"""Paired comparisons over seeds: two methods run with the same seed share the data order (and the initial weights
where their shapes agree), so the per-seed difference cancels what the seed does to both, and a paired t interval
over seeds resolves much smaller effects than overlapping mean ± std bands."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass


def t_two_sided_cdf(t: float, df: int) -> float:
    """P(|T| <= t) for Student's t with `df` (integer >= 1) degrees of freedom, t >= 0, in closed form
    (Abramowitz and Stegun 26.7.3-4: a finite series in cos(theta), theta = atan(t / sqrt(df)))."""
    theta = math.atan(t / math.sqrt(df))
    c2 = math.cos(theta) ** 2
    if df % 2 == 0:  # sin(theta) * (1 + 1/2 c^2 + 1*3/(2*4) c^4 + ... up to c^(df-2))
        term, total = 1.0, 1.0
        for j in range(2, df, 2):
            term *= c2 * (j - 1) / j
            total += term
        return math.sin(theta) * total
    if df == 1:
        return 2 * theta / math.pi
    # (2/pi) (theta + sin(theta) cos(theta) (1 + 2/3 c^2 + 2*4/(3*5) c^4 + ... up to c^(df-3)))
    term, total = 1.0, 1.0
    for j in range(3, df - 1, 2):
        term *= c2 * (j - 1) / j
        total += term
    return 2 / math.pi * (theta + math.sin(theta) * math.cos(theta) * total)


def t_quantile(level: float, df: int) -> float:
    """The t with P(|T| <= t) = level (e.g. 0.95: the two-sided 95% critical value), by bisection."""
    if not 0 < level < 1 or df < 1:
        raise ValueError(f"t_quantile needs 0 < level < 1 and df >= 1 (got {level}, {df})")
    lo, hi = 0.0, 1.0
    while t_two_sided_cdf(hi, df) < level:
        hi *= 2
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_two_sided_cdf(mid, df) < level else (lo, mid)
    return (lo + hi) / 2


@dataclass(frozen=True)
class Paired:
    """The per-seed differences of one method against a reference (method - reference) and their t interval."""

    seeds: list[int]
    differences: list[float]
    level: float = 0.95

    @property
    def n(self) -> int:
        return len(self.differences)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.differences)

    @property
    def half_width(self) -> float:
        """Half the interval: t(level, n-1) * sd / sqrt(n); nan with fewer than two pairs."""
        if self.n < 2:
            return float("nan")
        return t_quantile(self.level, self.n - 1) * statistics.stdev(self.differences) / math.sqrt(self.n)

    @property
    def interval(self) -> tuple[float, float]:
        return self.mean - self.half_width, self.mean + self.half_width

    def verdict(self, lower_is_better: bool = True) -> str:
        """'better' / 'worse' when the interval excludes 0, else 'not resolved'."""
        lo, hi = self.interval
        if not (math.isfinite(lo) and math.isfinite(hi)) or lo <= 0 <= hi:
            return "not resolved"
        return "better" if (hi < 0) == lower_is_better else "worse"


def paired(ours: dict[int, float], reference: dict[int, float], level: float = 0.95) -> Paired:
    """The pairs of the seeds both have: {seed: value} each."""
    seeds = sorted(set(ours) & set(reference))
    return Paired(seeds, [ours[s] - reference[s] for s in seeds], level)
