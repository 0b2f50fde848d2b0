"""fallback: retry the same agent, try the next of the chain, or give up with the reasons."""

from __future__ import annotations

from typing import TYPE_CHECKING

import anyio

from ..services.observability import _attributes as attr
from ._attempt import end_attempt
from ._state import RequestState, Services

if TYPE_CHECKING:
    pass


async def fallback(services: Services, state: RequestState) -> str:
    await end_attempt(state)
    failed = state.chain[state.attempt]
    why = state.failures[-1][1] if state.failures else "unknown failure"
    state.notes.update({attr.FALLBACK_FROM: failed, attr.FALLBACK_CAUSE: why})
    if state.streaming and state.emitted_chars:
        # Text already reached a streaming caller: another agent's answer would be spliced on.
        state.fail("inference_failed", (
            f"agent {failed!r} failed after streaming {state.emitted_chars} characters ({why}); "
            "not retried on another agent so outputs are not mixed"))
        return "abort"
    retry = services.retries.decide(state.failure_kind, state.retried,
                                    state.deadline.remaining(),
                                    services.clock.monotonic() - state.attempt_started)
    if retry.delay_s is not None:
        state.retried += 1
        state.notes.update({attr.FALLBACK_TO: failed, attr.RETRY_SAME: round(retry.delay_s, 4)})
        _clear_output(state)
        await anyio.sleep(retry.delay_s)
        return "retry_same"
    if state.failure_kind != "breaker_open":
        state.notes[attr.RETRY_SKIPPED] = retry.why
    state.attempt += 1
    state.retried = 0
    if state.failure_kind != "breaker_open":
        _pass_over_same_model(services, state, services.breakers.key_for(failed))
    if state.attempt < len(state.chain):
        state.notes[attr.FALLBACK_TO] = state.chain[state.attempt]
        _clear_output(state)
        return "retry"
    tried = "; ".join(f"{a}: {w}" for a, w in state.failures)
    if state.refused.issuperset(state.chain):
        # Nothing can serve: say so now, and when the first breaker lets a probe through.
        wait = state.retry_after_s = round(services.breakers.retry_after(state.chain), 3)
        state.notes[attr.RETRY_AFTER] = wait
        state.fail("exhausted", f"no agent could serve the request: every circuit breaker of "
                   f"its chain is open; retry after {wait:g} s ({tried})")
        return "exhausted"
    state.fail("exhausted", f"no agent could serve the request ({tried})")
    return "exhausted"


def _pass_over_same_model(services: Services, state: RequestState, failed_key: str) -> None:
    """Skip the next agents served by the model that just failed when the deadline leaves
    less than that attempt took: they would queue for the same model and time out."""
    attempt_s = services.clock.monotonic() - state.attempt_started
    answers: list[str] = []  # "try" or "skip", per agent weighed (span attributes are str)
    skipped: list[str] = []
    while state.attempt < len(state.chain) - 1 and \
            services.breakers.key_for(state.chain[state.attempt]) == failed_key:
        worth = services.retries.worth_waiting(state.deadline.remaining(), attempt_s)
        answers.append("try" if worth else "skip")
        if worth:
            break
        skipped.append(state.chain[state.attempt])
        state.attempt += 1
    if answers:
        state.notes[attr.FALLBACK_SAME_MODEL] = answers
    if skipped:
        state.notes[attr.FALLBACK_SKIPPED] = skipped
        state.failures += [(agent, "skipped: same model as the failed attempt, no time to "
                            "queue for it again") for agent in skipped]


def _clear_output(state: RequestState) -> None:
    state.text_parts.clear()
    state.token_ids.clear()
    state.logprobs.clear()
    state.entropies.clear()
    state.code_at = None
    state.first_token_at = None
