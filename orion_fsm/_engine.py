"""The Engine: the embeddable async API. Each request drives its own state machine.

`async with Engine(...) as engine:` owns every background task (the trace writer) and every
loaded model; nothing outlives the block. Works under asyncio and trio (anyio).
"""

from __future__ import annotations

import functools
import logging
import random
from collections.abc import AsyncGenerator, Callable, Mapping, Sequence
from contextlib import AsyncExitStack, aclosing
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Self

import anyio
from opentelemetry import metrics
from opentelemetry.metrics import MeterProvider
from opentelemetry.trace import TracerProvider

from ._clock import Clock, SystemClock
from ._config import (
    DEFAULT_BATCH_WINDOW_MS,
    DEFAULT_FEEDBACK_RECENT,
    DEFAULT_MAX_IN_FLIGHT,
    DEFAULT_MAX_QUEUE,
    DEFAULT_MEMORY_INTERVAL_S,
    DEFAULT_STREAM_INTERVAL_MS,
    DEFAULT_TIMEOUT_S,
    MAX_CONTEXT_TOP_K,
    PRIORITY_RANGE,
    caches_dir,
    contexts_dir,
    default_feedback_path,
    default_trace_path,
    resolve_cache_dir,
)
from ._driver import Driving, RequestRun
from ._exceptions import (
    ConfigurationError,
    EmbeddingError,
    FeedbackError,
    OrionError,
    RequestFailed,
)
from ._machine import MachinePool, request_chart
from ._phases import Services
from ._seams import ContextSource, Loader, Router
from ._session import Session
from ._singleflight import SingleFlight
from ._types import GenerationParams, Message, Request, Result
from .backends import LoadedModel
from .services.caches._cacheset import CacheSet, register_cache_metrics
from .services.context._chunker import Encoder
from .services.context._memory import (
    compact_turns,
    policy_named,
    session_store_name,
    summarised_turns,
)
from .services.context._rerank import Reranker, rerank_model
from .services.context._store import ContextStore
from .services.context._stores import ContextStores
from .services.feedback._store import (
    FeedbackRecord,
    FeedbackStore,
    RecentRequests,
    checked_score,
)
from .services.models._cpu import CpuAllotter, CpuSnapshot
from .services.models._loader import (
    LoaderConfig,
    ModelLoader,
    ProgressCallback,
    SlotStats,
    require_runtimes,
)
from .services.models._memory import MemoryMonitor, register_memory_metrics
from .services.models._pressure import PressureThresholds
from .services.models._registry import Registry
from .services.observability._metrics import RequestMetrics
from .services.observability._telemetry import INSTRUMENTATION_NAME, resolve_tracer
from .services.observability._tracefile import TraceWriter, register_trace_metrics
from .services.resilience._admission import AdmissionController, TimeoutPolicy
from .services.resilience._breaker import (
    BreakerBoard,
    BreakerConfig,
    breaker_keys,
    register_breaker_metrics,
    registry_configs,
)
from .services.resilience._guardrails import GuardrailConfig, Guardrails
from .services.resilience._retry import Retries, RetryPolicy
from .services.routing._embedding_router import EmbeddingRouter
from .services.routing._embeddings import EmbeddingService
from .services.routing._router import RuleRouter

Prompt = str | Sequence[Message | Mapping[str, str]]
# response_format, tools, tool_choice: checked by the validating phase.
OutputRequest = tuple[Mapping[str, Any] | None, Sequence[Mapping[str, Any]] | None,
                      str | Mapping[str, Any] | None]
_log = logging.getLogger("orion_fsm.engine")


def _log_breaker(key: str, source: str, target: str, reason: str) -> None:
    level = logging.WARNING if target == "open" else logging.INFO
    _log.log(level, "breaker", extra={"breaker": key, "source": source, "target": target,
                                     "reason": reason})

# Precomputed into L2 at start-up: short requests people type again and again.
FREQUENT_PATTERNS = ("hello", "hi", "thanks", "bonjour", "merci", "explain", "implement",
                     "debug", "optimize", "explique", "corrige", "optimise")


