"""The work of each phase of the request machine (machines/request.scxml).

A phase is an async callback named after its state, `phase(services, state) -> event`: the
engine-wide `Services` are built once, the `RequestState` holds only what this request found.
Resources a request takes (L1 leadership, an attempt's breaker permit and model lease) are
entered on its exit stacks and released by leaving them. `state.notes` are span attributes
only; `inferencing` yields text as it is generated and ends with its `Next` event.
"""

from __future__ import annotations

import dataclasses
import math
import secrets
import threading
import time
import unicodedata
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterator, Mapping, Sequence
from contextlib import AsyncExitStack, aclosing, contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import anyio

from ._config import DEFAULT_CONTEXT_TOP_K
from ._exceptions import (
    ContextError,
    GenerationStalled,
    InferenceError,
    InsufficientMemory,
    ModelLoadError,
    OutputRejected,
    RegistryError,
    ValidationError,
)
from ._session import fit_history
from ._structured import OutputFormat, check_output, output_format, prompt_messages
from ._types import Citation, GenerationParams, Message, Request, ToolCall
from .backends import CoreGate, GenerationEvent, Grammar, MaskStats, SamplingParams
from .services.caches._cacheset import cache_key
from .services.caches._entries import CachedResult
from .services.models._registry import generation_bounds
from .services.observability import _attributes as attr
from .services.observability._sanitize import holds_secret
from .services.resilience._guardrails import RepetitionGuard

if TYPE_CHECKING:
    from ._clock import Clock
    from ._seams import ContextSource, Lease, Loader, Prepared, Router
    from ._singleflight import SingleFlight
    from .services.caches._cacheset import CacheSet, TieredCache
    from .services.context._store import ContextHit
    from .services.models._cpu import CpuAllotter
    from .services.models._loader import LoadInfo
    from .services.models._registry import AgentSpec, Registry
    from .services.resilience._admission import Deadline
    from .services.resilience._breaker import BreakerBoard, BreakerPermit
    from .services.resilience._guardrails import Guardrails
    from .services.resilience._retry import Retries
    from .services.routing._router import RoutingDecision

_ROLES = frozenset({"system", "user", "assistant", "tool"})
_INTEGRAL = frozenset({"max_tokens", "top_k", "seed"})
_MAX_STOP = 16
_PROMPT_CHUNK = 64  # prompt tokens per runtime call (the backend's chunk)


@dataclass(frozen=True, slots=True, eq=False)
class Services:
    """What every request's phases call: built once when the Engine starts."""

    registry: Registry
    router: Router
    loader: Loader
    caches: CacheSet | None
    breakers: BreakerBoard
    guardrails: Guardrails | None
    clock: Clock
    # Identical L1 misses generate once: the first leads, the others wait for its answer.
    l1_flights: SingleFlight[None]
    # The Engine's task group: cache writes happen after the reply, never before it.
    background: Callable[..., object]
    retries: Retries  # whether a transient failure tries the same agent again
    # Cores for each runtime call of a generation; None when the Engine was given `threads`.
    cores: CpuAllotter | None = None
    # Context stores by name, for requests that name one (None: retrieval is off).
    contexts: ContextSource | None = None


