"""The retry policy: transient failures only, a bounded number of times, within the deadline."""

from __future__ import annotations

from typing import Any

import pytest

from orion_fsm import ConfigurationError, Retries, RetryPolicy


def test_a_transient_failure_is_retried_once_with_backoff() -> None:
    retries = Retries(RetryPolicy(backoff_s=0.02, jitter=0.5))
    first = retries.decide("malformed_output", 0, remaining_s=5.0)
    assert first.delay_s is not None and 0.01 <= first.delay_s <= 0.03
    assert retries.decide("malformed_output", 1, remaining_s=5.0).delay_s is None


@pytest.mark.parametrize("failure", ["breaker_open", "unavailable", None])
def test_what_a_second_try_cannot_fix_is_not_retried(failure: str | None) -> None:
    assert Retries().decide(failure, 0, remaining_s=5.0).delay_s is None


def test_no_retry_without_time_for_another_attempt_as_long_as_the_failed_one() -> None:
    retries = Retries(RetryPolicy(backoff_s=0.0, min_remaining_s=0.2))
    assert retries.decide("inference_failed", 0, remaining_s=0.5, attempt_s=0.1).delay_s == 0
    skipped = retries.decide("inference_failed", 0, remaining_s=0.5, attempt_s=0.8)
    assert skipped.delay_s is None and "before the deadline" in skipped.why


@pytest.mark.parametrize("config", [{"same_agent": -1}, {"backoff_s": -0.1},
                                    {"jitter": 2}, {"min_remaining_s": "soon"}])
def test_invalid_retry_policy_is_refused_naming_the_field(config: dict[str, Any]) -> None:
    with pytest.raises(ConfigurationError, match=next(iter(config))):
        RetryPolicy(**config)
