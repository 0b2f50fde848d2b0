"""The work of each phase of the request machine (machines/request.scxml).

A phase is an async callback named after its state. It does the work, leaves what it found
in `ctx.notes` (the telemetry listener turns notes into span attributes), and returns the
event to send. `inferencing` is an async generator: it yields text as it is generated.
"""

from __future__ import annotations

import dataclasses
import math
import secrets
import threading
import unicodedata
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

import anyio

from ._exceptions import InferenceError, ModelLoadError, RegistryError
from ._types import GenerationParams, Message, Request
from .backends import GenerationEvent, LoadedModel, SamplingParams
from .services.caches._cacheset import CacheSet, cache_key
from .services.models._loader import ModelLease, ModelLoader, PreparedModel
from .services.models._registry import AgentSpec, Registry
from .services.resilience._admission import Deadline
from .services.resilience._breaker import BreakerBoard, BreakerPermit
from .services.resilience._guardrails import Guardrails, RepetitionGuard
from .services.routing._router import Router, RoutingDecision

_ROLES = frozenset({"system", "user", "assistant"})
# Bounds a caller can reach with a typo but no model can use; the registry schema uses the same.
_PARAM_BOUNDS: Mapping[str, tuple[float, float]] = {
    "max_tokens": (1, 32768),
    "temperature": (0.0, 2.0),
    "top_k": (0, 1000),
    "top_p": (1e-9, 1.0),
    "repetition_penalty": (1.0, 2.0),
    "seed": (-1, 2**31 - 1),
}
_MAX_STOP = 16


@dataclass(eq=False)
class RequestContext:
    """Everything one request's phases share. Lives exactly as long as the request."""

    request: Request
    registry: Registry
    router: Router
    loader: ModelLoader
    notes: dict[str, Any]
    streaming: bool
    chain: tuple[str, ...] = ()
    attempt: int = 0
    decision: RoutingDecision | None = None
    agent: AgentSpec | None = None
    prepared: PreparedModel | None = None
    lease: ModelLease | None = None
    prompt_ids: tuple[int, ...] = ()
    sampling: SamplingParams | None = None
    text_parts: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    emitted_chars: int = 0
    first_token_at: float | None = None
    finish_reason: str | None = None
    failures: list[tuple[str, str]] = field(default_factory=list)  # (agent, why)
    error: str | None = None
    error_reason: str | None = None
    error_field: str | None = None
    now: Callable[[], float] = field(default=lambda: 0.0)
    caches: CacheSet | None = None
    # Runs a coroutine function in the engine's task group: cache writes never delay a reply.
    background: Callable[..., object] | None = None
    l1_key: str | None = None
    cache_level: str | None = None
    # Keys some request is computing right now: identical requests wait for its answer.
    l1_flights: dict[str, anyio.Event] = field(default_factory=dict)
    l1_leader: bool = False
    breakers: BreakerBoard | None = None
    permit: BreakerPermit | None = None
    guardrails: Guardrails | None = None
    deadline: Deadline | None = None
    # Set to stop the generation (caller gone, deadline, runaway repetition); read by the
    # worker thread between tokens.
    stop: threading.Event = field(default_factory=threading.Event)
    repetition: RepetitionGuard | None = None
    stopped_for: str | None = None  # finish reason when a guard stopped the generation
    # What decided the path from outside the machine, for the trace (and replay).
    started_monotonic: float = 0.0
    breakers_at_start: dict[str, Any] | None = None

    def release_l1(self) -> None:
        """Wake the requests waiting for this one's answer (hit or not)."""
        if self.l1_leader and self.l1_key is not None:
            self.l1_leader = False
            self.l1_flights.pop(self.l1_key).set()

    def fail(self, reason: str, message: str, *, field: str | None = None) -> None:
        self.error, self.error_reason, self.error_field = message, reason, field
        self.notes["error.type"] = reason
        self.notes["orion.error"] = message

    def release_model(self) -> None:
        if self.lease is not None:
            self.lease.release()
            self.lease = None

    def verdict(self, failure: str | None) -> None:
        """Tell the agent's breaker how its attempt went (None: it served)."""
        permit, self.permit = self.permit, None
        if permit is None:
            return
        change = permit.success() if failure is None else permit.failure(failure)
        if change is not None:
            self.notes["orion.breaker.transition"] = (
                f"{change.agent}: {change.source} -> {change.target}")