@dataclass(eq=False, slots=True)
class RequestState:
    """What one request found on its way; lives exactly as long as the request."""

    request: Request
    streaming: bool
    stack: AsyncExitStack  # released when the request ends, however it ends
    deadline: Deadline
    started: float  # the services clock's monotonic time at the start
    notes: dict[str, Any]  # span attributes of the current phase
    breakers_at_start: Mapping[str, Any] = field(default_factory=dict)
    priority: int = 0  # lower first, for a slot as for admission
    # routing
    decision: RoutingDecision | None = None
    chain: tuple[str, ...] = ()
    l1_key: str | None = None
    cache_level: str | None = None
    # retrieving: the chunks found (best first), then those the prompt carried
    retrieved: tuple[ContextHit, ...] = ()
    citations: tuple[Citation, ...] = ()
    # the current attempt (an agent of the chain); its resources live on `attempt_scope`
    attempt: int = 0
    attempt_scope: AsyncExitStack | None = None
    agent: AgentSpec | None = None
    prepared: Prepared | None = None
    permit: BreakerPermit | None = None
    lease: Lease | None = None
    load_info: LoadInfo | None = None  # the last lease's: which slot, how long it waited
    prefilled: int | None = None  # prompt tokens the last generation evaluated
    prompt_ids: tuple[int, ...] = ()
    prompt_turns: tuple[tuple[str, str], ...] = ()  # what prompt_ids render (for feedback)
    sampling: SamplingParams | None = None
    # generation
    text_parts: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    emitted_chars: int = 0
    first_token_at: float | None = None  # ms since the start
    finish_reason: str | None = None
    # Set to stop the generation (caller gone, deadline, runaway repetition); read by the
    # worker thread between tokens.
    stop: threading.Event = field(default_factory=threading.Event)
    stopped_for: str | None = None  # finish reason when a guard stopped the generation
    failures: list[tuple[str, str]] = field(default_factory=list)  # (agent, why)
    failure_kind: str | None = None  # how the last attempt failed (breaker_open, load_failed...)
    retried: int = 0  # retries of the current agent of the chain
    attempt_started: float = 0.0  # services clock, when the current attempt began
    refused: set[str] = field(default_factory=set)  # agents an open breaker turned away
    retry_after_s: float | None = None  # every agent refused: when a breaker lets one in
    error: str | None = None
    error_reason: str | None = None
    error_field: str | None = None
    # structured output: the format asked for, and what the output held
    output_format: OutputFormat | None = None
    mask: MaskStats | None = None
    parsed: Any = None
    tool_calls: tuple[ToolCall, ...] = ()

    def fail(self, reason: str, message: str, *, field: str | None = None) -> None:
        self.error, self.error_reason, self.error_field = message, reason, field
        self.notes[attr.ERROR_TYPE] = reason
        self.notes[attr.ERROR] = message


@dataclass(frozen=True, slots=True)
class Next:
    """The last item a streaming phase yields: the event to send."""

    event: str


PhaseFn = Callable[[Services, RequestState], Awaitable[str]]
StreamingPhaseFn = Callable[[Services, RequestState], AsyncGenerator["str | Next", None]]


# --- validating -----------------------------------------------------------------------------


def _check_params(params: GenerationParams) -> tuple[str, str] | None:
    for name, (low, high) in generation_bounds().items():
        value = getattr(params, name)
        if value is None:
            continue
        integral = name in _INTEGRAL
        if isinstance(value, bool) or not isinstance(value, int | float) or (
            integral and not isinstance(value, int)
        ):
            kind = "an integer" if integral else "a number"
            return name, f"{name} must be {kind}, got {value!r}"
        if isinstance(value, float) and not math.isfinite(value):
            return name, f"{name} must be finite, got {value!r}"
        if not low <= value <= high:
            if not integral:  # the schema writes 2 where a float parameter means 2.0
                low, high = float(low), float(high)
            shown_low = 0 if name == "top_p" else low
            rel = "above 0 and at most" if name == "top_p" else f"between {shown_low} and"
            return name, f"{name} must be {rel} {high}, got {value!r}"
    if params.stop is not None:
        if not isinstance(params.stop, tuple):
            return "stop", ("stop must be a string or a list of strings, got "
                            f"{type(params.stop).__name__}")
        if len(params.stop) > _MAX_STOP:
            return "stop", f"at most {_MAX_STOP} stop sequences, got {len(params.stop)}"
        for s in params.stop:
            if not isinstance(s, str) or not s:
                return "stop", f"stop sequences must be non-empty strings, got {s!r}"
    return None


