"""routing: which agent (and its fallback chain) serves the request, and the L1 answer cache."""

from __future__ import annotations

import dataclasses
import unicodedata
from collections.abc import Sequence
from typing import TYPE_CHECKING

from .._exceptions import (
    ModelLoadError,
    RegistryError,
)
from .._types import Message, Request
from ..services.caches._cacheset import cache_key
from ..services.caches._entries import CachedResult
from ..services.observability import _attributes as attr
from ..services.routing._router import RoutingDecision
from ._members import claim_virtual, start_virtual
from ._output import check_format
from ._prompting import grammar_of, sampling_params
from ._state import RequestState, Services

if TYPE_CHECKING:
    from ..services.models._registry import AgentSpec


async def routing(services: Services, state: RequestState) -> str:
    request = state.request
    if state.before_routing is not None:
        state.before_routing.arrive()  # its text comes now, or not at all
    text = next(m.content for m in reversed(request.messages) if m.role == "user")
    try:
        if request.agent is not None and request.agent in services.registry.virtual:
            decision = RoutingDecision(agent=request.agent, source="explicit", score=1.0)
        else:
            decision = claim_virtual(services.registry, text, await services.router.route(
                text, requested=request.agent))
    except RegistryError as exc:
        state.fail("invalid", exc.message, field="agent")
        return "invalid"
    state.decision = decision
    state.chain = services.registry.fallback_chain(decision.agent)
    state.notes.update({
        attr.AGENT: decision.agent,
        attr.ROUTING_SOURCE: decision.source,
        attr.ROUTING_SCORE: decision.score,
        attr.ROUTING_RUNNER_UP: decision.runner_up,
        attr.ROUTING_MARGIN: decision.margin,
        attr.ROUTING_DEGRADED: decision.degraded,
        attr.ROUTING_NOTE: decision.note,
        attr.FALLBACK_CHAIN: list(state.chain),
    })
    if decision.batch is not None:
        state.notes.update({attr.ROUTING_BATCH_SIZE: decision.batch.size,
                            attr.ROUTING_BATCH_WAIT_MS: decision.batch.wait_ms,
                            attr.ROUTING_BATCH_WINDOWED: decision.batch.windowed})
    if decision.agent in services.registry.virtual:
        return start_virtual(services, state)
    if request.context is not None:
        # The answer depends on what the store holds now: never an L1 answer.
        return "routed_with_context"
    agent = services.registry.get(decision.agent)
    if services.caches is None or not _cacheable(request, agent):
        return "routed"
    hit = await _l1_lookup(services, state, agent)
    if hit is None:
        return "routed"
    state.agent, state.cache_level = agent, "L1"
    state.text_parts = [hit.text]
    state.token_ids = list(hit.token_ids)
    state.prompt_ids = hit.prompt_token_ids
    state.finish_reason = hit.finish_reason
    check_format(state)  # only checked outputs are stored: this decodes it again
    state.notes.update({attr.CACHE_LEVEL: "L1", attr.CACHE_L1: "hit"})
    return "cache_hit"


def _cacheable(request: Request, agent: AgentSpec) -> bool:
    """Deterministic requests only, unless the caller opted in (or out)."""
    if request.cache is not None:
        return request.cache
    params = request.params
    temperature = agent.generation.temperature if params.temperature is None else params.temperature
    seed = agent.generation.seed if params.seed is None else params.seed
    return temperature == 0 or seed >= 0


def _normalised(messages: Sequence[Message]) -> list[tuple[str, str]]:
    # Same question, same answer: Unicode form, line endings and outer blanks do not matter.
    return [(m.role, unicodedata.normalize("NFC", m.content.replace("\r\n", "\n")).strip())
            for m in messages]


async def _l1_lookup(services: Services, state: RequestState,
                     agent: AgentSpec) -> CachedResult | None:
    """The cached answer, or None after taking the lead on computing it."""
    assert services.caches is not None
    try:
        prepared = await services.loader.prepare(agent)
    except ModelLoadError:
        return None  # loading_agent reports it and falls back; nothing to look up
    sampling = sampling_params(agent, state.request.params, agent.context_length, grammar_of(state))
    fmt = state.output_format
    key = state.l1_key = cache_key(
        "l1", _normalised(state.request.messages), agent.id, agent.system_prompt,
        dataclasses.asdict(agent.chat_template), services.registry.digest,
        # Neither the grammar (its digest is below) nor token scores change the text.
        {k: v for k, v in dataclasses.asdict(sampling).items()
         if k not in ("grammar", "scores")},
        prepared.sha256,
        # The output format, named by its grammar's digest and the tools it offers; absent
        # for free text, so plain requests keep their keys.
        *(() if fmt is None else (fmt.grammar.digest, fmt.tool_prompt)))
    l1, flights = services.caches.l1, services.l1_flights
    hit = l1.get_memory(key)
    if hit is None:
        hit = await l1.get(key)
    while (found := CachedResult.from_value(hit)) is None:
        if flights.in_flight(key):
            # An identical request is generating this answer: wait for it, then look again.
            await flights.wait(key)
            state.notes[attr.CACHE_L1_WAITED] = True
            hit = l1.get_memory(key)
        # A leader may have stored the answer while this request read the disk tier.
        elif (hit := l1.get_memory(key)) is None or CachedResult.from_value(hit) is None:
            state.stack.enter_context(flights.lead(key))
            state.notes[attr.CACHE_L1] = "miss"
            return None
    state.prepared = prepared  # the trace names the model that made the cached answer
    return found
