"""retrieving: the chunks of a named context store, and how many of them fit the prompt."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from .._config import DEFAULT_CONTEXT_TOP_K
from .._exceptions import (
    ContextError,
)
from .._types import Message
from ..services.observability import _attributes as attr
from ._state import RequestState, Services

if TYPE_CHECKING:
    from .._seams import Prepared
    from ..services.context._store_values import ContextHit
    from ..services.models._registry import AgentSpec


async def retrieving(services: Services, state: RequestState) -> str:
    """The best chunks of the named store for the last user message; loading_agent puts in
    as many as the agent's context holds."""
    request = state.request
    assert request.context is not None
    state.notes[attr.CONTEXT_STORE] = request.context
    if services.contexts is None:
        state.fail("invalid", f"this engine serves no context stores, so context="
                   f"{request.context!r} cannot be used: create the Engine with contexts "
                   "enabled", field="context")
        return "invalid"
    query = next(m.content for m in reversed(request.messages) if m.role == "user")
    try:
        hits = await services.contexts.retrieve(
            request.context, query, request.context_top_k or DEFAULT_CONTEXT_TOP_K)
    except ContextError as exc:
        state.fail("invalid", exc.message, field="context")
        return "invalid"
    state.retrieved = tuple(hits)
    state.notes[attr.CONTEXT_RETRIEVED] = [str(h.chunk_id) for h in hits]
    state.notes[attr.CONTEXT_RERANKED] = any(h.rerank_rank is not None for h in hits)
    return "retrieved"


_CONTEXT_INSTRUCTION = ("Answer the question using the numbered passages below when they are "
                        "relevant, and cite them by number, like [1].")


def with_context(messages: list[Message], passages: Sequence[ContextHit]) -> list[Message]:
    """The messages with the passages added to the system message (first one if any)."""
    if not passages:
        return messages
    block = "\n\n".join(
        f"[{i}] {h.document}" + (f" ({h.heading})" if h.heading else "") + f"\n{h.text}"
        for i, h in enumerate(passages, 1))
    extra = f"{_CONTEXT_INSTRUCTION}\n\n{block}"
    if messages and messages[0].role == "system":
        return [Message("system", f"{messages[0].content}\n\n{extra}"), *messages[1:]]
    return [Message("system", extra), *messages]


def fit_context(agent: AgentSpec, prepared: Prepared, messages: list[Message],
                hits: Sequence[ContextHit], reserve: int) -> list[ContextHit]:
    """The retrieved chunks, best first, that fit the agent's context with `reserve` tokens
    left for the answer: each candidate prompt is rendered and counted, token-exact."""
    limit = agent.context_length - reserve
    chosen: list[ContextHit] = []
    for hit in hits:
        # A passage writing a special token of this vocabulary would reach the model as a
        # control token (a document can close the system turn): it is left out, not obeyed.
        if prepared.tokenizer.find_special(f"{hit.document}\n{hit.heading}\n{hit.text}"):
            continue
        rendered = agent.chat_template.render(
            [(m.role, m.content) for m in with_context(messages, [*chosen, hit])])
        if len(prepared.tokenizer.encode(rendered)) <= limit:
            chosen.append(hit)
    return chosen
