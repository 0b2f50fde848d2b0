"""loading_agent: the attempt's permit, the prompt as the agent sees it, a model slot."""

from __future__ import annotations

from contextlib import AsyncExitStack
from typing import TYPE_CHECKING

from .._exceptions import (
    InsufficientMemory,
    ModelLoadError,
)
from .._session import fit_history
from .._structured import prompt_messages
from .._types import Citation, Message
from ..services.observability import _attributes as attr
from ._attempt import load_failed
from ._prompting import grammar_of, prompt_token_ids, sampling_params
from ._retrieving import fit_context, with_context
from ._state import RequestState, Services

if TYPE_CHECKING:
    pass


async def loading_agent(services: Services, state: RequestState) -> str:
    agent = state.agent = services.registry.get(state.chain[state.attempt])
    state.notes.update({attr.AGENT: agent.id, attr.GEN_AI_REQUEST_MODEL: agent.id,
                        attr.ATTEMPT: state.attempt})
    scope = state.attempt_scope = await state.stack.enter_async_context(AsyncExitStack())
    state.failure_kind, state.attempt_started = None, services.clock.monotonic()
    key = state.notes[attr.BREAKER_KEY] = services.breakers.key_for(agent.id)
    state.permit = scope.enter_context(services.breakers.attempt(agent.id))
    if state.permit is None:
        state.failures.append((agent.id, f"circuit breaker of {agent.id!r} is open "
                               f"(model {key})"))
        state.notes[attr.BREAKER] = "open"
        state.failure_kind = "breaker_open"
        state.refused.add(agent.id)
        return "breaker_open"
    if state.permit.trial:
        state.notes[attr.BREAKER_PROBE] = True
    try:
        prepared = state.prepared = await services.loader.prepare(agent)
    except ModelLoadError as exc:
        return load_failed(state, agent, exc, transient=False)
    if services.guardrails is not None:
        verdict = services.guardrails.check_special_tokens(state.request.messages,
                                                           prepared.tokenizer)
        if (found := next(iter(verdict.findings), None)) is not None:
            state.notes[attr.GUARDRAILS_SPECIAL_TOKEN] = found.rule
            if found.action == "block":  # the text's fault, not the agent's: permit unjudged
                state.fail("invalid", found.message, field=found.field)
                return "invalid"
    messages = list(state.request.messages)
    if agent.system_prompt and not any(m.role == "system" for m in messages):
        messages.insert(0, Message("system", agent.system_prompt))
    if state.request.session_id is not None:
        state.notes[attr.SESSION_ID] = state.request.session_id
        messages, trimmed = fit_history(messages, agent, prepared.tokenizer)
        if trimmed:
            state.notes[attr.SESSION_TRIMMED] = trimmed
    if state.retrieved:
        reserve = state.request.params.max_tokens or agent.generation.max_tokens
        used = fit_context(agent, prepared, messages, state.retrieved, reserve)
        messages = with_context(messages, used)
        store = state.request.context or ""
        state.citations = tuple(Citation(store, h.document, h.document_id, h.chunk_id,
                                         h.position, h.score) for h in used)
        state.notes.update({attr.CONTEXT_CHUNKS: [str(h.chunk_id) for h in used],
                            attr.CONTEXT_DOCUMENTS: list(dict.fromkeys(h.document for h in used)),
                            attr.CONTEXT_TOKENS: sum(h.tokens for h in used)})
    turns = prompt_messages(messages, agent.system_prompt, state.output_format,
                            state.instruction)
    state.prompt_turns = tuple(turns)
    prompt = agent.chat_template.render(turns)
    ids = await prompt_token_ids(services, prompt, prepared, state.notes)
    state.notes[attr.GEN_AI_USAGE_INPUT_TOKENS] = len(ids)
    room = agent.context_length - len(ids)
    if room < 1:
        # A prompt too long is not the agent's failure: its permit goes back unjudged.
        state.fail("invalid", (
            f"the prompt is {len(ids)} tokens but agent {agent.id!r} has a context of "
            f"{agent.context_length} tokens: shorten the prompt or pick an agent with a "
            "larger context_length"), field="prompt")
        return "invalid"
    state.prompt_ids = tuple(ids)
    state.sampling = sampling_params(agent, state.request.params, room, grammar_of(state),
                                     scores=state.token_scores)
    state.notes[attr.MODEL_SHA256] = prepared.sha256
    try:
        # Queued by the request's start, not this attempt's: a retry or a fallback onto the
        # same model keeps the place its request had (its deadline is as close).
        lease = state.lease = await scope.enter_async_context(services.loader.lease(
            agent, prompt_ids=state.prompt_ids, priority=state.priority, since=state.started))
    except ModelLoadError as exc:
        return load_failed(state, agent, exc,
                           transient=not isinstance(exc, InsufficientMemory))
    state.load_info = lease.load_info
    state.notes.update(lease.load_info.span_attributes())
    return "loaded"
