"""Intervals for accuracies measured on a labelled set: Wilson's score interval for one
proportion, Newcombe's hybrid score interval for the difference of two, and the verdict it gives."""

from __future__ import annotations

import math
from typing import Literal

__all__ = ["Z_95", "Verdict", "difference_interval", "verdict", "wilson_interval"]

Z_95 = 1.959963984540054  # two-sided 95 %
Verdict = Literal["better", "worse", "no significant difference"]


def wilson_interval(correct: int, total: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson's score interval for correct/total (good at small n and near 0 or 1, where the
    normal approximation gives bounds outside [0, 1]); (0, 1) for no observation."""
    if total <= 0:
        return 0.0, 1.0
    p = correct / total
    z2 = z * z
    centre = (p + z2 / (2 * total)) / (1 + z2 / total)
    half = z / (1 + z2 / total) * math.sqrt(p * (1 - p) / total + z2 / (4 * total * total))
    return max(0.0, centre - half), min(1.0, centre + half)


def difference_interval(correct_a: int, total_a: int, correct_b: int, total_b: int,
                        z: float = Z_95) -> tuple[float, float, float]:
    """B's accuracy minus A's, with Newcombe's hybrid score interval (his method 10, from the
    two Wilson intervals). It treats A and B as independent samples: on the same questions
    (paired) it is conservative, so a difference it calls significant is one."""
    pa = correct_a / total_a if total_a else 0.0
    pb = correct_b / total_b if total_b else 0.0
    low_a, high_a = wilson_interval(correct_a, total_a, z)
    low_b, high_b = wilson_interval(correct_b, total_b, z)
    diff = pb - pa
    low = diff - math.sqrt((pb - low_b) ** 2 + (high_a - pa) ** 2)
    high = diff + math.sqrt((high_b - pb) ** 2 + (pa - low_a) ** 2)
    return diff, max(-1.0, low), min(1.0, high)


def verdict(low: float, high: float) -> Verdict:
    """What an interval of B minus A says: B better when it lies above 0, worse below."""
    if low > 0:
        return "better"
    if high < 0:
        return "worse"
    return "no significant difference"
