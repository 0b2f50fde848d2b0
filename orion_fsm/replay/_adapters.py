"""The stand-ins a replay gives the engine in place of what the recorded run met outside the
machine: router, loader, model, streams, leases and tokenizer (recorded effects, no model
file), the live loader, the breaker board, admission, the caches and the clock.
"""

from __future__ import annotations

import math
import re
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Final, Literal

import anyio
from anyio.abc import TaskStatus

from orion_fsm._clock import Clock, ManualClock
from orion_fsm._exceptions import ContextError, GenerationStalled, InferenceError, ModelLoadError
from orion_fsm.backends import (
    CoreGate,
    GenerationEvent,
    GenerationOutcome,
    GenerationStream,
    LoadedModel,
    SamplingParams,
    Threads,
    Tokenizer,
)
from orion_fsm.backends._convert import TOKENIZER_FILENAME, ConvertedModel
from orion_fsm.services.caches._cacheset import CacheSet
from orion_fsm.services.context._store_values import ContextHit
from orion_fsm.services.models._loader import (
    LoaderStats,
    LoadInfo,
    ModelKey,
    ModelLease,
    ModelLoader,
    PreparedModel,
    ResidentModel,
    SlotStats,
)
from orion_fsm.services.models._pressure import PressureGauge
from orion_fsm.services.models._registry import AgentSpec, Registry
from orion_fsm.services.models._tiers import DEFAULT_VARIANT
from orion_fsm.services.resilience._admission import AdmissionController, Overloaded
from orion_fsm.services.resilience._breaker import BreakerBoard, BreakerPermit
from orion_fsm.services.resilience._retry import Retries, RetryDecision
from orion_fsm.services.routing._embedding_router import decide
from orion_fsm.services.routing._router import RoutingDecision, RuleRouter

from ._script import Aborter, RecordedAttempt, RecordedOutput, Script

_STOP_WAIT_S: Final = 5.0
# A virtual member that finished after the other waits for it, then this long, so that the
# other's early-stop verdict is made first, as in the recorded run.
_SETTLE_S: Final = 0.05
# Replayed generations never stall for real (a recorded stall is replayed as its failure).
_REPLAY_STALL_S: Final = 3600.0  # a cancelled caller tells the stream to stop within milliseconds


