"""The stand-ins a replay gives the engine in place of what the recorded run met outside the
machine: router, loader, model, streams, leases and tokenizer (recorded effects, no model
file), the live loader, the breaker board, the caches and the clock.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Final, Literal

import anyio
from anyio.abc import TaskStatus

from orion_fsm._clock import Clock, ManualClock
from orion_fsm._exceptions import ContextError, InferenceError, ModelLoadError
from orion_fsm.backends import (
    GenerationEvent,
    GenerationOutcome,
    GenerationStream,
    LoadedModel,
    SamplingParams,
    Tokenizer,
)
from orion_fsm.backends._convert import TOKENIZER_FILENAME, ConvertedModel
from orion_fsm.services.caches._cacheset import CacheSet
from orion_fsm.services.context._store import ContextHit
from orion_fsm.services.models._loader import (
    LoaderStats,
    LoadInfo,
    ModelKey,
    ModelLease,
    ModelLoader,
    PreparedModel,
    ResidentModel,
)
from orion_fsm.services.models._pressure import PressureGauge
from orion_fsm.services.models._registry import AgentSpec, Registry
from orion_fsm.services.models._tiers import DEFAULT_VARIANT
from orion_fsm.services.resilience._breaker import BreakerBoard, BreakerPermit
from orion_fsm.services.routing._embedding_router import decide
from orion_fsm.services.routing._router import RoutingDecision, RuleRouter

from ._script import Canceller, RecordedAttempt, RecordedOutput, Script

_STOP_WAIT_S: Final = 5.0  # a cancelled caller tells the stream to stop within milliseconds


class ReplayRouter:
    """Routes a replayed request with today's decision logic on what the recorded run saw.

    Embedding decisions are re-made from the recorded per-agent scores (`decide`) with
    `thresholds` (default: the router's defaults), so a changed threshold shows up as a
    divergence; rule decisions re-run the rule router on the text, which is all they read.
    """

    def __init__(self, record: Mapping[str, Any], registry: Registry, *,
                 thresholds: Mapping[str, float] | None = None,
                 canceller: Canceller | None = None) -> None:
        self._recorded: Mapping[str, Any] = (record.get("result") or {}).get("routing") or {}
        self._registry = registry
        self._rules = RuleRouter(registry)
        self._thresholds = thresholds
        self._canceller = canceller
        self.warnings: list[str] = []

    def warm_texts(self) -> tuple[str, ...]:
        return ()  # replay embeds nothing

    async def route(self, text: str, *, requested: str | None) -> RoutingDecision:
        if self._canceller is not None and self._canceller.reached("route"):
            await anyio.sleep_forever()
        if requested is not None:
            return self._rules.decide(text, requested=requested)
        recorded = self._recorded
        scores = recorded.get("scores") or {}
        if scores:
            matched = recorded.get("matched") or ()
            best = max(scores, key=lambda agent: scores[agent])
            return decide({str(a): float(s) for a, s in scores.items()},
                          default_agent=self._registry.default_agent,
                          thresholds=self._thresholds,
                          nearest={best: str(matched[0])} if matched else None)
        if recorded.get("source") == "embedding":
            # A version 1 trace kept the decision, not the scores it was made from.
            self.warnings.append("the trace has no per-agent routing scores (version 1): the "
                                 "embedding decision is replayed as recorded, not re-made")
            return RoutingDecision(
                agent=str(recorded["agent"]), source="embedding",
                score=float(recorded.get("score", 0.0)), runner_up=recorded.get("runner_up"),
                margin=float(recorded.get("margin", 0.0)),
                matched=tuple(recorded.get("matched") or ()), note=recorded.get("note"))
        decision = self._rules.decide(text)
        if recorded.get("degraded"):
            # The embeddings were unavailable then: the rules decided, and the trace says why.
            decision = replace(decision, degraded=True, note=recorded.get("note"))
        return decision


class _RecordedTokenizer:
    """Encodes every prompt to the recorded ids: only their number decides the path."""

    def __init__(self, ids: Sequence[int]) -> None:
        self._ids = list(ids)

    def encode(self, text: str) -> list[int]:
        return list(self._ids)


@dataclass(frozen=True, slots=True)
class _ReplayPrepared:
    """What the phases and the trace record read of a `PreparedModel`."""

    key: ModelKey
    files: ConvertedModel
    tokenizer: Tokenizer | _RecordedTokenizer

    @property
    def sha256(self) -> str:
        return self.files.source_sha256


class _ReplayRuntime:
    """The runtime under a `LoadedModel` whose sampler hands out the recorded token ids.

    Below `LoadedModel`, so that decoding, stop strings and `max_tokens` go through the real
    generation loop; past the recorded ids it samples end-of-sequence.
    """

    def __init__(self, token_ids: Sequence[int], *, context_length: int, eos_token_id: int) -> None:
        self._ids = list(token_ids)
        self._next = 0
        self.context_length = context_length
        self.eos_token_id = eos_token_id

    @property
    def exhausted(self) -> bool:
        return self._next >= len(self._ids)

    def prepare_inputs_for_generation(self, tokens: Sequence[int], *,
                                      reset: bool = True) -> list[int]:
        return list(tokens)

    def eval(self, tokens: Sequence[int], *, threads: int | None = None) -> None:
        return None

    def sample(self, **_sampling: Any) -> int:
        if self.exhausted:
            return self.eos_token_id
        token = self._ids[self._next]
        self._next += 1
        return token


class _RecordedStream:
    """The recorded ids, one event per token, when no tokenizer can decode them. The recorded
    text rides on the last event: a guard reading the text (repetition) then stops the
    generation where the recorded one stopped, after the last recorded token."""

    def __init__(self, output: RecordedOutput, max_tokens: int) -> None:
        ids = output.token_ids[:max_tokens]
        self._events = [GenerationEvent((token,), output.text if i == len(ids) - 1 else "")
                        for i, token in enumerate(ids)]
        reason = output.finish_reason or "stop"
        if len(ids) < len(output.token_ids):
            reason = "length"
        self._outcome = GenerationOutcome(tuple(ids), output.text if ids else "", reason)
        self._next = 0

    @property
    def exhausted(self) -> bool:
        return self._next >= len(self._events)

    def next_event(self) -> GenerationEvent | None:
        if self.exhausted:
            return None
        self._next += 1
        return self._events[self._next - 1]

    @property
    def outcome(self) -> GenerationOutcome:
        return self._outcome

    def close(self) -> None:
        self._next = len(self._events)


class _ReplayStream:
    """A generation stream over the recorded output that then fails or is cancelled as
    recorded. `cancel`, if given, cancels the caller (from the worker thread) once every
    recorded token has been handed out."""

    def __init__(self, inner: _RecordedStream | GenerationStream, exhausted: Callable[[], bool],
                 output: RecordedOutput, *,
                 cancel: Callable[[], None] | None = None,
                 should_stop: Callable[[], bool] | None = None) -> None:
        self._inner = inner
        self._exhausted = exhausted
        self._output = output
        self._cancel = cancel
        self._should_stop = should_stop

    def next_event(self) -> GenerationEvent | None:
        cancel, should_stop = self._cancel, self._should_stop
        if cancel is not None and should_stop is not None and self._exhausted():
            # The caller abandons this step when cancelled and tells the stream to stop:
            # cancel once it asks beyond the recorded tokens, so all of them reached it.
            self._cancel = None
            cancel()
            deadline = time.monotonic() + _STOP_WAIT_S
            while not should_stop() and time.monotonic() < deadline:
                time.sleep(0.001)
            return None
        event = self._inner.next_event()
        if event is None:
            if self._output.error is not None:
                raise InferenceError(self._output.error)
            return None
        if cancel is not None and should_stop is None and self._exhausted():
            # A caller that waits for each step to finish takes this event, then meets the
            # cancellation at its next step.
            self._cancel = None
            cancel()
        return event

    @property
    def outcome(self) -> GenerationOutcome:
        return self._inner.outcome

    def close(self) -> None:
        self._inner.close()


class _UnknownVocabulary:
    """The vocabulary of a model whose tokenizer is not here: any recorded id belongs to it."""

    vocab_size = 2**31 - 1


class ReplayModel:
    """A loaded model that generates what the recorded attempt generated, then fails or is
    cancelled as it was. With the model's tokenizer the ids are decoded by the real
    generation loop (text, stop strings, max_tokens); without it, the recorded text is used."""

    def __init__(self, output: RecordedOutput, *, tokenizer: Tokenizer | None, context_length: int,
                 model_path: Path, canceller: Canceller | None = None) -> None:
        self.output = output
        self.tokenizer: Tokenizer | _UnknownVocabulary = tokenizer or _UnknownVocabulary()
        self.context_length = context_length
        self.model_path = model_path
        self._decoder = tokenizer
        self._canceller = canceller

    def open_stream(self, prompt_ids: Sequence[int], params: SamplingParams, *,
                    should_stop: Callable[[], bool] | None = None) -> _ReplayStream:
        cancel = (self._canceller.cancel_from_thread
                  if self.output.cancel and self._canceller else None)
        return self._open(prompt_ids, params, cancel=cancel, should_stop=should_stop)

    def generate(self, prompt_ids: Sequence[int], params: SamplingParams, *,
                 on_event: Callable[[GenerationEvent], None],
                 should_stop: Callable[[], bool]) -> GenerationOutcome:
        stream = self._open(prompt_ids, params)
        try:
            while (event := stream.next_event()) is not None:
                on_event(event)
                if should_stop():
                    return GenerationOutcome((), "", "cancelled")
            outcome = stream.outcome
        finally:
            stream.close()
        if self.output.cancel and self._canceller is not None:
            # After the last on_event: the caller's cancellation abandons this thread, and
            # nothing may reach the request's token list once the abort has read it.
            self._canceller.cancel_from_thread()
        return outcome

    def _open(self, prompt_ids: Sequence[int], params: SamplingParams, *,
              cancel: Callable[[], None] | None = None,
              should_stop: Callable[[], bool] | None = None) -> _ReplayStream:
        tokenizer = self._decoder
        if tokenizer is None:
            recorded = _RecordedStream(self.output, params.max_tokens)
            return _ReplayStream(recorded, lambda: recorded.exhausted, self.output,
                                 cancel=cancel, should_stop=should_stop)
        ends = [tokenizer.token_id(t) for t in ("<|im_end|>", "<|endoftext|>")]
        runtime = _ReplayRuntime(
            self.output.token_ids, context_length=self.context_length,
            eos_token_id=next((i for i in ends if i is not None), tokenizer.vocab_size))
        model = LoadedModel(runtime, tokenizer, model_path=self.model_path, threads=1)
        return _ReplayStream(model.open_stream(prompt_ids, params), lambda: runtime.exhausted,
                             self.output, cancel=cancel, should_stop=should_stop)


class _ReplayLease:
    """What the phases use of a `ModelLease`."""

    def __init__(self, model: ReplayModel, load_info: LoadInfo,
                 prepared: _ReplayPrepared) -> None:
        self.model = model
        self.load_info = load_info
        self.prepared = prepared
        self.generation_lock = anyio.Semaphore(1)


class ReplayLoader:
    """Stands in for the `ModelLoader`: serves each agent's recorded load outcome, never loads.

    `prepare` and `acquire` raise the recorded `ModelLoadError` where the recorded run failed;
    the lease's model is a `ReplayModel`. The engine's lifetime hooks (`run`, `stop`,
    `aclose`) and what the memory monitor reads are there and do nothing.
    """

    def __init__(self, script: Script, *, record: Mapping[str, Any],
                 tokenizers: Mapping[str, Tokenizer], clock: ManualClock,
                 canceller: Canceller | None = None, encode_prompts: bool = True) -> None:
        self._script = script
        self._tokenizers = tokenizers
        self._encode_prompts = encode_prompts
        self._prompt_ids: Sequence[int] = record.get("prompt_token_ids") or ()
        self._source = (record.get("model") or {}).get("source")
        self._canceller = canceller
        self._prepared: dict[str, _ReplayPrepared] = {}
        self.clock = clock
        self._stats = LoaderStats()
        self.monitor: PressureGauge | None = None  # the memory monitor binds itself here
        self.budget_bytes = 0

    def decodes(self, agent: str) -> bool:
        """Whether the agent's recorded output is decoded by its real tokenizer."""
        attempt = self._script.attempts.get(agent)
        return attempt is not None and (attempt.sha256 or "") in self._tokenizers

    async def prepare(self, agent: AgentSpec, *, variant: str | None = None) -> _ReplayPrepared:
        attempt = self._script.attempt(agent)
        if self._canceller is not None and self._canceller.reached("prepare", agent.id):
            await anyio.sleep_forever()
        if attempt.prepare_error is not None:
            raise ModelLoadError(attempt.prepare_error)
        return self._prepared_for(agent, attempt)

    def _prepared_for(self, agent: AgentSpec, attempt: RecordedAttempt) -> _ReplayPrepared:
        prepared = self._prepared.get(agent.id)
        if prepared is None:
            prepared = self._prepared[agent.id] = self._prepare(agent, attempt)
        return prepared

    def _prepare(self, agent: AgentSpec, attempt: RecordedAttempt) -> _ReplayPrepared:
        sha = attempt.sha256 or ""
        source = Path(self._source if attempt.final and self._source else agent.model.describe())
        variant = attempt.load_info.variant if attempt.load_info else DEFAULT_VARIANT
        tokenizer: Tokenizer | _RecordedTokenizer | None = (
            self._tokenizers.get(sha) if self._encode_prompts else None)
        if tokenizer is None:
            count = attempt.input_tokens
            ids = self._prompt_ids if attempt.final and (
                count is None or count == len(self._prompt_ids)) else [0] * (count or 1)
            tokenizer = _RecordedTokenizer(ids)
        return _ReplayPrepared(
            key=ModelKey(source, agent.context_length, agent.model_type, variant),
            files=ConvertedModel(source, source.parent / TOKENIZER_FILENAME, sha),
            tokenizer=tokenizer)

    @asynccontextmanager
    async def lease(self, agent: AgentSpec) -> AsyncIterator[_ReplayLease]:
        attempt = self._script.attempt(agent)
        if attempt.prepare_error is not None:
            raise ModelLoadError(attempt.prepare_error)
        prepared = self._prepared_for(agent, attempt)
        if self._canceller is not None:
            if self._canceller.reached("acquire", agent.id):
                await anyio.sleep_forever()
            # Cancelled before its first token: the cancellation lands on the model's lock.
            self._canceller.reached("lease", agent.id)
        if attempt.acquire_error is not None:
            raise ModelLoadError(attempt.acquire_error)
        model = ReplayModel(attempt.output, tokenizer=self._tokenizers.get(attempt.sha256 or ""),
                            context_length=agent.context_length,
                            model_path=prepared.files.model_path, canceller=self._canceller)
        info = attempt.load_info or LoadInfo(prepared.key.label, prepared.key.variant, False,
                                             0.0, 0.0, (), False)
        yield _ReplayLease(model, info, prepared)

    # What the engine and its memory monitor call on a loader: nothing to run or unload.

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        task_status.started()

    def stop(self) -> None:
        return None

    async def aclose(self) -> None:
        return None

    def models(self) -> list[ResidentModel]:
        return []

    @property
    def stats(self) -> LoaderStats:
        return self._stats  # replay loads nothing: every figure stays 0

    async def unload_idle(self, *, limit: int | None = None) -> list[str]:
        return []


class LiveLoader:
    """The real loader for live replay; recorded failures are still served as recorded, so
    that the real model generates exactly where the recorded run generated."""

    def __init__(self, inner: ModelLoader, script: Script) -> None:
        self.inner = inner
        self._script = script
        self.clock = inner.clock
        self.warnings: list[str] = []

    @property
    def monitor(self) -> PressureGauge | None:
        return self.inner.monitor

    @monitor.setter
    def monitor(self, value: PressureGauge | None) -> None:
        self.inner.monitor = value

    @property
    def budget_bytes(self) -> int:
        return self.inner.budget_bytes

    async def prepare(self, agent: AgentSpec, *, variant: str | None = None) -> PreparedModel:
        attempt = self._script.attempt(agent)
        if attempt.prepare_error is not None:
            raise ModelLoadError(attempt.prepare_error)
        prepared = await self.inner.prepare(agent, variant=variant)
        sha = prepared.files.source_sha256
        if attempt.sha256 and sha != attempt.sha256:
            warning = (f"agent {agent.id!r}: the model file changed since the recording "
                       f"(sha256 {attempt.sha256[:12]}… then, {sha[:12]}… now)")
            if warning not in self.warnings:
                self.warnings.append(warning)
        return prepared

    @asynccontextmanager
    async def lease(self, agent: AgentSpec) -> AsyncIterator[ModelLease | _FailingLease]:
        attempt = self._script.attempt(agent)
        if attempt.prepare_error is not None or attempt.acquire_error is not None:
            raise ModelLoadError(attempt.prepare_error or attempt.acquire_error or "")
        async with self.inner.lease(agent) as lease:
            if attempt.output.error is None:
                yield lease
                return
            # A recorded inference failure (an injected fault, a broken runtime) is an
            # effect: replay it on the real lease, with what the model emitted before failing.
            model = ReplayModel(attempt.output, tokenizer=lease.model.tokenizer,
                                context_length=agent.context_length,
                                model_path=lease.model.model_path)
            yield _FailingLease(lease, model)

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        await self.inner.run(task_status=task_status)

    def stop(self) -> None:
        self.inner.stop()

    async def aclose(self) -> None:
        await self.inner.aclose()

    def models(self) -> list[ResidentModel]:
        return self.inner.models()

    @property
    def stats(self) -> LoaderStats:
        return self.inner.stats

    async def unload_idle(self, *, limit: int | None = None) -> list[str]:
        return await self.inner.unload_idle(limit=limit)


class _FailingLease:
    """A real lease whose model replays the recorded inference failure."""

    def __init__(self, lease: ModelLease, model: ReplayModel) -> None:
        self.model = model
        self.load_info = lease.load_info
        self.prepared = lease.prepared
        self.generation_lock = lease.generation_lock


class ReplayBreakers(BreakerBoard):
    """A breaker board that refuses exactly the agents whose breaker the recorded run found
    open (`loading_agent --breaker_open--> fallback`) and lets the others through. Its
    `snapshot()` is the recorded one."""

    def __init__(self, refused: frozenset[str], snapshot: Mapping[str, Any] | None, *,
                 clock: Clock | None = None) -> None:
        super().__init__(clock=clock)
        self.refused = refused
        self._recorded = {str(a): dict(s) for a, s in (snapshot or {}).items()
                          if isinstance(s, Mapping)}

    def allow(self, agent: str) -> BreakerPermit | None:
        return None if agent in self.refused else super().allow(agent)

    def snapshot(self) -> dict[str, dict[str, Any]]:
        return {**super().snapshot(), **self._recorded}


def replay_caches(record: Mapping[str, Any], clock: ManualClock) -> CacheSet | Literal[False]:
    """Memory-only caches holding the recorded L1 entry (if the request met one); False when
    the recorded request used no result cache, as the engine then had none or skipped it."""
    cache = record.get("cache") or {}
    key = cache.get("l1_key")
    if not key and not cache.get("enabled"):
        return False
    caches = CacheSet(None, clock=clock)
    result = record.get("result") or {}
    if key and cache.get("level") == "L1":
        caches.l1.put_memory(key, {
            "text": result.get("text", ""), "token_ids": list(result.get("token_ids") or ()),
            "prompt_token_ids": list(record.get("prompt_token_ids") or ()),
            "finish_reason": result.get("finish_reason")})
    return caches


def replay_clock(record: Mapping[str, Any]) -> ManualClock:
    """A clock stopped at the recorded request's start (both scales, when recorded)."""
    clock = record.get("clock") or {}
    started = record.get("started_at") or (record.get("request") or {}).get("created_at") or 0.0
    monotonic = clock.get("monotonic")
    return ManualClock(start=float(monotonic) if monotonic is not None else 1_000.0,
                       unix_start=float(clock.get("time", started)))


class RecordedContexts:
    """The chunks a recorded request retrieved, served from its trace line: a replay needs
    neither the store nor the embedding model, and sees what the recording saw."""

    def __init__(self, record: Mapping[str, Any]) -> None:
        context = record.get("context") or {}
        self.store: str | None = context.get("store")
        self.error: str | None = context.get("error")
        self.hits = tuple(ContextHit.from_dict(d) for d in context.get("retrieved") or ())

    async def retrieve(self, store: str, query: str, top_k: int) -> Sequence[ContextHit]:
        if self.error is not None:
            raise ContextError(self.error)
        if store != self.store:
            raise ContextError(f"the recording retrieved from {self.store!r}, not {store!r}")
        return self.hits[:top_k]
