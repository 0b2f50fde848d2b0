"""Wilson intervals, Newcombe's interval of a difference, and the verdict `models compare` gives."""

from __future__ import annotations

import pytest

from orion_fsm import AgentScore, Tally, compare
from orion_fsm.evaluation import difference_interval, verdict, wilson_interval


@pytest.mark.parametrize(("correct", "total", "low", "high"), [
    (0, 10, 0.0, 0.2775),  # the normal approximation would give [0, 0]
    (5, 10, 0.2366, 0.7634),
    (10, 10, 0.7225, 1.0),
    (81, 263, 0.2553, 0.3662),  # Newcombe (1998), table I
])
def test_wilson_interval_matches_published_values(correct: int, total: int, low: float,
                                                  high: float) -> None:
    assert wilson_interval(correct, total) == pytest.approx((low, high), abs=1e-4)


def test_wilson_interval_of_nothing_is_everything() -> None:
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_difference_interval_matches_newcombes_worked_example() -> None:
    # Newcombe (1998), method 10: 56/70 - 48/80 = 0.2000, 95 % CI (0.0524, 0.3339).
    diff, low, high = difference_interval(48, 80, 56, 70)
    assert (diff, low, high) == pytest.approx((0.2, 0.0524, 0.3339), abs=1e-4)


@pytest.mark.parametrize(("low", "high", "expected"), [
    (0.01, 0.2, "better"),
    (-0.3, -0.02, "worse"),
    (-0.1, 0.1, "no significant difference"),
    (0.0, 0.2, "no significant difference"),  # touching 0 is not above it
])
def test_verdict_follows_the_interval(low: float, high: float, expected: str) -> None:
    assert verdict(low, high) == expected


def score(agent: str, correct: int, total: int) -> AgentScore:
    tally = Tally(correct, total)
    return AgentScore(agent, 0.0, tally, {"fact_en": tally})


@pytest.mark.parametrize(("a", "b", "expected"), [
    ((40, 127), (90, 127), "better"),
    ((90, 127), (40, 127), "worse"),
    ((60, 127), (66, 127), "no significant difference"),
    ((3, 5), (5, 5), "no significant difference"),  # too few questions to tell
])
def test_compare_says_whether_b_is_better(a: tuple[int, int], b: tuple[int, int],
                                          expected: str) -> None:
    result = compare(score("a", *a), score("b", *b))
    assert result.verdict == expected
    assert result.difference == pytest.approx(b[0] / b[1] - a[0] / a[1])
    assert result.low <= result.difference <= result.high
    assert result.as_dict()["verdict"] == expected