class ReplayRouter:
    """Routes a replayed request with today's decision logic on what the recorded run saw.

    Embedding decisions are re-made from the recorded per-agent scores (`decide`) with
    `thresholds` (default: the router's defaults), so a changed threshold shows up as a
    divergence; rule decisions re-run the rule router on the text, which is all they read.
    """

    def __init__(self, record: Mapping[str, Any], registry: Registry, *,
                 thresholds: Mapping[str, float] | None = None,
                 aborter: Aborter | None = None) -> None:
        self._recorded: Mapping[str, Any] = (record.get("result") or {}).get("routing") or {}
        self._registry = registry
        self._rules = RuleRouter(registry)
        self._thresholds = thresholds
        self._aborter = aborter
        self.warnings: list[str] = []

    def warm_texts(self) -> tuple[str, ...]:
        return ()  # replay embeds nothing

    async def route(self, text: str, *, requested: str | None) -> RoutingDecision:
        if self._aborter is not None and self._aborter.reached("route"):
            await self._aborter.deliver()
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

    def __init__(self, ids: Sequence[int], special: str | None = None) -> None:
        self._ids = list(ids)
        self._special = special  # the special token the recorded run found, if any

    def encode(self, text: str) -> list[int]:
        return list(self._ids)

    def find_special(self, text: str) -> tuple[str, int] | None:
        special = self._special
        if not special or (offset := text.find(special)) < 0:
            return None
        return special, offset


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
    generation loop; past the recorded ids it samples end-of-sequence. Under an output
    grammar the loop reads logits instead: they make the recorded id the only finite one,
    so the grammar's mask runs again on it and refuses a recorded id it would not allow.
    """

    def __init__(self, token_ids: Sequence[int], *, context_length: int, eos_token_id: int,
                 vocab_size: int, logprobs: Sequence[float] = ()) -> None:
        self._ids = list(token_ids)
        self._logprobs = list(logprobs)  # the recorded log-probability of each id, if any
        self._next = 0
        self._peeked: int | None = None  # the id the logits of this step were made for
        self._peeked_at = 0  # its place among the recorded ids
        self.context_length = context_length
        self.eos_token_id = eos_token_id
        self._logits: Any = None  # numpy, made on first use: numpy is not imported eagerly
        self._vocab_size = vocab_size

    @property
    def exhausted(self) -> bool:
        return self._next >= len(self._ids)

    def prepare_inputs_for_generation(self, tokens: Sequence[int], *,
                                      reset: bool = True) -> list[int]:
        return list(tokens)

    def eval(self, tokens: Sequence[int], *, threads: int | None = None) -> None:
        self._peeked = None  # a new step: its logits are those of the next recorded id

    def sample(self, **_sampling: Any) -> int:
        if self._peeked is not None:  # the logits of this step were read first
            token, self._peeked = self._peeked, None
            return token
        return self._take()

    def _take(self) -> int:
        if self.exhausted:
            return self.eos_token_id
        token = self._ids[self._next]
        self._next += 1
        return token

    # The two runtime calls `backends._constrained.logits_view` makes, once per token.
    def ctransformers_llm_logits_size(self) -> int:
        return self._vocab_size

    def ctransformers_llm_logits_data(self) -> Any:
        import ctypes

        import numpy as np

        # Read once per step (the confidence, then a grammar's mask): the same id each time.
        if self._peeked is None:
            self._peeked_at = self._next
            self._peeked = self._take()
        token, index = self._peeked, self._peeked_at
        if self._logits is None:
            self._logits = np.empty(self._vocab_size, dtype=np.float32)
        self._logits.fill(-np.inf)
        if 0 <= token < self._vocab_size:
            self._logits[token] = 0.0
            recorded = self._logprobs[index] if 0 <= index < len(self._logprobs) else 0.0
            if recorded < 0 and self._vocab_size > 1:
                # The rest of the mass on one other id: the recorded id keeps its recorded
                # log-probability (only virtual members record them: no grammar runs there).
                self._logits[token] = recorded
                self._logits[(token + 1) % self._vocab_size] = math.log1p(-math.exp(recorded))
        return self._logits.ctypes.data_as(ctypes.POINTER(ctypes.c_float))


def _first_fence(text: str) -> int | None:
    """Where the first code fence of `text` ends (None: it has none)."""
    found = [i for i in (text.find("```"), text.find("~~~")) if i >= 0]
    return min(found) + 3 if found else None


class _RecordedStream:
    """The recorded ids, one event per token, when no tokenizer can decode them. The recorded
    text rides on the last event: a guard reading the text (repetition) then stops the
    generation where the recorded one stopped, after the last recorded token. A virtual
    member's text up to its first code fence rides on the token that opened it, so that its
    early stop sees the fence where the recorded one did."""

    def __init__(self, output: RecordedOutput, max_tokens: int) -> None:
        ids = output.token_ids[:max_tokens]
        scores = output.logprobs
        texts = [""] * len(ids)
        if ids:
            texts[-1] = output.text
        fence = _first_fence(output.text)
        if output.code_at is not None and fence is not None and 0 < output.code_at < len(ids):
            texts[output.code_at - 1], texts[-1] = output.text[:fence], output.text[fence:]
        self._events = [GenerationEvent((token,), texts[i],
                                        (scores[i],) if i < len(scores) else ())
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
    """A generation stream over the recorded output that then fails or is aborted as
    recorded. `aborter`, if given, delivers the recorded abort (from the worker thread) once
    every recorded token has been handed out: the timeout is raised, the caller cancelled."""

    def __init__(self, inner: _RecordedStream | GenerationStream, exhausted: Callable[[], bool],
                 output: RecordedOutput, *, aborter: Aborter | None = None,
                 should_stop: Callable[[], bool] | None = None) -> None:
        self._inner = inner
        self._exhausted = exhausted
        self._output = output
        self._aborter = aborter
        self._should_stop = should_stop

    def next_event(self) -> GenerationEvent | None:
        aborter, should_stop = self._aborter, self._should_stop
        if aborter is not None and self._exhausted():
            if aborter.times_out:
                # The deadline passed while the next token was awaited.
                self._aborter = None
                raise aborter.timeout()
            if should_stop is not None:
                # The caller abandons this step when cancelled and tells the stream to stop:
                # cancel once it asks beyond the recorded tokens, so all of them reached it.
                self._aborter = None
                aborter.cancel_from_thread()
                deadline = time.monotonic() + _STOP_WAIT_S
                while not should_stop() and time.monotonic() < deadline:
                    time.sleep(0.001)
                return None
        event = self._inner.next_event()
        if event is None:
            if self._output.error is not None:
                raise _recorded_failure(self._output.error)
            return None
        return event

    @property
    def outcome(self) -> GenerationOutcome:
        return self._inner.outcome

    def close(self) -> None:
        self._inner.close()


_STALLED = re.compile(r"^stalled: no token for ([0-9.e+-]+) s")


def _recorded_failure(message: str) -> InferenceError:
    """The recorded inference failure; a stall again as a stall (its slot is quarantined)."""
    found = _STALLED.match(message)
    if found is not None:
        stalled = GenerationStalled(float(found.group(1)))
        if stalled.message == message:
            return stalled
    return InferenceError(message)


class _UnknownVocabulary:
    """The vocabulary of a model whose tokenizer is not here: any recorded id belongs to it."""

    vocab_size = 2**31 - 1


class ReplayModel:
    """A loaded model that generates what the recorded attempt generated, then fails or is
    aborted as it was. With the model's tokenizer the ids are decoded by the real
    generation loop (text, stop strings, max_tokens); without it, the recorded text is used."""

    def __init__(self, output: RecordedOutput, *, tokenizer: Tokenizer | None, context_length: int,
                 model_path: Path, aborter: Aborter | None = None,
                 after: threading.Event | None = None,
                 reached: threading.Event | None = None) -> None:
        self.output = output
        # A virtual member: the other member's recorded end (it finished first, or this one
        # stopped it), and this one's, set once its recorded tokens are out.
        self._after, self._reached = after, reached
        self.tokenizer: Tokenizer | _UnknownVocabulary = tokenizer or _UnknownVocabulary()
        self.context_length = context_length
        self.model_path = model_path
        self._decoder = tokenizer
        self._aborter = aborter if output.abort else None

    @property
    def cached_ids(self) -> tuple[int, ...]:
        return ()  # the recorded slot and reused prefix come with the recorded LoadInfo

    def open_stream(self, prompt_ids: Sequence[int], params: SamplingParams, *,
                    should_stop: Callable[[], bool] | None = None, threads: Threads = None,
                    cores: CoreGate | None = None, interval_s: float = 0.0) -> _ReplayStream:
        # `interval_s` only groups events: the recorded ones are served as they were.
        return self._open(prompt_ids, params, aborter=self._aborter, should_stop=should_stop)

    def generate(self, prompt_ids: Sequence[int], params: SamplingParams, *,
                 on_event: Callable[[GenerationEvent], None],
                 should_stop: Callable[[], bool], threads: Threads = None,
                 cores: CoreGate | None = None) -> GenerationOutcome:
        aborter = self._aborter
        # A timeout is raised by the stream where the next token was awaited; a cancelled
        # caller is cancelled after the last token reached it.
        stream = self._open(prompt_ids, params,
                            aborter=aborter if aborter and aborter.times_out else None)
        try:
            while (event := stream.next_event()) is not None:
                on_event(event)
                if should_stop():
                    return GenerationOutcome((), "", "cancelled")
            outcome = stream.outcome
        finally:
            stream.close()
        if self.output.stopped or self._after is not None:
            # A virtual member: ended by the other's early stop (wait for it), or finished
            # after the other (let that one finish, and decide, first).
            deadline = time.monotonic() + _STOP_WAIT_S
            if self._reached is not None and self.output.stopped:
                self._reached.set()
            if self._after is not None:
                self._after.wait(_STOP_WAIT_S)
                time.sleep(_SETTLE_S)
            while self.output.stopped and not should_stop() and time.monotonic() < deadline:
                time.sleep(0.001)
        if aborter is not None:
            # After the last on_event: the caller's cancellation abandons this thread, and
            # nothing may reach the request's token list once the abort has read it.
            aborter.cancel_from_thread()
        return outcome

    def _open(self, prompt_ids: Sequence[int], params: SamplingParams, *,
              aborter: Aborter | None = None,
              should_stop: Callable[[], bool] | None = None) -> _ReplayStream:
        tokenizer = self._decoder
        if tokenizer is None:
            recorded = _RecordedStream(self.output, params.max_tokens)
            return _ReplayStream(recorded, lambda: recorded.exhausted, self.output,
                                 aborter=aborter, should_stop=should_stop)
        ends = [tokenizer.token_id(t) for t in ("<|im_end|>", "<|endoftext|>")]
        runtime = _ReplayRuntime(
            self.output.token_ids, context_length=self.context_length,
            eos_token_id=next((i for i in ends if i is not None), tokenizer.vocab_size),
            vocab_size=tokenizer.vocab_size, logprobs=self.output.logprobs)
        model = LoadedModel(runtime, tokenizer, model_path=self.model_path, threads=1)
        return _ReplayStream(model.open_stream(prompt_ids, params), lambda: runtime.exhausted,
                             self.output, aborter=aborter, should_stop=should_stop)


class _ReplayLease:
    """What the phases use of a `ModelLease`: the recorded slot, wait and reused prefix ride
    on the recorded `LoadInfo`."""

    stall_s = _REPLAY_STALL_S

    def __init__(self, model: ReplayModel, load_info: LoadInfo,
                 prepared: _ReplayPrepared) -> None:
        self.model = model
        self.load_info = load_info
        self.prepared = prepared

    def quarantine(self) -> None:
        return None  # nothing real was stuck

    def record_generation(self, tokens: int, seconds: float) -> None:
        return None


class ReplayLoader:
    """Stands in for the `ModelLoader`: serves each agent's recorded load outcome, never loads.

    `prepare` and `acquire` raise the recorded `ModelLoadError` where the recorded run failed;
    the lease's model is a `ReplayModel`. The engine's lifetime hooks (`run`, `stop`,
    `aclose`) and what the memory monitor reads are there and do nothing.
    """

    def __init__(self, script: Script, *, record: Mapping[str, Any],
                 tokenizers: Mapping[str, Tokenizer], clock: ManualClock,
                 aborter: Aborter | None = None, encode_prompts: bool = True) -> None:
        self._script = script
        self._tokenizers = tokenizers
        self._encode_prompts = encode_prompts
        self._prompt_ids: Sequence[int] = record.get("prompt_token_ids") or ()
        self._source = (record.get("model") or {}).get("source")
        self._aborter = aborter
        self._prepared: dict[tuple[str, tuple[int, ...]], _ReplayPrepared] = {}
        self._turns: dict[str, int] = {}  # leases taken per agent: which recorded attempt is next
        self._released: dict[str, threading.Event] = {}  # per agent: its last lease is over
        self.clock = clock
        self._stats = LoaderStats()
        self.monitor: PressureGauge | None = None  # the memory monitor binds itself here
        self.budget_bytes = 0

    def key_for(self, agent: AgentSpec) -> ModelKey:
        # Only names the replayed breakers; replay refuses what the recording refused.
        return ModelKey(Path(agent.model.describe()), agent.context_length, agent.model_type,
                        runtime=agent.runtime)

    def decodes(self, agent: str) -> bool:
        """Whether the agent's recorded output is decoded by its real tokenizer."""
        attempt = self._script.attempts.get(agent)
        return attempt is not None and (attempt.sha256 or "") in self._tokenizers

    async def prepare(self, agent: AgentSpec, *, variant: str | None = None) -> _ReplayPrepared:
        attempt = self._script.attempt(agent, self._turns.get(agent.id, 0))
        if self._aborter is not None and self._aborter.reached("prepare", agent.id):
            await self._aborter.deliver()
        if attempt.prepare_error is not None:
            raise ModelLoadError(attempt.prepare_error)
        return self._prepared_for(agent, attempt)

    def _prepared_for(self, agent: AgentSpec, attempt: RecordedAttempt) -> _ReplayPrepared:
        # Keyed by the ids too: a turn of the agent whose prompt the record holds must not
        # reuse stand-in ids an earlier turn of another length was prepared with.
        served = self._served(agent)
        ids = self._recorded_ids(attempt, served)
        key = (agent.id, ids)
        prepared = self._prepared.get(key)
        if prepared is None:
            prepared = self._prepared[key] = self._prepare(agent, attempt, ids, served)
        return prepared

    def _served(self, agent: AgentSpec) -> bool:
        """Whether the request ended on this agent: every one of its turns (a retried agent
        has several) rendered the prompt the record holds, for the model it names."""
        return any(a.final for a in self._script.turns.get(agent.id, ())) or \
            self._script.attempt(agent).final

    def _recorded_ids(self, attempt: RecordedAttempt, served: bool) -> tuple[int, ...]:
        """The prompt ids a stand-in tokenizer hands out when the real one is not here: the
        recorded ones for the agent that served, else as many stand-ins as were counted."""
        if attempt.prompt_ids is not None:  # a virtual member's own prompt
            return tuple(attempt.prompt_ids)
        count = attempt.input_tokens
        if served and (count is None or count == len(self._prompt_ids)):
            return tuple(self._prompt_ids)
        return (0,) * (count or 1)

    def _prepare(self, agent: AgentSpec, attempt: RecordedAttempt, ids: Sequence[int],
                 served: bool) -> _ReplayPrepared:
        sha = attempt.sha256 or ""
        source = Path(self._source if served and self._source else agent.model.describe())
        variant = attempt.load_info.variant if attempt.load_info else DEFAULT_VARIANT
        tokenizer: Tokenizer | _RecordedTokenizer | None = (
            self._tokenizers.get(sha) if self._encode_prompts else None)
        if tokenizer is None:
            tokenizer = _RecordedTokenizer(ids, attempt.special_token)
        return _ReplayPrepared(
            key=ModelKey(source, agent.context_length, agent.model_type, variant,
                         agent.runtime),
            files=ConvertedModel(source, source.parent / TOKENIZER_FILENAME, sha),
            tokenizer=tokenizer)

    def slot_stats(self) -> list[SlotStats]:
        return []

    @asynccontextmanager
    async def lease(self, agent: AgentSpec, *, prompt_ids: Sequence[int] = (),
                    priority: int = 0,
                    since: float | None = None) -> AsyncIterator[_ReplayLease]:
        turn = self._turns.get(agent.id, 0)
        attempt = self._script.attempt(agent, turn)
        # Whatever happens below, the agent's next attempt (a retry) replays the next turn.
        self._turns[agent.id] = turn + 1
        if attempt.prepare_error is not None:
            raise ModelLoadError(attempt.prepare_error)
        prepared = self._prepared_for(agent, attempt)
        if self._aborter is not None:
            if self._aborter.reached("acquire", agent.id):
                await self._aborter.deliver()
            if self._aborter.reached("lease", agent.id):
                # Cancelled before its first token: the cancellation lands on the model's lock.
                self._aborter.cancel()
        if attempt.acquire_error is not None:
            raise ModelLoadError(attempt.acquire_error)
        reached = self._released.setdefault(agent.id, threading.Event())
        if attempt.stopped_loading:
            # A virtual member the other's early stop ended while it waited for a slot.
            reached.set()
            await anyio.sleep_forever()
        after = (None if attempt.finishes_after is None
                 else self._released.setdefault(attempt.finishes_after, threading.Event()))
        model = ReplayModel(attempt.output, tokenizer=self._tokenizers.get(attempt.sha256 or ""),
                            context_length=agent.context_length,
                            model_path=prepared.files.model_path, aborter=self._aborter,
                            after=after, reached=reached)
        info = attempt.load_info or LoadInfo(prepared.key.label, prepared.key.variant, False,
                                             0.0, 0.0, (), False)
        try:
            yield _ReplayLease(model, info, prepared)
        finally:
            reached.set()

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
        self._turns: dict[str, int] = {}
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

    def key_for(self, agent: AgentSpec) -> ModelKey:
        return self.inner.key_for(agent)

    async def prepare(self, agent: AgentSpec, *, variant: str | None = None) -> PreparedModel:
        attempt = self._script.attempt(agent, self._turns.get(agent.id, 0))
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

    def slot_stats(self) -> list[SlotStats]:
        return self.inner.slot_stats()

    @asynccontextmanager
    async def lease(self, agent: AgentSpec, *, prompt_ids: Sequence[int] = (),
                    priority: int = 0,
                    since: float | None = None) -> AsyncIterator[ModelLease | _FailingLease]:
        turn = self._turns.get(agent.id, 0)
        attempt = self._script.attempt(agent, turn)
        self._turns[agent.id] = turn + 1
        if attempt.prepare_error is not None or attempt.acquire_error is not None:
            raise ModelLoadError(attempt.prepare_error or attempt.acquire_error or "")
        async with self.inner.lease(agent, prompt_ids=prompt_ids,
                                    priority=priority, since=since) as lease:
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
        self.stall_s = lease.stall_s

    def quarantine(self) -> None:
        return None  # the replayed failure leaves the real slot sound

    def record_generation(self, tokens: int, seconds: float) -> None:
        return None