PhaseFn = Callable[[RequestContext], Awaitable[str]]
StreamingPhaseFn = Callable[[RequestContext], AsyncGenerator[str, None]]


# --- validating -----------------------------------------------------------------------------


def _check_params(params: GenerationParams) -> tuple[str, str] | None:
    for name, (low, high) in _PARAM_BOUNDS.items():
        value = getattr(params, name)
        if value is None:
            continue
        integral = name in ("max_tokens", "top_k", "seed")
        if isinstance(value, bool) or not isinstance(value, int | float) or (
            integral and not isinstance(value, int)
        ):
            kind = "an integer" if integral else "a number"
            return name, f"{name} must be {kind}, got {value!r}"
        if isinstance(value, float) and not math.isfinite(value):
            return name, f"{name} must be finite, got {value!r}"
        if not low <= value <= high:
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


async def validating(ctx: RequestContext) -> str:
    request = ctx.request
    problem = _check_messages(request.messages) or _check_params(request.params)
    if problem is None and request.agent is not None and request.agent not in ctx.registry.agents:
        known = ", ".join(ctx.registry.agents)
        problem = "agent", f"unknown agent {request.agent!r}; known agents: {known}"
    if problem is not None:
        ctx.fail("invalid", problem[1], field=problem[0])
        return "invalid"
    ctx.notes["orion.messages"] = len(request.messages)
    if ctx.guardrails is not None:
        agents = ctx.registry.agents
        context = (agents[request.agent].context_length if request.agent is not None
                   else max(a.context_length for a in agents.values()))
        verdict = ctx.guardrails.check_input(request.messages, request.params,
                                             context_length=context)
        ctx.notes.update(verdict.as_notes())
        if (blocked := verdict.blocked) is not None:
            ctx.fail("invalid", blocked.message, field=blocked.field)
            return "invalid"
    return "valid"


# --- routing --------------------------------------------------------------------------------


async def routing(ctx: RequestContext) -> str:
    text = next(m.content for m in reversed(ctx.request.messages) if m.role == "user")
    try:
        decision = await ctx.router.route(text, requested=ctx.request.agent)
    except RegistryError as exc:
        ctx.fail("invalid", exc.message, field="agent")
        return "invalid"
    ctx.decision = decision
    ctx.chain = ctx.registry.fallback_chain(decision.agent)
    ctx.notes.update({
        "orion.agent": decision.agent,
        "orion.routing.source": decision.source,
        "orion.routing.score": decision.score,
        "orion.routing.runner_up": decision.runner_up,
        "orion.routing.margin": decision.margin,
        "orion.routing.degraded": decision.degraded,
        "orion.routing.note": decision.note,
        "orion.fallback_chain": list(ctx.chain),
    })
    agent = ctx.registry.get(decision.agent)
    if ctx.caches is not None and _cacheable(ctx, agent) and await _l1_lookup(ctx, agent):
        return "cache_hit"
    return "routed"


def _cacheable(ctx: RequestContext, agent: AgentSpec) -> bool:
    """Deterministic requests only, unless the caller opted in (or out)."""
    if ctx.request.cache is not None:
        return ctx.request.cache
    params = ctx.request.params
    temperature = agent.generation.temperature if params.temperature is None else params.temperature
    seed = agent.generation.seed if params.seed is None else params.seed
    return temperature == 0 or seed >= 0


def _normalised(messages: Sequence[Message]) -> list[tuple[str, str]]:
    # Same question, same answer: Unicode form, line endings and outer blanks do not matter.
    return [(m.role, unicodedata.normalize("NFC", m.content.replace("\r\n", "\n")).strip())
            for m in messages]


