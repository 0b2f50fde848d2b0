"""Retrying a transient failure on the same agent: a bounded number of times, with jittered
backoff, and only while the request's deadline leaves room for another attempt. The request
machine's `fallback` phase asks `Retries.decide()`; replay answers as the recording did.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Final

from orion_fsm._exceptions import ConfigurationError

__all__ = ["TRANSIENT_FAILURES", "Retries", "RetryDecision", "RetryPolicy"]

# What a second try of the same model may fix: a sampling error, garbage output, a load the
# runtime refused. Not a breaker refusal, a missing file, or a prompt too long.
TRANSIENT_FAILURES: Final = frozenset({"inference_failed", "malformed_output", "load_failed"})


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How often and how soon a failed agent is tried again before falling back."""

    same_agent: int = 1  # retries of one agent, per request, before its fallback
    backoff_s: float = 0.02  # before the first retry; doubles for each further one
    jitter: float = 0.5  # the delay varies by up to this fraction, so retries do not align
    # The deadline must still leave this much after the backoff: a retry that cannot finish
    # only takes the time the fallback agent needs.
    min_remaining_s: float = 0.2

    def __post_init__(self) -> None:
        if isinstance(self.same_agent, bool) or not isinstance(self.same_agent, int) \
                or self.same_agent < 0:
            raise ConfigurationError("RetryPolicy.same_agent", self.same_agent,
                                     "an integer >= 0 (0: never retry)")
        for name in ("backoff_s", "min_remaining_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
                raise ConfigurationError(f"RetryPolicy.{name}", value,
                                         "a number of seconds >= 0")
        if not isinstance(self.jitter, int | float) or not 0 <= self.jitter <= 1:
            raise ConfigurationError("RetryPolicy.jitter", self.jitter, "a fraction in [0, 1]")


@dataclass(frozen=True, slots=True)
class RetryDecision:
    """Retry after `delay_s` seconds, or (delay_s None) fall back, for the reason `why`."""

    delay_s: float | None
    why: str


class Retries:
    """The engine's retry service: decides, failure by failure, whether to try the same agent
    again. Stateless between requests; the request counts its own retries."""

    def __init__(self, policy: RetryPolicy | None = None) -> None:
        self.policy = policy or RetryPolicy()

    def decide(self, failure: str | None, retried: int, remaining_s: float,
               attempt_s: float = 0.0) -> RetryDecision:
        """After a failure of kind `failure` on an agent already retried `retried` times, with
        `remaining_s` left before the request's deadline. The failed attempt took `attempt_s`
        (queueing for the model included): a retry is expected to take as long, so it is only
        worth it if that much is left after the backoff."""
        policy = self.policy
        if failure not in TRANSIENT_FAILURES:
            return RetryDecision(None, f"{failure} is not transient")
        if retried >= policy.same_agent:
            return RetryDecision(None, f"retried {retried} time(s) already")
        delay = policy.backoff_s * (2 ** retried)
        delay *= 1 + policy.jitter * (2 * random.random() - 1)
        needed = delay + max(policy.min_remaining_s, attempt_s)
        if remaining_s < needed:
            return RetryDecision(None, f"{remaining_s:.3f} s left before the deadline, "
                                 f"{needed:.3f} s needed")
        return RetryDecision(delay, f"{failure}: transient")

    def worth_waiting(self, remaining_s: float, attempt_s: float) -> bool:
        """Whether another agent served by the model that just failed is worth trying: its
        attempt queues for the same model, and the failed one took `attempt_s`."""
        return remaining_s >= max(self.policy.min_remaining_s, attempt_s)
