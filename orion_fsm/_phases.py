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
import unicodedata
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping, Sequence
from contextlib import AsyncExitStack, aclosing
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import anyio

from ._config import DEFAULT_CONTEXT_TOP_K
from ._exceptions import ContextError, InferenceError, ModelLoadError, RegistryError
from ._types import Citation, GenerationParams, Message, Request
from .backends import GenerationEvent, SamplingParams
from .services.caches._cacheset import cache_key
from .services.caches._entries import CachedResult
from .services.models._registry import generation_bounds
from .services.observability import _attributes as attr
from .services.resilience._guardrails import RepetitionGuard

if TYPE_CHECKING:
    from ._clock import Clock
    from ._seams import ContextSource, Lease, Loader, Model, Prepared, Router
    from ._singleflight import SingleFlight
    from .services.caches._cacheset import CacheSet
    from .services.context._store import ContextHit
    from .services.models._registry import AgentSpec, Registry
    from .services.resilience._admission import Deadline
    from .services.resilience._breaker import BreakerBoard, BreakerPermit
    from .services.resilience._guardrails import Guardrails
    from .services.routing._router import RoutingDecision

_ROLES = frozenset({"system", "user", "assistant"})
_INTEGRAL = frozenset({"max_tokens", "top_k", "seed"})
_MAX_STOP = 16


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
    prompt_ids: tuple[int, ...] = ()
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
    error: str | None = None
    error_reason: str | None = None
    error_field: str | None = None

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
            return where, f"{where} has role {m.role!r}; expected system, user or assistant"
        if "\x00" in m.content:
            return where, f"{where} contains a NUL character; remove it"
    if not any(m.role == "user" and m.content.strip() for m in messages):
        return "prompt", ("the prompt is empty or only whitespace: "
                          "give the model a question or an instruction")
    return None


async def validating(services: Services, state: RequestState) -> str:
    request, registry = state.request, services.registry
    problem = _check_messages(request.messages) or _check_params(request.params)
    if problem is None and request.agent is not None and request.agent not in registry.agents:
        known = ", ".join(registry.agents)
        problem = "agent", f"unknown agent {request.agent!r}; known agents: {known}"
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
    sampling = _sampling(agent, state.request.params, agent.context_length)
    key = state.l1_key = cache_key(
        "l1", _normalised(state.request.messages), agent.id, agent.system_prompt,
        agent.chat_template.assistant_prefix, dataclasses.asdict(sampling), prepared.sha256)
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
    services.background(caches.l3.set, key, tuple(ids))
    return ids


def _sampling(agent: AgentSpec, params: GenerationParams, room: int) -> SamplingParams:
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
        state.notes[attr.BREAKER_TRANSITION] = f"{change.agent}: {change.source} -> {change.target}"


def _load_failed(state: RequestState, agent: AgentSpec, exc: ModelLoadError) -> str:
    state.failures.append((agent.id, exc.message))
    state.notes[attr.LOAD_ERROR] = exc.message
    _judge(state, "load_failed")
    return "load_failed"


async def loading_agent(services: Services, state: RequestState) -> str:
    agent = state.agent = services.registry.get(state.chain[state.attempt])
    state.notes.update({attr.AGENT: agent.id, attr.GEN_AI_REQUEST_MODEL: agent.id,
                        attr.ATTEMPT: state.attempt})
    scope = state.attempt_scope = await state.stack.enter_async_context(AsyncExitStack())
    state.permit = scope.enter_context(services.breakers.attempt(agent.id))
    if state.permit is None:
        state.failures.append((agent.id, f"circuit breaker of {agent.id!r} is open"))
        state.notes[attr.BREAKER] = "open"
        return "breaker_open"
    try:
        prepared = state.prepared = await services.loader.prepare(agent)
    except ModelLoadError as exc:
        return _load_failed(state, agent, exc)
    messages = list(state.request.messages)
    if agent.system_prompt and not any(m.role == "system" for m in messages):
        messages.insert(0, Message("system", agent.system_prompt))
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
    prompt = agent.chat_template.render([(m.role, m.content) for m in messages])
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
    state.sampling = _sampling(agent, state.request.params, room)
    state.notes[attr.MODEL_SHA256] = prepared.sha256
    try:
        lease = state.lease = await scope.enter_async_context(services.loader.lease(agent))
    except ModelLoadError as exc:
        return _load_failed(state, agent, exc)
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
    try:
        async with lease.generation_lock:
            if state.streaming:
                async with aclosing(_stream_tokens(state, lease.model, sampling, take)) as texts:
                    async for text in texts:
                        yield text
            else:
                await _generate(state, lease.model, sampling, take)
    except InferenceError as exc:
        state.failures.append((agent.id, exc.message))
        state.notes[attr.INFERENCE_ERROR] = exc.message
        _judge(state, "malformed_output" if "malformed" in exc.message else "inference_failed")
        yield Next("inference_failed")
        return
    if state.stopped_for is not None:
        state.finish_reason = state.stopped_for
    _judge(state, None)
    await _end_attempt(state)
    if state.first_token_at is not None:
        state.notes[attr.GEN_AI_SERVER_TIME_TO_FIRST_TOKEN] = state.first_token_at / 1e3
    _l1_store(services, state)
    state.notes.update({attr.GEN_AI_USAGE_OUTPUT_TOKENS: len(state.token_ids),
                        attr.GEN_AI_RESPONSE_FINISH_REASONS: [state.finish_reason or "stop"]})
    yield Next("completed")


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
    services.background(caches.l1.set, state.l1_key, value)  # persisted without delaying it