async def _l1_lookup(ctx: RequestContext, agent: AgentSpec) -> bool:
    assert ctx.caches is not None
    try:
        prepared = await ctx.loader.prepare(agent)
    except ModelLoadError:
        return False  # loading_agent reports it and falls back; nothing to look up
    sampling = _sampling(agent, ctx.request.params, agent.context_length)
    key = cache_key("l1", _normalised(ctx.request.messages), agent.id, agent.system_prompt,
                    agent.chat_template.assistant_prefix, dataclasses.asdict(sampling),
                    prepared.files.source_sha256)
    ctx.l1_key = key
    hit = ctx.caches.l1.get_memory(key)
    if hit is None:
        hit = await ctx.caches.l1.get(key)
    while hit is None:
        flight = ctx.l1_flights.get(key)
        if flight is None:
            # A leader may have stored the answer while this request read the disk tier.
            hit = ctx.caches.l1.get_memory(key)
            if hit is None:
                ctx.l1_flights[key] = anyio.Event()
                ctx.l1_leader = True
                ctx.notes["cache.l1"] = "miss"
                return False
        else:
            # Single flight: an identical request is generating this answer; wait for it.
            await flight.wait()
            ctx.notes["cache.l1.waited"] = True
            hit = ctx.caches.l1.get_memory(key)
    ctx.agent, ctx.prepared, ctx.cache_level = agent, prepared, "L1"
    ctx.text_parts = [hit["text"]]
    ctx.token_ids = list(hit["token_ids"])
    ctx.prompt_ids = tuple(hit["prompt_token_ids"])
    ctx.finish_reason = hit["finish_reason"]
    ctx.notes.update({"cache.level": "L1", "cache.l1": "hit"})
    return True


# --- loading_agent --------------------------------------------------------------------------


def _prompt_ids(ctx: RequestContext, prompt: str, prepared: PreparedModel) -> list[int]:
    """Rendered prompt -> token ids, through L3 (memory tier only on the hot path)."""
    if ctx.caches is None:
        return prepared.tokenizer.encode(prompt)
    key = cache_key("prompt-ids", prepared.files.source_sha256, prompt)
    cached = ctx.caches.l3.get_memory(key)
    if cached is not None:
        ctx.notes["cache.l3"] = "hit"
        return list(cached)
    ids = prepared.tokenizer.encode(prompt)
    if ctx.background is not None:
        ctx.background(ctx.caches.l3.set, key, tuple(ids))
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


async def loading_agent(ctx: RequestContext) -> str:
    agent = ctx.registry.get(ctx.chain[ctx.attempt])
    ctx.agent = agent
    ctx.notes.update({"orion.agent": agent.id, "gen_ai.request.model": agent.id,
                      "orion.attempt": ctx.attempt})
    if ctx.breakers is not None:
        ctx.permit = ctx.breakers.allow(agent.id)
        if ctx.permit is None:
            why = f"circuit breaker of {agent.id!r} is open"
            ctx.failures.append((agent.id, why))
            ctx.notes["orion.breaker"] = "open"
            return "breaker_open"
    try:
        prepared = await ctx.loader.prepare(agent)
    except ModelLoadError as exc:
        ctx.failures.append((agent.id, exc.message))
        ctx.notes["orion.load_error"] = exc.message
        ctx.verdict("load_failed")
        return "load_failed"
    ctx.prepared = prepared
    messages = list(ctx.request.messages)
    if agent.system_prompt and not any(m.role == "system" for m in messages):
        messages.insert(0, Message("system", agent.system_prompt))
    prompt = agent.chat_template.render([(m.role, m.content) for m in messages])
    ids = _prompt_ids(ctx, prompt, prepared)
    ctx.notes["gen_ai.usage.input_tokens"] = len(ids)
    room = agent.context_length - len(ids)
    if room < 1:
        ctx.fail("invalid", (
            f"the prompt is {len(ids)} tokens but agent {agent.id!r} has a context of "
            f"{agent.context_length} tokens: shorten the prompt or pick an agent with a "
            "larger context_length"), field="prompt")
        if ctx.permit is not None:
            ctx.permit.release()  # a prompt too long is not the agent's failure
            ctx.permit = None
        return "invalid"
    ctx.prompt_ids = tuple(ids)
    ctx.sampling = _sampling(agent, ctx.request.params, room)
    ctx.notes.update({"gen_ai.usage.input_tokens": len(ids),
                      "orion.model.sha256": prepared.files.source_sha256})
    try:
        ctx.lease = await ctx.loader.acquire(agent)
    except ModelLoadError as exc:
        ctx.failures.append((agent.id, exc.message))
        ctx.notes["orion.load_error"] = exc.message
        ctx.verdict("load_failed")
        return "load_failed"
    ctx.notes.update(ctx.lease.load_info.span_attributes())
    return "loaded"


