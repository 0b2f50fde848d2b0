"""What a served attempt leaves: the breaker's verdict, the checked output, the L1 entry."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import anyio

from .._exceptions import (
    InferenceError,
    OutputRejected,
)
from .._structured import check_output
from ..backends import SamplingParams
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
    await _open_next_turn(state)
    await end_attempt(state)
    if state.first_token_at is not None:
        state.notes[attr.GEN_AI_SERVER_TIME_TO_FIRST_TOKEN] = state.first_token_at / 1e3
    if state.prefilled is not None:
        state.notes[attr.PREFILLED_TOKENS] = state.prefilled
    _l1_store(services, state)
    state.notes.update({attr.GEN_AI_USAGE_OUTPUT_TOKENS: len(state.token_ids),
                        attr.GEN_AI_RESPONSE_FINISH_REASONS: [state.finish_reason or "stop"]})


_ANSWER, _QUESTION = "\x00answer\x00", "\x00question\x00"  # never in a rendered template


async def _open_next_turn(state: RequestState) -> None:
    """A session's answer ended on its own: evaluate, on the slot that holds the conversation,
    the template's tokens between this answer and the next question (`<|im_end|>\n
    <|im_start|>user\n` in ChatML). The next turn then evaluates only its own text, like a first
    turn does; this costs one short runtime call now, after the answer was given.

    Only when the slot's context is this prompt and answer, but for the answer's last token
    when max_tokens cut it (never evaluated: it is evaluated now); not after a stop string
    (the answer's text is not its tokens), nor on a stand-in model: otherwise the runtime would
    evaluate the whole conversation again."""
    lease, agent, prepared = state.lease, state.agent, state.prepared
    if (state.request.session_id is None or state.finish_reason not in ("stop", "length")
            or lease is None or agent is None or prepared is None
            or state.stopped_for is not None):
        return
    context = (*state.prompt_ids, *state.token_ids)
    cached = tuple(lease.model.cached_ids)
    if not (0 <= len(context) - len(cached) <= 1 and context[:len(cached)] == cached):
        return
    rendered = agent.chat_template.render([("assistant", _ANSWER), ("user", _QUESTION)],
                                          add_generation_prompt=False)
    between = rendered[rendered.index(_ANSWER) + len(_ANSWER):rendered.index(_QUESTION)]
    ids = prepared.tokenizer.encode(between) if between else []
    if not ids:
        return

    def evaluate() -> None:
        lease.model.generate([*context, *ids], SamplingParams(max_tokens=0),
                             on_event=lambda _: None, should_stop=lambda: False, threads=1)

    try:
        await anyio.to_thread.run_sync(evaluate)  # not abandoned: the slot is still ours
    except InferenceError as exc:  # a warm-up only: the answer is served already
        state.notes[attr.INFERENCE_ERROR] = f"next-turn warm-up: {exc.message}"


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
