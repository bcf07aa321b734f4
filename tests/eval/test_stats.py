"""Standard errors of benchmark scores, against hand-computed values and a simulation."""

from __future__ import annotations

import math

import numpy as np

from flowopd.eval.stats import category_mean_se, diff_se, mean_se


def test_mean_se_by_hand():
    # scores 0, 1, 1, 0: mean 0.5, s^2 = 4 * 0.25 / 3 = 1/3, se = sqrt(1/3 / 4)
    assert math.isclose(mean_se([0, 1, 1, 0]), math.sqrt(1 / 12))
    assert mean_se([0.7]) == 0.0 and mean_se([]) == 0.0


def test_category_mean_se_by_hand_and_by_simulation():
    # a: [1, 0] -> s^2 = 0.5, se_a^2 = 0.5 / 2 = 0.25; b: [1, 1, 1] -> 0; se = sqrt(0.25) / 2
    assert math.isclose(category_mean_se([1, 0, 1, 1, 1], list("aabbb")), 0.25)
    # the spread of GenEval-style overall scores over redrawn prompts matches the formula
    rng = np.random.default_rng(0)
    p, n = np.array([0.9, 0.5, 0.2]), 50
    cats = [c for c in "abc" for _ in range(n)]
    overall = [rng.binomial(1, np.repeat(p, n)).reshape(3, n).mean(1).mean() for _ in range(4000)]
    want = math.sqrt((p * (1 - p) / n).sum()) / 3
    assert abs(np.std(overall) - want) < 0.05 * want
    one = rng.binomial(1, np.repeat(p, n))
    assert abs(category_mean_se(one.tolist(), cats) - want) < 0.25 * want


def test_diff_se():
    assert diff_se(0.03, 0.04) == 0.05 and diff_se(None, 0.02) == 0.02
