"""What a served attempt leaves: the breaker's verdict, the checked output, the L1 entry."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import anyio

from .._exceptions import (
    OutputRejected,
)
from .._structured import check_output
from ..services.caches._entries import CachedResult
from ..services.observability import _attributes as attr
from ..services.observability._sanitize import holds_secret
from ._attempt import end_attempt, judge
from ._state import RequestState, Services

if TYPE_CHECKING:
    from ..services.caches._cacheset import TieredCache


async def served(services: Services, state: RequestState) -> None:
    """The attempt served: judge it, release its model, store the answer in L1."""
    judge(state, None)
    await end_attempt(state)
    if state.first_token_at is not None:
        state.notes[attr.GEN_AI_SERVER_TIME_TO_FIRST_TOKEN] = state.first_token_at / 1e3
    if state.prefilled is not None:
        state.notes[attr.PREFILLED_TOKENS] = state.prefilled
    _l1_store(services, state)
    state.notes.update({attr.GEN_AI_USAGE_OUTPUT_TOKENS: len(state.token_ids),
                        attr.GEN_AI_RESPONSE_FINISH_REASONS: [state.finish_reason or "stop"]})


# --- checking_output ------------------------------------------------------------------------


async def checking_output(services: Services, state: RequestState) -> str:
    """Decode the output under the request's format: valid, it is served; cut off by
    max_tokens or invalid, the next agent is tried."""
    agent = state.agent
    assert agent is not None
    if (rejected := check_format(state)) is not None:
        state.failures.append((agent.id, rejected))
        judge(state, None)  # the model worked; its output did not fit the format
        return "invalid_output"
    await served(services, state)
    return "valid_output"


def check_format(state: RequestState) -> str | None:
    """Decode the output under the request's format; why it does not fit, if it does not."""
    fmt, mask = state.output_format, state.mask
    if fmt is None:
        return None
    try:
        checked = check_output(fmt, "".join(state.text_parts), mask)
    except OutputRejected as exc:
        state.notes[attr.OUTPUT_REJECTED] = exc.message
        return exc.message
    state.parsed, state.tool_calls = checked.parsed, checked.tool_calls
    state.notes[attr.GEN_AI_OUTPUT_TYPE] = "json" if fmt.schema or fmt.tools else "text"
    if checked.tool_calls:
        state.notes[attr.OUTPUT_TOOL_CALLS] = [c.name for c in checked.tool_calls]
    return None


def _l1_store(services: Services, state: RequestState) -> None:
    # Only what the routed agent answered, completely: a fallback answer is not the answer
    # this key asks for, and a cancelled one is not an answer.
    caches = services.caches
    if (state.l1_key is None or caches is None or state.attempt
            or state.finish_reason not in ("stop", "length")):
        return
    value = CachedResult("".join(state.text_parts), tuple(state.token_ids), state.prompt_ids,
                         state.finish_reason).as_value()
    caches.l1.put_memory(state.l1_key, value)  # visible to the next identical request now
    texts = (value["text"], *(m.content for m in state.request.messages))
    # Persisted without delaying the reply.
    services.background(persist_unless_secret, caches.l1, state.l1_key, value, texts)


async def persist_unless_secret(cache: TieredCache[Any], key: str, value: Any,
                                texts: Sequence[str]) -> None:
    """`cache.set` unless `texts` hold a secret the sanitiser detects: its token ids would
    decode back to it on disk. The memory tier keeps it for this process."""
    if not await anyio.to_thread.run_sync(holds_secret, *texts):
        await cache.set(key, value)