def _check_messages(messages: Sequence[Message]) -> tuple[str, str] | None:
    if not messages:
        return "prompt", "the prompt is empty: pass a non-empty string or at least one message"
    for i, m in enumerate(messages):
        where = "prompt" if len(messages) == 1 else f"messages[{i}]"
        if not isinstance(m.content, str):
            return where, f"{where} must be text, got {type(m.content).__name__}"
        if m.role not in _ROLES:
            return where, f"{where} has role {m.role!r}; expected system, user, assistant or tool"
        if "\x00" in m.content:
            return where, f"{where} contains a NUL character; remove it"
    if not any(m.role == "user" and m.content.strip() for m in messages):
        return "prompt", ("the prompt is empty or only whitespace: "
                          "give the model a question or an instruction")
    return None


def _check_options(request: Request) -> tuple[str, str] | None:
    if request.agent is not None and not isinstance(request.agent, str):
        return "agent", f"agent must be an agent id (text), got {type(request.agent).__name__}"
    if request.cache is not None and not isinstance(request.cache, bool):
        return "cache", f"cache must be True, False or None, got {request.cache!r:.40}"
    return None


async def validating(services: Services, state: RequestState) -> str:
    request, registry = state.request, services.registry
    problem = (request.refused or _check_messages(request.messages)
               or _check_params(request.params) or _check_options(request))
    if problem is None and request.agent is not None and request.agent not in registry.agents:
        known = ", ".join(registry.agents)
        problem = "agent", f"unknown agent {request.agent!r}; known agents: {known}"
    if problem is None:
        try:
            state.output_format = fmt = output_format(request)
        except ValidationError as exc:
            problem = exc.field, exc.message
        else:
            if fmt is not None:
                state.notes.update({attr.OUTPUT_FORMAT: fmt.kind,
                                    attr.OUTPUT_GRAMMAR_DIGEST: fmt.grammar.digest})
    if problem is not None:
        state.fail("invalid", problem[1], field=problem[0])
        return "invalid"
    state.notes[attr.MESSAGES] = len(request.messages)
    if services.guardrails is not None:
        agents = registry.agents
        context = (agents[request.agent].context_length if request.agent is not None
                   else max(a.context_length for a in agents.values()))
        verdict = services.guardrails.check_input(request.messages, request.params,
                                                  context_length=context)
        state.notes.update(verdict.as_notes())
        if (blocked := verdict.blocked) is not None:
            state.fail("invalid", blocked.message, field=blocked.field)
            return "invalid"
    return "valid"


# --- routing --------------------------------------------------------------------------------