class _Recorder:
    """Takes each generated chunk: output guards first, then the request's text."""

    __slots__ = ("_services", "_state", "_vocab", "repetition")

    def __init__(self, services: Services, state: RequestState, vocab_size: int) -> None:
        self._services, self._state, self._vocab = services, state, vocab_size
        self.repetition = RepetitionGuard()

    def __call__(self, event: GenerationEvent) -> None:
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


async def _in_worker(state: RequestState, fn: Callable[[], T]) -> T:
    """`fn()` in a worker thread, abandoned on cancellation or at the request's deadline.

    Abandoning is safe because the thread is told to stop (`state.stop`) and, if it started,
    is awaited (shielded) before the model's lock is released: the next request never finds
    the model still generating. A job cancelled before a thread took it never runs.
    """
    started, finished, abandoned = threading.Event(), threading.Event(), threading.Event()
    outcome: list[T] = []

    def work() -> None:
        started.set()
        try:
            if not abandoned.is_set():  # nobody awaits an abandoned job
                outcome.append(fn())
        finally:
            finished.set()

    async def stop_and_wait() -> None:
        state.stop.set()
        abandoned.set()  # before reading `started`: the thread sets it, then reads abandoned
        if started.is_set():
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(finished.wait)

    try:
        with state.deadline.scope():
            await anyio.to_thread.run_sync(work, abandon_on_cancel=True)
            return outcome[0]
    except anyio.get_cancelled_exc_class():
        await stop_and_wait()
        raise
    # Only reached when the deadline's scope swallowed the cancellation.
    await stop_and_wait()
    raise state.deadline.error("inferencing", request_id=state.request.id)


async def _stream_tokens(state: RequestState, model: Model, sampling: SamplingParams,
                         take: _Recorder) -> AsyncGenerator[str, None]:
    """One worker-thread hop per chunk: the consumer sees each token as it is made."""
    stream = model.open_stream(state.prompt_ids, sampling, should_stop=state.stop.is_set)
    try:
        while (event := await _in_worker(state, stream.next_event)) is not None:
            take(event)
            if event.text:
                yield event.text
        state.finish_reason = stream.outcome.finish_reason
    finally:
        stream.close()


async def _generate(state: RequestState, model: Model, sampling: SamplingParams,
                    take: _Recorder) -> None:
    """The whole generation in one worker-thread hop: nobody waits for the chunks."""
    outcome = await _in_worker(state, lambda: model.generate(
        state.prompt_ids, sampling, on_event=take, should_stop=state.stop.is_set))
    state.finish_reason = outcome.finish_reason


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
    state.attempt += 1
    if state.attempt < len(state.chain):
        state.notes[attr.FALLBACK_TO] = state.chain[state.attempt]
        state.text_parts.clear()
        state.token_ids.clear()
        state.first_token_at = None
        return "retry"
    tried = "; ".join(f"{a}: {w}" for a, w in state.failures)
    state.fail("exhausted", f"no agent could serve the request ({tried})")
    return "exhausted"


# Bound to the statechart's states by name (see _machine.request_chart).
PHASES: Mapping[str, PhaseFn] = {
    "validating": validating,
    "routing": routing,
    "retrieving": retrieving,
    "loading_agent": loading_agent,
    "fallback": fallback,
}
STREAMING_PHASES: Mapping[str, StreamingPhaseFn] = {"inferencing": inferencing}
