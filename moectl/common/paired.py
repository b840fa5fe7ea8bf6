"""Comparisons over seeds, the way a reviewer reads them.

- `mean_ci`: a mean and the half-width of its 95% Student-t interval.
- `paired`: an arm against a baseline trained on the same seeds. The per-seed differences
  d_s = arm_s - baseline_s, their mean, and the 95% t-interval of that mean. Only seeds both
  sides finished count. A paired interval is narrower than the two groups' own intervals
  whenever seeds move both sides alike.
- `verdict`: the word a rule declared before the run gives an interval. With lower better (a
  loss): `better` when the whole interval is below 0, `worse` when it is above 0; otherwise
  `equivalent within ±m` when it lies inside [-m, m] (the declared margin m; two one-sided tests
  at 2.5% each), and `inconclusive` when it does none of these. A sign pattern alone (3 of 3 seeds)
  is never a verdict.
- `value_at` and `first_reach`: reading a learning curve, piecewise linear between its points,
  at a given x (the loss at equal training seconds), or where it first reaches a value (the
  steps a baseline needs to reach an arm's final loss: Switch Transformer's speed-up measure).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

# Student's t 97.5% quantiles for 1..15 degrees of freedom.
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131)
NAN = float("nan")


def t975(df: int) -> float:
    """Student's t 97.5% quantile: the table to 15 degrees of freedom, then the Cornish-Fisher
    expansion (within 0.001 of the exact value from 16 on)."""
    if df <= len(T975):
        return T975[df - 1]
    z = 1.959964
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def mean_ci(values: list[float]) -> tuple[float, float]:
    """(mean, half-width of the 95% confidence interval of the mean: t * s / sqrt(n)); NaN values
    are left out; NaN half-width for n < 2."""
    values = [v for v in values if v == v]
    n = len(values)
    if n == 0:
        return NAN, NAN
    mean = sum(values) / n
    if n < 2:
        return mean, NAN
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, t975(n - 1) * sd / math.sqrt(n)


@dataclass(frozen=True)
class Rule:
    """How a comparison is judged, declared before the run: which direction is better for the
    metric, and the margin within which two arms count as equivalent (0: no equivalence verdict)."""

    better: str = "lower"  # "lower" (a loss) or "higher"
    margin: float = 0.0

    def __post_init__(self) -> None:
        if self.better not in ("lower", "higher"):
            raise ValueError(f"better={self.better!r} must be lower or higher")
        if not self.margin >= 0:
            raise ValueError(f"margin={self.margin} must be >= 0")


def verdict(mean: float, half: float, rule: Rule) -> str:
    """The rule's word for the interval mean ± half of (arm - baseline)."""
    if mean != mean or half != half:
        return "inconclusive"
    lo, hi = mean - half, mean + half
    gain_lo, gain_hi = (-hi, -lo) if rule.better == "lower" else (lo, hi)  # the arm's gain over the baseline
    if gain_lo > 0:
        return "better"
    if gain_hi < 0:
        return "worse"
    if rule.margin > 0 and -rule.margin <= lo and hi <= rule.margin:
        return f"equivalent within ±{rule.margin:g}"
    return "inconclusive"


@dataclass
class Paired:
    """An arm against its baseline over the seeds both finished."""

    mean: float  # mean of arm - baseline
    half: float  # half-width of its 95% t-interval
    diffs: dict = field(default_factory=dict)  # seed -> arm - baseline
    verdict: str = "inconclusive"

    @property
    def n(self) -> int:
        return len(self.diffs)

    def to_dict(self) -> dict:
        return {"mean": self.mean, "ci95": self.half, "n": self.n, "diffs": dict(self.diffs), "verdict": self.verdict}


def paired(arm: dict, baseline: dict, rule: Rule) -> Paired:
    """`arm` and `baseline`: seed -> metric. Seeds missing on either side, or NaN, are left out."""
    try:
        seeds = sorted(arm)
    except TypeError:  # seeds of mixed types
        seeds = sorted(arm, key=str)
    diffs = {s: arm[s] - baseline[s] for s in seeds if s in baseline and arm[s] == arm[s] and baseline[s] == baseline[s]}
    mean, half = mean_ci(list(diffs.values()))
    return Paired(mean, half, diffs, verdict(mean, half, rule))


def value_at(xs: list[float], ys: list[float], x: float) -> float:
    """The curve through (xs, ys), xs increasing, at `x` by linear interpolation; NaN outside it."""
    if not xs or x < xs[0] or x > xs[-1]:
        return NAN
    for (x0, y0), (x1, y1) in zip(zip(xs, ys), zip(xs[1:], ys[1:])):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return ys[-1]  # x == xs[-1] with a single point


def first_reach(xs: list[float], ys: list[float], target: float, lower_is_better: bool = True) -> Optional[float]:
    """The first x at which the curve through (xs, ys), linear between points, reaches `target`
    (at or below it when lower is better); None when it never does."""
    reached = (lambda y: y <= target) if lower_is_better else (lambda y: y >= target)
    for i, (x, y) in enumerate(zip(xs, ys)):
        if reached(y):
            if i == 0:
                return x
            x0, y0 = xs[i - 1], ys[i - 1]
            return x0 + (x - x0) * (target - y0) / (y - y0)
    return None