def _messages(prompt: object, system: str | None) -> tuple[Message, ...]:
    if isinstance(prompt, str):
        messages = [Message("user", prompt)]
    elif isinstance(prompt, Sequence) and not isinstance(prompt, bytes):
        messages = []
        for item in prompt:
            if isinstance(item, Message):
                messages.append(item)
            elif isinstance(item, Mapping):
                messages.append(Message(str(item.get("role", "")), item.get("content")))  # type: ignore[arg-type]
            else:
                messages.append(Message("", item))  # rejected by the validating phase
    else:
        messages = [Message("user", prompt)]  # type: ignore[arg-type]
    if system is not None:
        messages.insert(0, Message("system", system))
    return tuple(messages)


def _refused_priority(priority: object) -> tuple[str, str] | None:
    low, high = PRIORITY_RANGE
    if isinstance(priority, bool) or not isinstance(priority, int):
        return "priority", f"priority must be an integer, got {type(priority).__name__}"
    if not low <= priority <= high:
        return "priority", f"priority must be between {low} and {high}, got {priority}"
    return None


def _refused_top_k(top_k: object, context: str | None) -> tuple[str, str] | None:
    if isinstance(top_k, bool) or not isinstance(top_k, int):
        return "context_top_k", f"context_top_k must be an integer, got {type(top_k).__name__}"
    if not 1 <= top_k <= MAX_CONTEXT_TOP_K:
        return "context_top_k", (f"context_top_k must be between 1 and {MAX_CONTEXT_TOP_K}, "
                                 f"got {top_k}")
    if context is None:
        return "context_top_k", ("context_top_k counts the chunks of a context store: pass "
                                 "context= with it")
    return None


@dataclass(frozen=True, slots=True)
class EngineStats:
    """A snapshot of the queues: `Engine.stats()`."""

    in_flight: int  # requests admitted and not finished
    queued: int  # requests waiting for admission
    models: tuple[SlotStats, ...]  # per resident model: slots, running, queued, quarantined
    cores: CpuSnapshot | None  # the core pool (None: the Engine was given fixed threads)


class ResponseStream:
    """`async for text in engine.stream(...)`: text as it is generated; `.result` at the end.

    Leaving the loop early (break, cancellation, `aclose()`) stops generation and ends the
    request in `error` with reason `cancelled`. Also usable as `async with`.
    """

    def __init__(self, run: RequestRun) -> None:
        self._run = run
        # Not a method of self: a generator holding its stream would make a reference cycle,
        # and a stream abandoned with `break` would keep its model until the next GC.
        self._chunks = _checked_texts(run)
        self.request_id = run.request.id

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> str:
        with self._run.in_flight.scope():
            return await self._chunks.__anext__()
        # Reached only when the Engine's exit cancelled the request: it ended `cancelled`.
        if self._run.result is None:
            raise OrionError("the Engine shut down before the request started")
        raise RequestFailed(self._run.result.error or "the engine shut down",
                            reason="cancelled", request_id=self._run.request.id,
                            result=self._run.result)

    async def aclose(self) -> None:
        await self._chunks.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    @property
    def result(self) -> Result:
        """The request's Result, once the stream is exhausted."""
        if self._run.result is None:
            raise OrionError("the stream has not finished yet: iterate it to the end first")
        return self._run.result


async def _checked_texts(run: RequestRun) -> AsyncGenerator[str, None]:
    # aclosing: an abandoned stream is closed here, in the consumer's task, so the model lock
    # it holds is released by the task that took it.
    async with aclosing(run.texts()) as texts:
        async for text in texts:
            yield text
    assert run.result is not None  # set however the request ends
    _outcome(run.result)


def _outcome(result: Result) -> Result:
    if result.state != "success":
        raise RequestFailed(result.error or "request failed",
                            reason=result.error_reason or "error",
                            request_id=result.request_id, result=result,
                            retry_after_s=result.retry_after_s)
    return result


