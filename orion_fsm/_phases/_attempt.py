"""One agent attempt's resources and verdict: its breaker permit, its model lease."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._exceptions import (
    ModelLoadError,
)
from ..services.observability import _attributes as attr
from ._state import RequestState

if TYPE_CHECKING:
    from ..services.models._registry import AgentSpec


async def end_attempt(state: RequestState) -> None:
    """Release the attempt's model lease and breaker permit (a permit without a verdict
    counts for nothing). Also done by the request's stack if the request ends first."""
    scope, state.attempt_scope, state.lease = state.attempt_scope, None, None
    if scope is not None:
        await scope.aclose()


def judge(state: RequestState, failure: str | None) -> None:
    """Tell the agent's breaker how its attempt went (None: it served)."""
    permit = state.permit
    if permit is None:
        return
    change = permit.success() if failure is None else permit.failure(failure)
    state.permit = None  # judged: the driver has nothing left to report about it
    if change is not None:
        state.notes[attr.BREAKER_TRANSITION] = f"{change.key}: {change.source} -> {change.target}"


def load_failed(state: RequestState, agent: AgentSpec, exc: ModelLoadError, *,
                transient: bool) -> str:
    state.failures.append((agent.id, exc.message))
    state.notes[attr.LOAD_ERROR] = exc.message
    # Only a load the runtime refused may go better a second time; a model that cannot be
    # found or cannot fit will not.
    state.failure_kind = "load_failed" if transient else "unavailable"
    judge(state, "load_failed")
    return "load_failed"