# --- inferencing ----------------------------------------------------------------------------


async def inferencing(ctx: RequestContext) -> AsyncGenerator[str, None]:
    """Yields text deltas; sets `ctx.finish_reason`. Ends with the event in `ctx.notes`."""
    lease, sampling, agent = ctx.lease, ctx.sampling, ctx.agent
    assert lease is not None and sampling is not None and agent is not None
    if sampling.seed < 0:  # drawn here so the trace records it: `replay --live` reuses it
        sampling = ctx.sampling = dataclasses.replace(sampling,
                                                      seed=secrets.randbelow(2**31 - 1))
    ctx.notes.update({"gen_ai.operation.name": "chat", "gen_ai.system": "ctransformers",
                      "gen_ai.request.model": agent.id,
                      "gen_ai.request.max_tokens": sampling.max_tokens,
                      "gen_ai.request.temperature": sampling.temperature,
                      "gen_ai.request.top_p": sampling.top_p,
                      "gen_ai.request.top_k": sampling.top_k,
                      "gen_ai.usage.input_tokens": len(ctx.prompt_ids)})
    ctx.repetition = RepetitionGuard()
    try:
        async with lease.generation_lock:
            if ctx.streaming:
                async with aclosing(_stream_tokens(ctx, lease.model, sampling)) as texts:
                    async for text in texts:
                        yield text
            else:
                await _generate(ctx, lease.model, sampling)
    except InferenceError as exc:
        ctx.failures.append((agent.id, exc.message))
        ctx.notes["orion.inference_error"] = exc.message
        ctx.notes["orion.next_event"] = "inference_failed"
        ctx.verdict("malformed_output" if "malformed" in exc.message else "inference_failed")
        return
    finally:
        ctx.release_model()
    if ctx.stopped_for is not None:
        ctx.finish_reason = ctx.stopped_for
    ctx.verdict(None)
    if ctx.first_token_at is not None:
        ctx.notes["gen_ai.server.time_to_first_token"] = ctx.first_token_at / 1e3
    _l1_store(ctx)
    ctx.notes.update({"gen_ai.usage.output_tokens": len(ctx.token_ids),
                      "gen_ai.response.finish_reasons": [ctx.finish_reason or "stop"],
                      "orion.next_event": "completed"})


def _l1_store(ctx: RequestContext) -> None:
    # Only what the routed agent answered, completely: a fallback answer is not the answer
    # this key asks for, and a cancelled one is not an answer.
    if (ctx.l1_key is None or ctx.caches is None or ctx.background is None or ctx.attempt
            or ctx.finish_reason not in ("stop", "length")):
        return
    value = {"text": "".join(ctx.text_parts), "token_ids": list(ctx.token_ids),
             "prompt_token_ids": list(ctx.prompt_ids), "finish_reason": ctx.finish_reason}
    ctx.caches.l1.put_memory(ctx.l1_key, value)  # visible to the next identical request now
    ctx.background(ctx.caches.l1.set, ctx.l1_key, value)  # and persisted without delaying it


def _record(ctx: RequestContext, event: GenerationEvent, vocab_size: int) -> None:
    """Take one generated chunk: output guards first, then the request's text."""
    if ctx.guardrails is not None:
        blocked = ctx.guardrails.check_output(event.token_ids, event.text,
                                              vocab_size=vocab_size).blocked
        if blocked is not None:
            raise InferenceError(f"malformed output: {blocked.message}")
    if ctx.first_token_at is None:
        ctx.first_token_at = ctx.now()
    ctx.token_ids.extend(event.token_ids)
    if event.text:
        ctx.text_parts.append(event.text)
        ctx.emitted_chars += len(event.text)
        if ctx.repetition is not None and ctx.repetition.feed(event.text):
            ctx.stopped_for = "repetition"
            ctx.notes["orion.guard.repetition"] = ctx.repetition.reason
            ctx.stop.set()


