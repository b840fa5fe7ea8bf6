"""moectl/common/paired.py: the arithmetic of comparisons over seeds, against hand-computed values."""

from __future__ import annotations

import math

import pytest

from moectl.common.paired import Rule, first_reach, mean_ci, paired, t975, value_at, verdict


def test_t975_matches_the_table_and_approaches_the_normal_quantile():
    assert t975(1) == 12.706 and t975(2) == 4.303 and t975(15) == 2.131
    assert abs(t975(30) - 2.042) < 1e-3 and abs(t975(1000) - 1.962) < 1e-3


def test_mean_ci_is_students_t_interval():
    mean, half = mean_ci([1.0, 2.0, 3.0])
    assert mean == 2.0 and half == pytest.approx(4.303 * 1.0 / math.sqrt(3))
    assert math.isnan(mean_ci([5.0])[1]) and math.isnan(mean_ci([])[0])
    assert mean_ci([1.0, float("nan"), 3.0]) == mean_ci([1.0, 3.0])


def test_paired_differences_are_matched_by_seed():
    arm = {1: 3.0, 2: 3.2, 3: 2.9, 4: 9.9}  # seed 4 has no baseline: left out
    base = {1: 3.1, 2: 3.4, 3: 3.0, 5: 1.0}
    p = paired(arm, base, Rule(margin=0.3))
    assert p.diffs == pytest.approx({1: -0.1, 2: -0.2, 3: -0.1}) and p.n == 3
    sd = math.sqrt(((0.1 / 3) ** 2 + (0.2 / 3) ** 2 + (0.1 / 3) ** 2) / 2)  # the differences' sample SD
    assert p.mean == pytest.approx(-0.4 / 3) and p.half == pytest.approx(4.303 * sd / math.sqrt(3))
    # [-0.2768, 0.0101] holds 0, and lies inside the ±0.3 margin but not inside ±0.1.
    assert p.verdict == "equivalent within ±0.3"
    assert paired(arm, base, Rule(margin=0.1)).verdict == "inconclusive"
    assert paired(arm, base, Rule()).verdict == "inconclusive"  # no margin: never "equivalent"


def test_verdicts_follow_the_declared_direction():
    p = paired({1: 2.9, 2: 2.88, 3: 2.89}, {1: 3.0, 2: 3.0, 3: 3.0}, Rule())  # -0.1, -0.12, -0.11
    assert p.mean == pytest.approx(-0.11) and p.half == pytest.approx(4.303 * 0.01 / math.sqrt(3))
    assert p.verdict == "better"  # [-0.135, -0.085]: lower, and lower is better
    assert paired({1: 2.9, 2: 2.88, 3: 2.89}, {1: 3.0, 2: 3.0, 3: 3.0}, Rule(better="higher")).verdict == "worse"
    assert verdict(0.5, 0.1, Rule()) == "worse" and verdict(0.5, 0.1, Rule(better="higher")) == "better"
    # Significant and inside the margin at once: the difference is real, so it is not called equivalent.
    assert verdict(-0.02, 0.01, Rule(margin=0.05)) == "better"
    assert verdict(-0.02, float("nan"), Rule(margin=1.0)) == "inconclusive"  # one seed: no interval, no verdict
    with pytest.raises(ValueError, match="better='less'"):
        Rule(better="less")


def test_curves_are_read_piecewise_linearly():
    steps, loss = [0.0, 10.0, 20.0], [5.0, 3.0, 2.0]
    assert value_at(steps, loss, 15.0) == 2.5 and value_at(steps, loss, 10.0) == 3.0 and value_at(steps, loss, 0.0) == 5.0
    assert math.isnan(value_at(steps, loss, 25.0)) and math.isnan(value_at([], [], 1.0))
    assert first_reach(steps, loss, 2.5) == 15.0  # between steps 10 (3.0) and 20 (2.0)
    assert first_reach(steps, loss, 6.0) == 0.0 and first_reach(steps, loss, 1.0) is None
    assert first_reach(steps, [1.0, 2.0, 4.0], 3.0, lower_is_better=False) == 15.0