async def routing(services: Services, state: RequestState) -> str:
    request = state.request
    text = next(m.content for m in reversed(request.messages) if m.role == "user")
    try:
        decision = await services.router.route(text, requested=request.agent)
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
    _check_format(state)  # only checked outputs are stored: this decodes it again
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
    sampling = _sampling(agent, state.request.params, agent.context_length, _grammar(state))
    fmt = state.output_format
    key = state.l1_key = cache_key(
        "l1", _normalised(state.request.messages), agent.id, agent.system_prompt,
        dataclasses.asdict(agent.chat_template), services.registry.digest,
        {k: v for k, v in dataclasses.asdict(sampling).items() if k != "grammar"},
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


# --- retrieving -----------------------------------------------------------------------------


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
        hits = await services.contexts.retrieve(request.context, query, DEFAULT_CONTEXT_TOP_K)
    except ContextError as exc:
        state.fail("invalid", exc.message, field="context")
        return "invalid"
    state.retrieved = tuple(hits)
    state.notes[attr.CONTEXT_RETRIEVED] = [str(h.chunk_id) for h in hits]
    return "retrieved"


_CONTEXT_INSTRUCTION = ("Answer the question using the numbered passages below when they are "
                        "relevant, and cite them by number, like [1].")


def _with_context(messages: list[Message], passages: Sequence[ContextHit]) -> list[Message]:
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


def _fit_context(agent: AgentSpec, prepared: Prepared, messages: list[Message],
                 hits: Sequence[ContextHit], reserve: int) -> list[ContextHit]:
    """The retrieved chunks, best first, that fit the agent's context with `reserve` tokens
    left for the answer: each candidate prompt is rendered and counted, token-exact."""
    limit = agent.context_length - reserve
    chosen: list[ContextHit] = []
    for hit in hits:
        rendered = agent.chat_template.render(
            [(m.role, m.content) for m in _with_context(messages, [*chosen, hit])])
        if len(prepared.tokenizer.encode(rendered)) <= limit:
            chosen.append(hit)
    return chosen


# --- loading_agent --------------------------------------------------------------------------


def _prompt_ids(services: Services, prompt: str, prepared: Prepared,
                notes: dict[str, Any]) -> list[int]:
    """Rendered prompt -> token ids, through L3 (memory tier only on the hot path)."""
    caches = services.caches
    if caches is None:
        return prepared.tokenizer.encode(prompt)
    key = cache_key("prompt-ids", prepared.sha256, prompt)
    cached = caches.l3.get_memory(key)
    if cached is not None:
        notes[attr.CACHE_L3] = "hit"
        return list(cached)
    ids = prepared.tokenizer.encode(prompt)
    caches.l3.put_memory(key, tuple(ids))
    services.background(_persist_unless_secret, caches.l3, key, tuple(ids), (prompt,))
    return ids


def _grammar(state: RequestState) -> Grammar | None:
    return state.output_format.grammar if state.output_format is not None else None


def _sampling(agent: AgentSpec, params: GenerationParams, room: int,
              grammar: Grammar | None = None) -> SamplingParams:
    d = agent.generation
    stop = params.stop if params.stop is not None else d.stop
    return SamplingParams(
        max_tokens=min(params.max_tokens or d.max_tokens, room),
        temperature=d.temperature if params.temperature is None else params.temperature,
        top_k=d.top_k if params.top_k is None else params.top_k,
        top_p=d.top_p if params.top_p is None else params.top_p,
        repetition_penalty=(d.repetition_penalty if params.repetition_penalty is None
                            else params.repetition_penalty),
        seed=d.seed if params.seed is None else params.seed,
        stop=tuple(stop),
        grammar=grammar,
    )


async def _end_attempt(state: RequestState) -> None:
    """Release the attempt's model lease and breaker permit (a permit without a verdict
    counts for nothing). Also done by the request's stack if the request ends first."""
    scope, state.attempt_scope, state.lease = state.attempt_scope, None, None
    if scope is not None:
        await scope.aclose()


def _judge(state: RequestState, failure: str | None) -> None:
    """Tell the agent's breaker how its attempt went (None: it served)."""
    permit = state.permit
    if permit is None:
        return
    change = permit.success() if failure is None else permit.failure(failure)
    state.permit = None  # judged: the driver has nothing left to report about it
    if change is not None:
        state.notes[attr.BREAKER_TRANSITION] = f"{change.key}: {change.source} -> {change.target}"


def _load_failed(state: RequestState, agent: AgentSpec, exc: ModelLoadError, *,
                 transient: bool) -> str:
    state.failures.append((agent.id, exc.message))
    state.notes[attr.LOAD_ERROR] = exc.message
    # Only a load the runtime refused may go better a second time; a model that cannot be
    # found or cannot fit will not.
    state.failure_kind = "load_failed" if transient else "unavailable"
    _judge(state, "load_failed")
    return "load_failed"


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
        return _load_failed(state, agent, exc, transient=False)
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
        used = _fit_context(agent, prepared, messages, state.retrieved, reserve)
        messages = _with_context(messages, used)
        store = state.request.context or ""
        state.citations = tuple(Citation(store, h.document, h.document_id, h.chunk_id,
                                         h.position, h.score) for h in used)
        state.notes.update({attr.CONTEXT_CHUNKS: [str(h.chunk_id) for h in used],
                            attr.CONTEXT_DOCUMENTS: list(dict.fromkeys(h.document for h in used)),
                            attr.CONTEXT_TOKENS: sum(h.tokens for h in used)})
    turns = prompt_messages(messages, agent.system_prompt, state.output_format)
    state.prompt_turns = tuple(turns)
    prompt = agent.chat_template.render(turns)
    ids = _prompt_ids(services, prompt, prepared, state.notes)
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
    state.sampling = _sampling(agent, state.request.params, room, _grammar(state))
    state.notes[attr.MODEL_SHA256] = prepared.sha256
    try:
        lease = state.lease = await scope.enter_async_context(services.loader.lease(
            agent, prompt_ids=state.prompt_ids, priority=state.priority))
    except ModelLoadError as exc:
        return _load_failed(state, agent, exc,
                            transient=not isinstance(exc, InsufficientMemory))
    state.load_info = lease.load_info
    state.notes.update(lease.load_info.span_attributes())
    return "loaded"


# --- inferencing ----------------------------------------------------------------------------


async def inferencing(services: Services,
                      state: RequestState) -> AsyncGenerator[str | Next, None]:
    """Text deltas as they are generated, then `Next("completed" | "inference_failed")`."""
    lease, sampling, agent = state.lease, state.sampling, state.agent
    assert lease is not None and sampling is not None and agent is not None
    if sampling.seed < 0:  # drawn here so the trace records it: `replay --live` reuses it
        sampling = state.sampling = dataclasses.replace(sampling,
                                                        seed=secrets.randbelow(2**31 - 1))
    state.notes.update({attr.GEN_AI_OPERATION_NAME: "chat", attr.GEN_AI_SYSTEM: "ctransformers",
                        attr.GEN_AI_REQUEST_MODEL: agent.id,
                        attr.GEN_AI_REQUEST_MAX_TOKENS: sampling.max_tokens,
                        attr.GEN_AI_REQUEST_TEMPERATURE: sampling.temperature,
                        attr.GEN_AI_REQUEST_TOP_P: sampling.top_p,
                        attr.GEN_AI_REQUEST_TOP_K: sampling.top_k,
                        attr.GEN_AI_USAGE_INPUT_TOKENS: len(state.prompt_ids)})
    take = _Recorder(services, state, lease.model.tokenizer.vocab_size)
    run = _Run(services, state, lease, sampling, take)
    try:
        with _cores(services) as cores:
            run.cores = cores
            if state.permit is not None:
                # From here a timeout is the model's, not the queue's (given enough time): the
                # wait for a slot happened in loading_agent, under the deadline.
                state.permit.engage(state.deadline.remaining())
            if state.streaming:
                async with aclosing(_stream_tokens(run)) as texts:
                    async for text in texts:
                        yield text
            else:
                await _generate(run)
    except InferenceError as exc:
        state.failures.append((agent.id, exc.message))
        state.notes[attr.INFERENCE_ERROR] = exc.message
        failure = "malformed_output" if "malformed" in exc.message else "inference_failed"
        if isinstance(exc, GenerationStalled):
            # Its thread may still be stuck in the runtime: nobody gets this slot again.
            lease.quarantine()
            failure = "stalled"
        state.notes[attr.INFERENCE_FAILURE] = failure
        state.failure_kind = failure
        _judge(state, failure)
        yield Next("inference_failed")
        return
    take.learn(lease)
    if state.stopped_for is not None:
        state.finish_reason = state.stopped_for
    if state.output_format is not None:
        if (mask := state.mask) is not None:  # what the mask cost and changed
            ms = sorted(mask.mask_ms)
            state.notes.update({attr.OUTPUT_MASK_FORCED: mask.forced,
                                attr.OUTPUT_MASK_MS_P50: ms[len(ms) // 2] if ms else 0.0})
        yield Next("generated")  # checking_output decodes and validates it
        return
    await _served(services, state)
    yield Next("completed")


async def _served(services: Services, state: RequestState) -> None:
    """The attempt served: judge it, release its model, store the answer in L1."""
    _judge(state, None)
    await _end_attempt(state)
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
    if (rejected := _check_format(state)) is not None:
        state.failures.append((agent.id, rejected))
        _judge(state, None)  # the model worked; its output did not fit the format
        return "invalid_output"
    await _served(services, state)
    return "valid_output"


def _check_format(state: RequestState) -> str | None:
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
    services.background(_persist_unless_secret, caches.l1, state.l1_key, value, texts)


async def _persist_unless_secret(cache: TieredCache[Any], key: str, value: Any,
                                 texts: Sequence[str]) -> None:
    """`cache.set` unless `texts` hold a secret the sanitiser detects: its token ids would
    decode back to it on disk. The memory tier keeps it for this process."""
    if not await anyio.to_thread.run_sync(holds_secret, *texts):
        await cache.set(key, value)


class _Recorder:
    """Takes each generated chunk: output guards first, then the request's text."""

    __slots__ = ("_services", "_state", "_vocab", "first_at", "last_at", "repetition",
                 "tokens")

    def __init__(self, services: Services, state: RequestState, vocab_size: int) -> None:
        self._services, self._state, self._vocab = services, state, vocab_size
        self.repetition = RepetitionGuard()
        # Real time of the first and last chunk (the watchdog's heartbeat: worker threads
        # are real, whatever clock the services run on).
        self.first_at: float | None = None
        self.last_at = time.monotonic()
        self.tokens = 0

    def learn(self, lease: Lease) -> None:
        """Tell the lease how fast tokens came after the first (the stall default)."""
        if self.first_at is not None and self.tokens > 1:
            lease.record_generation(self.tokens - 1, self.last_at - self.first_at)

    def __call__(self, event: GenerationEvent) -> None:
        self.last_at = time.monotonic()
        if self.first_at is None:
            self.first_at = self.last_at
        self.tokens += len(event.token_ids)
        state, guardrails = self._state, self._services.guardrails
        if guardrails is not None:
            blocked = guardrails.check_output(event.token_ids, event.text,
                                              vocab_size=self._vocab).blocked
            if blocked is not None:
                raise InferenceError(f"malformed output: {blocked.message}")
        if state.first_token_at is None:
            state.first_token_at = (self._services.clock.monotonic() - state.started) * 1e3
        state.token_ids.extend(event.token_ids)
        if event.text:
            state.text_parts.append(event.text)
            state.emitted_chars += len(event.text)
            if self.repetition.feed(event.text):
                state.stopped_for = "repetition"
                state.notes[attr.GUARD_REPETITION] = self.repetition.reason
                state.stop.set()


T = TypeVar("T")


@contextmanager
def _cores(services: Services) -> Iterator[CoreGate | None]:
    """This generation's share of the cores, for its whole run (None: fixed threads)."""
    if services.cores is None:
        yield None
        return
    with services.cores.consumer() as gate:
        yield gate


@dataclass(eq=False, slots=True)
class _Run:
    """One generation: the slot it runs in, its parameters, its recorder and its cores."""

    services: Services
    state: RequestState
    lease: Lease
    sampling: SamplingParams
    take: _Recorder
    cores: CoreGate | None = None

    def stall_limit(self) -> float:
        """Seconds the next chunk may take: `stall_s`, and for the first one as much again per
        prompt chunk the slot must evaluate (a long prompt is not a stall)."""
        stall = self.lease.stall_s
        if self.take.first_at is not None:
            return stall
        new = len(self.state.prompt_ids) - self.lease.load_info.reused_tokens
        return stall * (1 + math.ceil(max(0, new) / _PROMPT_CHUNK))


async def _in_worker(run: _Run, fn: Callable[[], T]) -> T:
    """`fn()` in a worker thread, abandoned on cancellation, at the request's deadline, or
    when no chunk arrives within the stall limit (`GenerationStalled`).

    Abandoning is safe because the thread is told to stop (`state.stop`) and, if it started,
    is awaited (shielded) before the slot is released: the next request never finds the
    instance still generating. A job cancelled before a thread took it never runs. A stalled
    thread is not awaited (it may never return): the caller quarantines its slot instead.
    """
    state, take = run.state, run.take
    started, finished, abandoned = threading.Event(), threading.Event(), threading.Event()
    outcome: list[T] = []
    failed: list[Exception] = []  # raised here, not through the watchdog's task group
    stalled: list[float] = []

    def work() -> None:
        started.set()
        try:
            if not abandoned.is_set():  # nobody awaits an abandoned job
                outcome.append(fn())
        except Exception as exc:
            failed.append(exc)
        finally:
            finished.set()

    async def stop_and_wait() -> None:
        state.stop.set()
        abandoned.set()  # before reading `started`: the thread sets it, then reads abandoned
        if started.is_set():
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(finished.wait)

    async def watch(scope: anyio.CancelScope) -> None:
        limit = run.stall_limit()
        take.last_at = time.monotonic()
        while (left := take.last_at + limit - time.monotonic()) > 0:
            await anyio.sleep(left)
            limit = run.stall_limit()
        stalled.append(limit)
        scope.cancel()

    try:
        with state.deadline.scope():
            async with anyio.create_task_group() as group:
                group.start_soon(watch, group.cancel_scope)
                await anyio.to_thread.run_sync(work, abandon_on_cancel=True)
                group.cancel_scope.cancel()
            if failed:
                raise failed[0]
            if not stalled:
                return outcome[0]
    except anyio.get_cancelled_exc_class():
        await stop_and_wait()
        raise
    if stalled:
        abandoned.set()
        state.stop.set()  # the stuck thread holds this event: it stops if it ever returns
        state.stop = threading.Event()  # the next attempt (another agent) is not stopped
        raise GenerationStalled(stalled[0])
    # Only reached when the deadline's scope swallowed the cancellation.
    await stop_and_wait()
    raise state.deadline.error("inferencing", request_id=state.request.id)


async def _stream_tokens(run: _Run) -> AsyncGenerator[str, None]:
    """One worker-thread hop per chunk: the consumer sees each token as it is made."""
    state = run.state
    stream = run.lease.model.open_stream(state.prompt_ids, run.sampling,
                                         should_stop=state.stop.is_set, cores=run.cores)
    stalled = False
    try:
        while (event := await _in_worker(run, stream.next_event)) is not None:
            run.take(event)
            if event.text:
                yield event.text
        outcome = stream.outcome
        state.finish_reason, state.mask = outcome.finish_reason, outcome.mask
        state.prefilled = outcome.prefilled
    except GenerationStalled:
        stalled = True  # its thread may still be inside the stream: closing it would race
        raise
    finally:
        if not stalled:
            stream.close()


async def _generate(run: _Run) -> None:
    """The whole generation in one worker-thread hop: nobody waits for the chunks."""
    state = run.state
    outcome = await _in_worker(run, lambda: run.lease.model.generate(
        state.prompt_ids, run.sampling, on_event=run.take, should_stop=state.stop.is_set,
        cores=run.cores))
    state.finish_reason, state.mask = outcome.finish_reason, outcome.mask
    state.prefilled = outcome.prefilled


# --- fallback -------------------------------------------------------------------------------


async def fallback(services: Services, state: RequestState) -> str:
    await _end_attempt(state)
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
    state.first_token_at = None


# Bound to the statechart's states by name (see _machine.request_chart).
PHASES: Mapping[str, PhaseFn] = {
    "validating": validating,
    "routing": routing,
    "retrieving": retrieving,
    "loading_agent": loading_agent,
    "checking_output": checking_output,
    "fallback": fallback,
}
STREAMING_PHASES: Mapping[str, StreamingPhaseFn] = {"inferencing": inferencing}