class ReplayBreakers(BreakerBoard):
    """A breaker board that refuses exactly the attempts the recorded run saw refused
    (`loading_agent --breaker_open--> fallback`), agent by agent and in order, and lets the
    others through. Its `snapshot()` and `retry_after()` are the recorded ones."""

    def __init__(self, refusals: Mapping[str, Sequence[bool]],
                 snapshot: Mapping[str, Any] | None, *, clock: Clock | None = None,
                 retry_after_s: float | None = None) -> None:
        super().__init__(clock=clock)
        self._refusals = {agent: list(turns) for agent, turns in refusals.items()}
        self._recorded = {str(a): dict(s) for a, s in (snapshot or {}).items()
                          if isinstance(s, Mapping)}
        self._retry_after_s = retry_after_s

    def allow(self, agent: str) -> BreakerPermit | None:
        turns = self._refusals.get(agent)
        refused = turns.pop(0) if turns else False
        return None if refused else super().allow(agent)

    def retry_after(self, agents: Iterable[str]) -> float:
        if self._retry_after_s is not None:
            return self._retry_after_s
        return super().retry_after(agents)

    def snapshot(self) -> dict[str, dict[str, Any]]:
        return {**super().snapshot(), **self._recorded}


class ReplayAdmission(AdmissionController):
    """Admits every replayed request at once, except the one whose recorded run was refused
    (overloaded, with the recorded queue figures) or cancelled while it was queued."""

    def __init__(self, aborter: Aborter) -> None:
        super().__init__()
        self._aborter = aborter

    async def acquire(self, priority: int = 0, *, request_id: str | None = None) -> None:
        abort = self._aborter.abort
        if abort is not None and self._aborter.reached("admission"):
            if abort.reason == "overloaded":
                self.rejected += 1
                raise Overloaded(abort.queued, abort.max_queue, request_id=request_id)
            await self._aborter.deliver()
        await super().acquire(priority, request_id=request_id)


class ReplayRetries(Retries):
    """Retries the same agent exactly where the recorded run did: the deadline it measured
    is an effect of that run's timing, not of the decision logic."""

    def __init__(self, decisions: Sequence[bool], same_model: Sequence[bool] = ()) -> None:
        super().__init__()
        self._decisions = list(decisions)
        self._same_model = list(same_model)

    def worth_waiting(self, remaining_s: float, attempt_s: float) -> bool:
        return self._same_model.pop(0) if self._same_model else True

    def decide(self, failure: str | None, retried: int, remaining_s: float,
               attempt_s: float = 0.0) -> RetryDecision:
        if self._decisions and self._decisions.pop(0):
            return RetryDecision(0.0, "retried in the recorded run")
        return RetryDecision(None, "not retried in the recorded run")


def replay_caches(record: Mapping[str, Any], clock: ManualClock) -> CacheSet | Literal[False]:
    """Memory-only caches holding the recorded L1 entry (if the request met one); False when
    the recorded request used no result cache, as the engine then had none or skipped it."""
    cache = record.get("cache") or {}
    key = cache.get("l1_key")
    if not isinstance(key, str):  # a tampered key (a list, a number) finds no entry
        key = None
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