class Engine:
    """Serve the registry's agents. Use as `async with Engine(...) as engine:`."""

    def __init__(
        self,
        registry: Registry | str | Path | None = None,
        *,
        router: Router | None = None,
        cache_dir: str | Path | None = None,
        trace_path: str | Path | Literal[False] | None = None,
        tracer_provider: TracerProvider | None = None,
        meter_provider: MeterProvider | None = None,
        clock: Clock | None = None,
        threads: int | None = None,
        progress: ProgressCallback | None = None,
        machine: str | Path | None = None,
        caches: CacheSet | Literal[False] | None = None,
        loader_config: LoaderConfig | None = None,
        memory_interval_s: float = DEFAULT_MEMORY_INTERVAL_S,
        memory_thresholds: PressureThresholds | None = None,
        embeddings: EmbeddingService | Literal[False] | None = None,
        warm_up: bool = True,
        loader: Loader | None = None,
        load_model: Callable[..., LoadedModel] | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
        max_queue: int = DEFAULT_MAX_QUEUE,
        breakers: BreakerBoard | BreakerConfig | None = None,
        admission: AdmissionController | None = None,
        retries: Retries | RetryPolicy | Literal[False] | None = None,
        guardrails: Guardrails | GuardrailConfig | Literal[False] | None = None,
        frequent_patterns: Sequence[str] = FREQUENT_PATTERNS,
        contexts: Mapping[str, str | Path] | ContextSource | Literal[False] | None = None,
        context_capacity_tokens: int | None = None,
        rerank: bool | str | Path = False,
        feedback: str | Path | Literal[False] | None = None,
        batch_window_ms: float = DEFAULT_BATCH_WINDOW_MS,
        stream_interval_ms: float = DEFAULT_STREAM_INTERVAL_MS,
    ) -> None:
        if not stream_interval_ms >= 0:
            raise ConfigurationError("stream_interval_ms", stream_interval_ms, "0 or more")
        self._stream_interval_s = stream_interval_ms / 1000
        self.registry = registry if isinstance(registry, Registry) else Registry.load(registry)
        require_runtimes(self.registry.agents.values())
        self.clock: Clock = clock or SystemClock()
        # Cores for generations and embedding batches; explicit `threads` turns it off.
        self.cores: CpuAllotter | None = None if threads is not None else CpuAllotter()
        root = resolve_cache_dir(cache_dir)
        self._tracer = resolve_tracer(tracer_provider)
        self.loader: Loader = loader or ModelLoader(
            root, threads=threads, progress=progress, config=loader_config, clock=self.clock,
            load_model=load_model or LoadedModel.load, tracer=self._tracer)
        # Resilience: a breaker per model instance (agents sharing a model share it), a
        # bounded queue, a deadline per request, retries, guardrails.
        self.breakers = breakers if isinstance(breakers, BreakerBoard) else BreakerBoard(
            breakers, clock=self.clock, on_transition=_log_breaker,
            per_agent=registry_configs(self.registry.agents.values(), breakers))
        self.breakers.assign(breaker_keys(self.registry.agents.values(), self.loader.key_for))
        self.retries = retries if isinstance(retries, Retries) else Retries(
            RetryPolicy(same_agent=0) if retries is False else retries)
        self.admission = admission or AdmissionController(max_in_flight=max_in_flight,
                                                          max_queue=max_queue)
        self._timeout = TimeoutPolicy(timeout_s)
        self.guardrails: Guardrails | None = (
            None if guardrails is False else guardrails if isinstance(guardrails, Guardrails)
            else Guardrails(guardrails))
        # Result, embedding and intermediate caches; False turns them off.
        self.caches: CacheSet | None = (
            None if caches is False else caches or CacheSet(caches_dir(root), clock=self.clock))
        self.memory = MemoryMonitor(loader=self.loader, interval_s=memory_interval_s,
                                    thresholds=memory_thresholds, caches=self._cache_bytes)
        # One embedding service for every component (L2 is its store); False: rules only.
        self.embeddings: EmbeddingService | None = None if embeddings is False else (
            embeddings or EmbeddingService(store=self.caches.l2 if self.caches else None,
                                           clock=self.clock, window_ms=batch_window_ms))
        if self.embeddings is not None and self.cores is not None:
            self.embeddings.share_cores(self.cores)
        if router is None:
            rules = RuleRouter(self.registry)
            router = rules if self.embeddings is None else EmbeddingRouter(
                self.registry, self.embeddings, fallback_router=rules,
                decision_cache=self.caches.l3 if self.caches else None)
        self.router: Router = router
        # Context stores by name (opened on first use under the cache dir, or at the paths
        # given); another ContextSource (replay) serves recorded chunks instead.
        self._stores: ContextStores | None = None
        self._contexts: ContextSource | None = None
        # rerank: a small LM rereads the best chunks of each retrieval (see _rerank.py).
        scorer = rerank_model(rerank)
        if isinstance(contexts, Mapping) or contexts is None:
            self._stores = ContextStores(
                contexts_dir(root), tokenizer=self._store_tokenizer,
                embeddings=self.embeddings, paths=contexts,
                capacity_tokens=context_capacity_tokens,
                reranker=None if scorer is None else functools.partial(
                    Reranker.open, model=scorer, cpu=self.cores))
            self._contexts = self._stores
        elif contexts is not False:
            self._contexts = contexts
        # Cache, memory and breaker figures as observable instruments on the application's
        # MeterProvider (the global one unless given): no reader, no cost.
        meter = (meter_provider or metrics.get_meter_provider()).get_meter(INSTRUMENTATION_NAME)
        if self.caches is not None:
            register_cache_metrics(meter, self.caches)
        register_memory_metrics(meter, self.memory, self.loader)
        register_breaker_metrics(meter, self.breakers)
        self._metrics = RequestMetrics(meter, self.admission)
        self._warm_up = warm_up
        self._frequent_patterns = tuple(frequent_patterns)
        self._chart = request_chart(Path(machine) if machine else None)
        if trace_path is False:
            self.trace_path: Path | None = None
        elif trace_path is None:
            self.trace_path = default_trace_path()
        else:
            self.trace_path = Path(trace_path)
        self._traces = TraceWriter(self.trace_path)
        register_trace_metrics(meter, self._traces)
        # Ratings of recent answers (engine.feedback); False: none are kept or accepted.
        self.feedback_store: FeedbackStore | None = None if feedback is False else \
            FeedbackStore(default_feedback_path() if feedback is None else Path(feedback))
        self._served = None if feedback is False else RecentRequests(DEFAULT_FEEDBACK_RECENT)
        self._feedback_writes = anyio.CapacityLimiter(1)
        self._driving: Driving | None = None  # set while the Engine runs
        self._exit_stack = AsyncExitStack()
        self._closed = False

    # --- lifetime ---------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        if self._driving is not None or self._closed:
            raise OrionError("an Engine can be entered once; create a new Engine instead")
        # Unwound in reverse on exit: stop taking trace records, let the writer drain and the
        # task group end, then unload the models.
        await self._traces.prepare()
        async with AsyncExitStack() as stack:
            stack.push_async_callback(self._unload_models)
            if self.caches is not None:
                await stack.enter_async_context(self.caches)
            task_group = await stack.enter_async_context(anyio.create_task_group())
            # Background duties end when the block ends; the trace writer drains first.
            stack.callback(self._traces.close)
            stack.callback(self.loader.stop)
            stack.callback(self.memory.stop)
            await task_group.start(self._traces.run)
            await task_group.start(self.loader.run)
            await task_group.start(self.memory.run)
            if self.embeddings is not None and not self.embeddings.running:
                await task_group.start(self.embeddings.run)
                stack.push_async_callback(self.embeddings.aclose)
            if self._stores is not None:
                await task_group.start(self._stores.run)
                stack.push_async_callback(self._stores.aclose)
            if self.embeddings is not None and self._warm_up:
                # In the background: the first request never waits for the warm-up.
                self.embeddings.precompute([*self.router.warm_texts(),
                                            *self._frequent_patterns])
            services = Services(
                registry=self.registry, router=self.router, loader=self.loader,
                caches=self.caches, breakers=self.breakers, guardrails=self.guardrails,
                clock=self.clock, l1_flights=SingleFlight(), background=task_group.start_soon,
                cores=self.cores, retries=self.retries, contexts=self._contexts,
                stream_interval_s=self._stream_interval_s)
            self._driving = Driving(
                services=services, machines=MachinePool(self._chart), tracer=self._tracer,
                admission=self.admission, timeouts=self._timeout, traces=self._traces,
                registry_source=self.registry.source, metrics=self._metrics,
                served=self._served, embeddings=self._routing_embeddings())
            self._exit_stack = stack.pop_all()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> bool | None:
        self._closed = True
        if self._driving is not None:
            # Requests still awaited in callers' tasks end now, each with its trace line,
            # before the trace writer and the task group they use are closed.
            await self._driving.in_flight.close()
        return await self._exit_stack.__aexit__(exc_type, exc, tb)

    async def _unload_models(self) -> None:
        with anyio.CancelScope(shield=True):
            await self.loader.aclose()

    def _cache_bytes(self) -> dict[str, int]:
        if self.caches is None:
            return {}
        return {level: stats.memory_bytes for level, stats in self.caches.stats().items()}

    async def _store_tokenizer(self) -> tuple[Encoder, str]:
        """Stores count tokens with the default agent's tokenizer (its model's sha256)."""
        prepared = await self.loader.prepare(self.registry.get(self.registry.default_agent))
        return prepared.tokenizer, prepared.sha256

    async def reranker(self) -> Reranker | None:
        """The reranker retrieval uses (`Engine(rerank=...)`), opened on first use and closed
        with the Engine; None when this Engine does not rerank."""
        self._running()
        return None if self._stores is None else await self._stores.reranker()

    async def context(self, name: str, *, create: bool = True) -> ContextStore:
        """The context store `name` (created empty unless `create=False`), open while the
        Engine runs; its vectors are computed in the Engine's background."""
        self._running()
        if self._stores is None:
            raise OrionError("this Engine was created without context stores (contexts=False "
                             "or a recorded source): create it with contexts enabled")
        return await self._stores.get(name, create=create)

    async def remember(self, session: str, messages: Sequence[Message], *,
                       policy: str = "adaptive", agent: str | None = None
                       ) -> tuple[Message, ...]:
        """Session memory: the turns of `messages` that no longer fit `agent`'s window (by
        `policy`: adaptive | aggressive | conservative) are summarised by the model and kept in
        the store `session-<session>`; returns the turns to send now. Send them with
        `context=f"session-{session}"` so the request retrieves what was summarised."""
        spec = self.registry.get(agent or self.registry.default_agent)
        chosen = policy_named(policy)
        store = await self.context(session_store_name(session))
        prepared = await self.loader.prepare(spec)

        async def summarise(prompt: str, max_tokens: int) -> str:
            result = await self.infer(prompt, agent=spec.id, max_tokens=max_tokens,
                                      temperature=0, cache=False)
            return result.text.strip()

        kept, _ = await compact_turns(
            messages, store=store, tokenizer=prepared.tokenizer,
            context_length=spec.context_length, policy=chosen, summarise=summarise,
            first_turn=await summarised_turns(store))
        return kept

    def cache_stats(self) -> dict[str, dict[str, Any]]:
        """Hits, misses, evictions, hit rate and bytes of each cache level."""
        if self.caches is None:
            return {}
        return {level: stats.to_dict() for level, stats in self.caches.stats().items()}

    def trace_stats(self) -> dict[str, int]:
        """Trace records written, dropped by a failing sink, and written in a repaired form."""
        return self._traces.stats()

    def _routing_embeddings(self) -> EmbeddingService | None:
        """The embedding service the router embeds each request's text with, if any."""
        router = self.router
        if isinstance(router, EmbeddingRouter) and router.embeddings.running:
            return router.embeddings
        return None

    def _running(self) -> Driving:
        if self._driving is None or self._closed:
            raise OrionError("the Engine is not running: use it inside `async with Engine(...)`")
        return self._driving

    async def embed(self, texts: Sequence[str]) -> list[list[float]]:
        """Unit vectors of `texts` from the engine's shared embedding model (the router's),
        micro-batched with other callers. Raises EmbeddingError when embeddings are off."""
        self._running()
        if self.embeddings is None:
            raise EmbeddingError("embeddings are off in this Engine (embeddings=False): "
                                 "create it with embeddings enabled")
        return [vector.tolist() for vector in await self.embeddings.embed_many(texts)]

    # --- requests ---------------------------------------------------------------------------

    def _request(self, prompt: object, agent: str | None, system: str | None,
                 params: GenerationParams | None, overrides: dict[str, Any],
                 cache: bool | None, priority: object,
                 output: OutputRequest = (None, None, None),
                 session_id: str | None = None,
                 context: str | None = None,
                 context_top_k: object = None) -> tuple[Request, int]:
        """The Request and its admission priority. Never raises for what the caller passed:
        arguments of the wrong type reach the validating phase, which refuses them naming the
        field, so every request ends in a final state with its trace line."""
        given = sorted(k for k, v in overrides.items() if v is not None)
        refused = _refused_priority(priority)
        if session_id is not None and not isinstance(session_id, str):
            refused = refused or ("session_id", "session_id must be text, got "
                                  f"{type(session_id).__name__}; or use engine.session()")
            session_id = None
        if context is not None and not isinstance(context, str):
            refused = refused or ("context", "context must be the name of a context store, "
                                  f"got {type(context).__name__}")
            context = None
        if context_top_k is not None:
            refused = refused or _refused_top_k(context_top_k, context)
            context_top_k = None if refused else context_top_k
        tools = output[1]
        if tools is not None and not isinstance(tools, list | tuple):
            refused = refused or ("tools", "tools must be a list of tool definitions, got "
                                  f"{type(tools).__name__}")
            tools = None
        if params is not None:
            if not isinstance(params, GenerationParams):
                refused = refused or ("params", "params must be a GenerationParams, got "
                                      f"{type(params).__name__}; or pass max_tokens=, stop=... "
                                      "as keywords")
                params = GenerationParams()
            elif given:
                refused = refused or ("params", "pass either params= or keyword overrides, not "
                                      f"both: params= with {', '.join(f'{k}=' for k in given)}")
        else:
            stop = overrides.pop("stop", None)
            # A stop of another type stays as given: the validating phase names it.
            stop = (stop,) if isinstance(stop, str) else \
                tuple(stop) if isinstance(stop, list | tuple) else stop
            params = GenerationParams(
                **{k: v for k, v in overrides.items() if v is not None}, stop=stop)
        # An id, not a secret: os.urandom (secrets) costs ~40 µs a call on these machines.
        request_id = f"{random.getrandbits(64):016x}"
        request = Request(id=request_id, messages=_messages(prompt, system), agent=agent,
                          params=params, created_at=self.clock.time(), cache=cache,
                          response_format=output[0], tools=tuple(tools or ()),
                          tool_choice=output[2], refused=refused,
                          session_id=session_id, context=context,
                          context_top_k=context_top_k)  # type: ignore[arg-type]
        return request, priority if refused is None and isinstance(priority, int) else 0

    async def infer(
        self, prompt: Prompt, *, agent: str | None = None, system: str | None = None,
        params: GenerationParams | None = None, max_tokens: int | None = None,
        temperature: float | None = None, top_k: int | None = None, top_p: float | None = None,
        repetition_penalty: float | None = None, seed: int | None = None,
        stop: str | Sequence[str] | None = None, cache: bool | None = None,
        priority: int = 0, response_format: Mapping[str, Any] | None = None,
        tools: Sequence[Mapping[str, Any]] | None = None,
        tool_choice: str | Mapping[str, Any] | None = None, session_id: str | None = None,
        context: str | None = None, context_top_k: int | None = None,
    ) -> Result:
        """Run one request to its final state. Raises `RequestFailed` (with `.result`) on error.

        `cache`: None caches deterministic requests only (temperature 0 or a seed), True opts
        a sampled request in, False bypasses the result cache. `priority`: lower is served
        first when requests queue (past `max_queue`, the request fails at once: overloaded).
        `response_format` (OpenAI's shapes, plus {"type": "regex", "pattern": ...} and
        {"type": "grammar", "lark": ...}) constrains every token; `result.parsed` holds the
        decoded JSON. `tools`/`tool_choice` as in OpenAI's chat API: `result.tool_calls`.
        `context`: the name of a context store; its best chunks go into the prompt (within
        the agent's context) and `result.citations` names them; `context_top_k` chunks are
        retrieved (default 8): fewer make a shorter prompt, which a CPU reads faster.
        """
        request, priority = self._request(prompt, agent, system, params, dict(
            max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
            repetition_penalty=repetition_penalty, seed=seed, stop=stop), cache, priority,
            (response_format, tools, tool_choice), session_id, context, context_top_k)
        run = RequestRun(self._running(), request, streaming=False, priority=priority)
        with run.in_flight.scope():  # the Engine's exit cancels it (see InFlight)
            async with aclosing(run.texts()) as texts:
                async for _ in texts:
                    pass
        assert run.result is not None  # set however the request ends
        return _outcome(run.result)

    def stream(
        self, prompt: Prompt, *, agent: str | None = None, system: str | None = None,
        params: GenerationParams | None = None, max_tokens: int | None = None,
        temperature: float | None = None, top_k: int | None = None, top_p: float | None = None,
        repetition_penalty: float | None = None, seed: int | None = None,
        stop: str | Sequence[str] | None = None, cache: bool | None = None,
        priority: int = 0, response_format: Mapping[str, Any] | None = None,
        tools: Sequence[Mapping[str, Any]] | None = None,
        tool_choice: str | Mapping[str, Any] | None = None, session_id: str | None = None,
        context: str | None = None, context_top_k: int | None = None,
    ) -> ResponseStream:
        """Text chunks as they are generated. A request that ends in error raises RequestFailed."""
        request, priority = self._request(prompt, agent, system, params, dict(
            max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
            repetition_penalty=repetition_penalty, seed=seed, stop=stop), cache, priority,
            (response_format, tools, tool_choice), session_id, context, context_top_k)
        run = RequestRun(self._running(), request, streaming=True, priority=priority)
        return ResponseStream(run)

    def session(self, *, agent: str | None = None, system: str | None = None,
                session_id: str | None = None, memory: str | None = None) -> Session:
        """A conversation: each `infer`/`stream` turn is sent with the history (see Session);
        `memory` (adaptive | aggressive | conservative) summarises turns past the window."""
        return Session(self, agent=agent, system=system, session_id=session_id,
                       memory=memory)

    async def feedback(self, request_id: str, score: int | bool,
                       correction: str | None = None) -> FeedbackRecord:
        """Rate an answer this Engine served (`result.request_id`): `score` from 0 to 5 (or
        0/1, True/False), and optionally the answer it should have given. Stored with the
        request's trace id, the prompt as its agent saw it and the answer, redacted as the
        traces are; `orion-fsm feedback export` turns ratings into training data. Raises
        FeedbackError for an unknown (or no longer recent) request or a bad score."""
        self._running()
        if self.feedback_store is None or self._served is None:
            raise FeedbackError("feedback is off in this Engine (feedback=False): create it "
                                "with feedback enabled", request_id=str(request_id))
        value = checked_score(score, str(request_id))
        if correction is not None and (not isinstance(correction, str)
                                       or not correction.strip()):
            raise FeedbackError("a correction must be the text the answer should have been, "
                                f"got {correction!r}", field="correction",
                                request_id=str(request_id))
        served = self._served.get(request_id) if isinstance(request_id, str) else None
        if served is None:
            raise FeedbackError(
                f"no answered request {request_id!r} among the last {self._served.capacity} "
                "this Engine served: rate an answer by its result.request_id, while this "
                "Engine runs", field="request_id")
        return await anyio.to_thread.run_sync(
            self.feedback_store.add, served, value, correction, self.clock.time(),
            limiter=self._feedback_writes)

    def stats(self) -> EngineStats:
        """Requests running and queued, each resident model's slots, and the core pool."""
        return EngineStats(
            in_flight=self.admission.in_flight, queued=self.admission.queued,
            models=tuple(self.loader.slot_stats()),
            cores=None if self.cores is None else self.cores.snapshot())

