"""Standard errors of benchmark scores: how far a score moves if the prompts are redrawn.

- A mean of per-image scores (toy-OCR, toy-quality, OCR): ``se = s / sqrt(n)``, ``s`` the
  sample standard deviation (ddof 1).
- GenEval's overall, the unweighted mean of C per-category accuracies ``p_c`` over ``n_c``
  prompts each: categories are independent, so
  ``se = sqrt(sum_c s_c^2 / n_c) / C`` with ``s_c^2 = p_c (1 - p_c) n_c / (n_c - 1)``.
- A difference of two independent scores: ``se = sqrt(se_a^2 + se_b^2)``.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence


def mean_se(scores: Sequence[float]) -> float:
    """Standard error of the mean of ``scores`` (0 for fewer than 2)."""
    n = len(scores)
    if n < 2:
        return 0.0
    m = sum(scores) / n
    return math.sqrt(sum((x - m) ** 2 for x in scores) / (n - 1) / n)


def category_mean_se(scores: Sequence[float], categories: Sequence[str]) -> float:
    """Standard error of the unweighted mean over categories of per-category means.

    >>> round(category_mean_se([1, 0, 1, 1], ["a", "a", "b", "b"]), 4)  # sqrt(0.5/2)/2
    0.25
    """
    if len(scores) != len(categories):
        raise ValueError(f"{len(scores)} scores but {len(categories)} categories")
    per: dict[str, list[float]] = defaultdict(list)
    for s, c in zip(scores, categories, strict=True):
        per[c].append(float(s))
    if not per:
        return 0.0
    return math.sqrt(sum(mean_se(v) ** 2 for v in per.values())) / len(per)


def diff_se(*ses: float | None) -> float:
    """Standard error of a sum or difference of independent scores (None counts as 0)."""
    return math.sqrt(sum((s or 0.0) ** 2 for s in ses))