T = TypeVar("T")


async def _in_worker(ctx: RequestContext, fn: Callable[[], T]) -> T:
    """`fn()` in a worker thread, abandoned on cancellation or at the request's deadline.

    Abandoning is safe because the thread is told to stop (`ctx.stop`) and, if it started, is
    awaited (shielded) before the model's lock is released: the next request never finds the
    model still generating. A job cancelled before a thread took it never runs.
    """
    started, finished, abandoned = threading.Event(), threading.Event(), threading.Event()

    def work() -> T | None:
        started.set()
        try:
            return None if abandoned.is_set() else fn()  # nobody awaits an abandoned job
        finally:
            finished.set()

    async def stop_and_wait() -> None:
        ctx.stop.set()
        abandoned.set()  # before reading `started`: the thread sets it, then reads abandoned
        if started.is_set():
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(finished.wait)

    scope = ctx.deadline.scope() if ctx.deadline is not None else anyio.CancelScope()
    try:
        with scope:
            result = await anyio.to_thread.run_sync(work, abandon_on_cancel=True)
            return cast(T, result)  # None only for an abandoned job, which nobody awaits
    except anyio.get_cancelled_exc_class():
        await stop_and_wait()
        raise
    # Only reached when the deadline's scope swallowed the cancellation.
    await stop_and_wait()
    assert ctx.deadline is not None
    raise ctx.deadline.error("inferencing", request_id=ctx.request.id)


async def _stream_tokens(ctx: RequestContext, model: LoadedModel,
                         sampling: SamplingParams) -> AsyncGenerator[str, None]:
    """One worker-thread hop per chunk: the consumer sees each token as it is made."""
    stream = model.open_stream(ctx.prompt_ids, sampling, should_stop=ctx.stop.is_set)
    vocab = model.tokenizer.vocab_size
    try:
        while (event := await _in_worker(ctx, stream.next_event)) is not None:
            _record(ctx, event, vocab)
            if event.text:
                yield event.text
        ctx.finish_reason = stream.outcome.finish_reason
    finally:
        stream.close()


async def _generate(ctx: RequestContext, model: LoadedModel, sampling: SamplingParams) -> None:
    """The whole generation in one worker-thread hop: nobody waits for the chunks."""
    vocab = model.tokenizer.vocab_size
    outcome = await _in_worker(ctx, lambda: model.generate(
        ctx.prompt_ids, sampling, on_event=lambda event: _record(ctx, event, vocab),
        should_stop=ctx.stop.is_set))
    ctx.finish_reason = outcome.finish_reason


# --- fallback -------------------------------------------------------------------------------


async def fallback(ctx: RequestContext) -> str:
    failed = ctx.chain[ctx.attempt]
    why = ctx.failures[-1][1] if ctx.failures else "unknown failure"
    ctx.notes.update({"orion.fallback.from": failed, "orion.fallback.cause": why})
    if ctx.streaming and ctx.emitted_chars:
        # Text already reached a streaming caller: another agent's answer would be spliced on.
        ctx.fail("inference_failed", (
            f"agent {failed!r} failed after streaming {ctx.emitted_chars} characters ({why}); "
            "not retried on another agent so outputs are not mixed"))
        return "abort"
    ctx.attempt += 1
    if ctx.attempt < len(ctx.chain):
        ctx.notes["orion.fallback.to"] = ctx.chain[ctx.attempt]
        ctx.text_parts.clear()
        ctx.token_ids.clear()
        ctx.first_token_at = None
        return "retry"
    tried = "; ".join(f"{a}: {w}" for a, w in ctx.failures)
    ctx.fail("exhausted", f"no agent could serve the request ({tried})")
    return "exhausted"


# Bound to the statechart's states by name (see _machine.request_chart).
PHASES: Mapping[str, PhaseFn] = {
    "validating": validating,
    "routing": routing,
    "loading_agent": loading_agent,
    "fallback": fallback,
}
STREAMING_PHASES: Mapping[str, StreamingPhaseFn] = {"inferencing": inferencing}
