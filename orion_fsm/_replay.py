"""Replay a recorded request: a fresh request machine, today's statechart, phases and decision
logic, driven by the effects its trace recorded (scores, load and inference outcomes, L1 hits,
token ids) through adapters; `compare` names the first divergence; `live` uses the real models.
"""

from __future__ import annotations

import contextlib
import functools
import json
import re
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Final, Literal, cast

import anyio
from anyio.abc import TaskStatus
from opentelemetry.sdk.trace import TracerProvider

from ._clock import Clock, ManualClock
from ._engine import Engine, default_cache_dir
from ._exceptions import InferenceError, ModelLoadError, OrionError, RequestFailed
from ._types import GenerationParams, Message
from .backends import GenerationEvent, GenerationOutcome, LoadedModel, SamplingParams, Tokenizer
from .backends._convert import TOKENIZER_FILENAME, ConvertedModel
from .services.caches._cacheset import CacheSet
from .services.models._loader import LoadInfo, ModelKey, ModelLease, ModelLoader, ResidentModel
from .services.models._registry import AgentSpec, Registry
from .services.models._tiers import DEFAULT_VARIANT, MemoryEstimate
from .services.observability._sanitize import redaction
from .services.observability._tracefile import read_traces, upgrade_record
from .services.resilience._breaker import BreakerBoard, BreakerPermit
from .services.routing._embedding_router import decide
from .services.routing._router import RoutingDecision, RuleRouter

__all__ = [
    "Divergence",
    "ReplayBreakers",
    "ReplayLoader",
    "ReplayMode",
    "ReplayModel",
    "ReplayReport",
    "ReplayRouter",
    "compare",
    "find_records",
    "replay",
    "replay_caches",
    "replay_clock",
    "resolve_registry",
]

ReplayMode = Literal["recorded", "live"]

# What each phase decided, as its span attributes say; compared in path order, so the first
# divergence named is the cause, not one of its consequences. Outputs (token counts, finish
# reasons) are compared after the path, token by token.
_ERRORS: Final = ("error.type", "orion.error")
_DECISIONS: Final[Mapping[str, tuple[str, ...]]] = {
    "validating": _ERRORS,
    "routing": ("orion.agent", "orion.routing.source", "orion.fallback_chain", "cache.level",
                *_ERRORS),
    "loading_agent": ("orion.agent", "orion.attempt", "orion.breaker", "orion.load_error",
                      *_ERRORS),
    "inferencing": ("orion.inference_error", *_ERRORS),
    "fallback": ("orion.fallback.from", "orion.fallback.to", *_ERRORS),
}
_PROMPT_TOKENS = re.compile(r"the prompt is (\d+) tokens")
_SHOWN_CHARS: Final = 160
_REDACTED: Final = redaction("").removesuffix("]")  # how the trace writer marks a secret
_STOP_WAIT_S: Final = 5.0  # a cancelled caller tells the stream to stop within milliseconds


# --- the report -----------------------------------------------------------------------------


class _Verbatim(str):
    """A value shown as it is (a transition), not quoted like recorded text."""

    __slots__ = ()

    def __repr__(self) -> str:
        return str(self)


def _show(value: object) -> str:
    shown = repr(value)
    return shown if len(shown) <= _SHOWN_CHARS else shown[: _SHOWN_CHARS - 1] + "…"


@dataclass(frozen=True, slots=True)
class Divergence:
    """Where a replay first left the recorded run: the state, the field, both values."""

    state: str | None
    field: str
    recorded: Any
    replayed: Any

    def __str__(self) -> str:
        where = f"at {self.state}: " if self.state else ""
        return (f"{where}{self.field}: recorded {_show(self.recorded)}, "
                f"replayed {_show(self.replayed)}")

    def as_dict(self) -> dict[str, Any]:
        return {"state": self.state, "field": self.field, "recorded": self.recorded,
                "replayed": self.replayed}


@dataclass(frozen=True)
class ReplayReport:
    """The outcome of replaying one recorded request. `ok` when nothing diverged."""

    request_id: str
    mode: ReplayMode
    divergences: tuple[Divergence, ...]
    warnings: tuple[str, ...]  # what may explain a divergence (another registry, model file)
    skipped: tuple[str, ...]  # comparisons not made, and why
    elapsed_ms: float
    recorded: Mapping[str, Any] = field(repr=False)
    replayed: Mapping[str, Any] | None = field(repr=False)

    @property
    def ok(self) -> bool:
        return not self.divergences

    @property
    def first(self) -> Divergence | None:
        return self.divergences[0] if self.divergences else None

    def summary(self) -> str:
        """One line: `PASS id path (ms)` or `FAIL id <first divergence>`."""
        if self.first is not None:
            return f"FAIL {self.request_id} {self.first}"
        states = [t.get("target", "?") for t in self.recorded.get("transitions") or []]
        return f"PASS {self.request_id} {' → '.join(states)} ({self.elapsed_ms:.1f} ms)"

    def as_dict(self) -> dict[str, Any]:
        return {"request_id": self.request_id, "mode": self.mode, "ok": self.ok,
                "divergences": [d.as_dict() for d in self.divergences],
                "warnings": list(self.warnings), "skipped": list(self.skipped),
                "elapsed_ms": round(self.elapsed_ms, 3)}


# --- what the recorded run met outside the machine ------------------------------------------


AbortPoint = Literal["route", "prepare", "acquire", "lease", "generate"]


@dataclass(frozen=True, slots=True)
class _Output:
    """One attempt's generation, as recorded: what it emitted and how it ended."""

    token_ids: tuple[int, ...] = ()
    text: str = ""
    finish_reason: str | None = None
    error: str | None = None  # the InferenceError it raised after emitting the above
    cancel: bool = False  # the caller cancelled once it was all emitted


@dataclass(frozen=True, slots=True)
class _Attempt:
    """One agent's turn in loading_agent (and inferencing), as recorded."""

    agent: str
    sha256: str | None
    input_tokens: int | None
    prepare_error: str | None = None
    acquire_error: str | None = None
    breaker_open: bool = False
    load_info: LoadInfo | None = None
    output: _Output = _Output()
    final: bool = False


@dataclass(frozen=True, slots=True)
class _Abort:
    """Where the recorded caller cancelled: the `call`-th call of `point` for `agent`."""

    point: AbortPoint
    agent: str | None = None
    call: int = 1


@dataclass(frozen=True)
class _Script:
    attempts: Mapping[str, _Attempt]
    abort: _Abort | None
    warnings: tuple[str, ...]

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> _Script:
        phases: list[dict[str, Any]] = list(record.get("phases") or [])
        transitions: list[dict[str, Any]] = list(record.get("transitions") or [])
        result: dict[str, Any] = record.get("result") or {}
        model = record.get("model") or {}
        exits = [t.get("event") for t in transitions[1:]]  # phases[k] left by transitions[k+1]
        loading = [k for k, p in enumerate(phases) if p.get("state") == "loading_agent"]
        attempts: dict[str, _Attempt] = {}
        for k in loading:
            attrs: dict[str, Any] = phases[k].get("attributes") or {}
            agent = str(attrs.get("orion.agent"))
            exit_event = exits[k] if k < len(exits) else None
            error, sha = attrs.get("orion.load_error"), attrs.get("orion.model.sha256")
            inference = phases[k + 1] if k + 1 < len(phases) else None
            inference_attrs = (inference.get("attributes") or {}) if inference is not None and \
                inference.get("state") == "inferencing" else {}
            final = k == loading[-1]
            output = _Output(error=inference_attrs.get("orion.inference_error"))
            if final:
                output = replace(output, token_ids=tuple(result.get("token_ids") or ()),
                                 text=str(result.get("text") or ""),
                                 finish_reason=result.get("finish_reason"))
            attempts[agent] = _Attempt(
                agent=agent, sha256=sha or (model.get("sha256") if final and error is None
                                            else None),
                input_tokens=_input_tokens(attrs), final=final,
                # A failed load noted after the model's digest failed in acquire, not prepare.
                prepare_error=error if error is not None and sha is None else None,
                acquire_error=error if error is not None and sha is not None else None,
                breaker_open=exit_event == "breaker_open", load_info=_load_info(attrs),
                output=output)
        routed = (result.get("routing") or {}).get("agent")
        if isinstance(routed, str) and routed not in attempts:
            # Served from L1, or refused before loading: only routing's L1 lookup prepared it.
            attempts[routed] = _Attempt(agent=routed, sha256=model.get("sha256"),
                                        input_tokens=None, final=not loading)
        abort, warnings = _abort_point(record, phases, transitions, attempts)
        if abort is not None and abort.point == "generate":
            final_agent = next(a for a in attempts.values() if a.final)
            attempts[final_agent.agent] = replace(
                final_agent, output=replace(final_agent.output, cancel=True))
        return cls(attempts, abort, warnings)

    def attempt(self, agent: AgentSpec) -> _Attempt:
        try:
            return self.attempts[agent.id]
        except KeyError:
            # The path already left the recorded one (compare names where): say so here too.
            raise ModelLoadError(f"replay has no recorded outcome for agent {agent.id!r}: the "
                                 "recorded run never loaded it") from None


def _input_tokens(attrs: Mapping[str, Any]) -> int | None:
    count = attrs.get("gen_ai.usage.input_tokens")
    if isinstance(count, int):
        return count
    # A prompt refused for its length is refused before its count is noted; the message has it.
    found = _PROMPT_TOKENS.search(str(attrs.get("orion.error") or ""))
    return int(found.group(1)) if found else None


def _load_info(attrs: Mapping[str, Any]) -> LoadInfo | None:
    if "orion.model" not in attrs:
        return None
    return LoadInfo(
        model=str(attrs["orion.model"]),
        variant=str(attrs.get("orion.model.variant", DEFAULT_VARIANT)),
        loaded_now=bool(attrs.get("orion.model.loaded_now", False)),
        load_ms=float(attrs.get("orion.model.load_ms", 0.0)),
        estimate_mb=float(attrs.get("orion.model.estimate_mb", 0.0)),
        unloaded=tuple(attrs.get("orion.model.unloaded") or ()),
        preloaded=bool(attrs.get("orion.model.preloaded", False)),
    )


def _abort_point(record: Mapping[str, Any], phases: Sequence[Mapping[str, Any]],
                 transitions: Sequence[Mapping[str, Any]],
                 attempts: Mapping[str, _Attempt]) -> tuple[_Abort | None, tuple[str, ...]]:
    """Where to cancel the replayed request so that it aborts where the recorded one did."""
    last = transitions[-1].get("event") if transitions else None
    reason = (record.get("result") or {}).get("error_reason")
    if last == "rejected":
        return None, (f"the recorded request was rejected before it started ({reason}); "
                      "replay cannot provoke that, so expect a divergence there",)
    if last != "abort":
        return None, ()
    state = transitions[-1].get("source")
    if reason != "cancelled":
        return None, (f"the recorded request was aborted in {state} ({reason}); replay cannot "
                      "provoke that abort, so expect a divergence there",)
    attrs: Mapping[str, Any] = (phases[-1].get("attributes") or {}) if phases else {}
    final = next((a for a in attempts.values() if a.final), None)
    if state == "routing":
        if "orion.agent" not in attrs:
            return _Abort("route"), ()
        return _Abort("prepare", str(attrs["orion.agent"])), ()
    if state == "loading_agent" and final is not None:
        if final.sha256 is not None and "orion.model.sha256" in attrs:
            return _Abort("acquire", final.agent), ()
        # routing's L1 lookup prepared the same agent first (prepare is then cached: a caller
        # could not have cancelled in that second, instant, call)
        cache = record.get("cache") or {}
        first_attempt = attrs.get("orion.attempt", 0) == 0
        call = 2 if cache.get("l1_key") and first_attempt else 1
        return _Abort("prepare", final.agent, call), ()
    if state == "inferencing" and final is not None:
        if final.output.token_ids:
            return _Abort("generate", final.agent), ()
        return _Abort("lease", final.agent), ()
    return None, (f"the recorded request was cancelled in {state}; replay cannot cancel it "
                  "there, so expect a divergence there",)


class _Canceller:
    """Cancels the replayed request at the recorded abort point, as its caller did."""

    def __init__(self, abort: _Abort | None) -> None:
        self.abort = abort
        self.scope: anyio.CancelScope | None = None
        self._calls: dict[tuple[str, str | None], int] = {}

    def reached(self, point: AbortPoint, agent: str | None = None) -> bool:
        """Count this call; True (and the request cancelled) if the recorded caller gave up here."""
        abort = self.abort
        if abort is None or abort.point != point or abort.agent not in (None, agent):
            return False
        key = (point, agent)
        self._calls[key] = self._calls.get(key, 0) + 1
        if self._calls[key] != abort.call:
            return False
        self.cancel()
        return True

    def cancel(self) -> None:
        if self.scope is not None:
            self.scope.cancel()

    def cancel_from_thread(self) -> None:
        anyio.from_thread.run_sync(self.cancel)


# --- the adapters ---------------------------------------------------------------------------


class ReplayRouter:
    """Routes a replayed request with today's decision logic on what the recorded run saw.

    Embedding decisions are re-made from the recorded per-agent scores (`decide`) with
    `thresholds` (default: the router's defaults), so a changed threshold shows up as a
    divergence; rule decisions re-run the rule router on the text, which is all they read.
    """

    def __init__(self, record: Mapping[str, Any], registry: Registry, *,
                 thresholds: Mapping[str, float] | None = None,
                 canceller: _Canceller | None = None) -> None:
        self._recorded: Mapping[str, Any] = (record.get("result") or {}).get("routing") or {}
        self._registry = registry
        self._rules = RuleRouter(registry)
        self._thresholds = thresholds
        self._canceller = canceller
        self.warnings: list[str] = []

    def warm_texts(self) -> tuple[str, ...]:
        return ()

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
    estimate: MemoryEstimate

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

    def __init__(self, output: _Output, max_tokens: int) -> None:
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

    def __init__(self, inner: Any, exhausted: Callable[[], bool], output: _Output, *,
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
        event: GenerationEvent | None = self._inner.next_event()
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
        outcome: GenerationOutcome = self._inner.outcome
        return outcome

    def close(self) -> None:
        self._inner.close()


class _UnknownVocabulary:
    """The vocabulary of a model whose tokenizer is not here: any recorded id belongs to it."""

    vocab_size = 2**31 - 1


class ReplayModel:
    """A loaded model that generates what the recorded attempt generated, then fails or is
    cancelled as it was. With the model's tokenizer the ids are decoded by the real
    generation loop (text, stop strings, max_tokens); without it, the recorded text is used."""

    def __init__(self, output: _Output, *, tokenizer: Tokenizer | None, context_length: int,
                 model_path: Path, canceller: _Canceller | None = None) -> None:
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
        inner: Any
        tokenizer = self._decoder
        if tokenizer is None:
            inner = _RecordedStream(self.output, params.max_tokens)
            exhausted: Callable[[], bool] = lambda: inner.exhausted  # noqa: E731
        else:
            ends = [tokenizer.token_id(t) for t in ("<|im_end|>", "<|endoftext|>")]
            runtime = _ReplayRuntime(
                self.output.token_ids, context_length=self.context_length,
                eos_token_id=next((i for i in ends if i is not None), tokenizer.vocab_size))
            model = LoadedModel(runtime, tokenizer, model_path=self.model_path, threads=1)
            inner = model.open_stream(prompt_ids, params)
            exhausted = lambda: runtime.exhausted  # noqa: E731
        return _ReplayStream(inner, exhausted, self.output, cancel=cancel,
                             should_stop=should_stop)


class _ReplayLease:
    """What the phases use of a `ModelLease`."""

    def __init__(self, model: Any, load_info: LoadInfo, prepared: Any) -> None:
        self.model = model
        self.load_info = load_info
        self.prepared = prepared
        self.generation_lock = anyio.Semaphore(1)

    def release(self) -> None:
        return None


class ReplayLoader:
    """Stands in for the `ModelLoader`: serves each agent's recorded load outcome, never loads.

    `prepare` and `acquire` raise the recorded `ModelLoadError` where the recorded run failed;
    the lease's model is a `ReplayModel`. The engine's lifetime hooks (`run`, `stop`,
    `aclose`) and what the memory monitor reads are there and do nothing.
    """

    def __init__(self, script: _Script, registry: Registry, *, record: Mapping[str, Any],
                 tokenizers: Mapping[str, Tokenizer], clock: ManualClock,
                 canceller: _Canceller | None = None, encode_prompts: bool = True) -> None:
        self._script = script
        self._registry = registry
        self._tokenizers = tokenizers
        self._encode_prompts = encode_prompts
        self._prompt_ids: Sequence[int] = record.get("prompt_token_ids") or ()
        self._source = (record.get("model") or {}).get("source")
        self._canceller = canceller
        self._prepared: dict[str, _ReplayPrepared] = {}
        self.clock = clock
        self.monitor: object | None = None  # the memory monitor binds itself here
        self.budget_bytes = 0
        self.used_bytes = 0

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

    def _prepared_for(self, agent: AgentSpec, attempt: _Attempt) -> _ReplayPrepared:
        prepared = self._prepared.get(agent.id)
        if prepared is None:
            prepared = self._prepared[agent.id] = self._prepare(agent, attempt)
        return prepared

    def _prepare(self, agent: AgentSpec, attempt: _Attempt) -> _ReplayPrepared:
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
            tokenizer=tokenizer, estimate=MemoryEstimate(0, 0, 0))

    async def acquire(self, agent: AgentSpec, *, variant: str | None = None) -> _ReplayLease:
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
        return _ReplayLease(model, info, prepared)

    @contextlib.asynccontextmanager
    async def lease(self, agent: AgentSpec) -> AsyncIterator[Any]:
        lease = await self.acquire(agent)
        try:
            yield lease
        finally:
            lease.release()

    # What the engine and its memory monitor call on a loader: nothing to run or unload.

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        task_status.started()

    def stop(self) -> None:
        return None

    async def aclose(self) -> None:
        return None

    def models(self) -> list[ResidentModel]:
        return []

    def loaded(self) -> list[ModelKey]:
        return []

    async def unload_idle(self, *, limit: int | None = None) -> list[str]:
        return []


class _LiveLoader:
    """The real loader for live replay; recorded failures are still served as recorded, so
    that the real model generates exactly where the recorded run generated."""

    def __init__(self, inner: ModelLoader, script: _Script) -> None:
        self.inner = inner
        self._script = script
        self.clock = inner.clock
        self.warnings: list[str] = []

    @property
    def monitor(self) -> Any:
        return self.inner.monitor

    @monitor.setter
    def monitor(self, value: Any) -> None:
        self.inner.monitor = value

    @property
    def budget_bytes(self) -> int:
        return self.inner.budget_bytes

    @property
    def used_bytes(self) -> int:
        return self.inner.used_bytes

    async def prepare(self, agent: AgentSpec, *, variant: str | None = None) -> Any:
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

    async def acquire(self, agent: AgentSpec, *, variant: str | None = None) -> Any:
        attempt = self._script.attempt(agent)
        if attempt.prepare_error is not None or attempt.acquire_error is not None:
            raise ModelLoadError(attempt.prepare_error or attempt.acquire_error or "")
        lease: ModelLease = await self.inner.acquire(agent, variant=variant)
        if attempt.output.error is None:
            return lease
        # A recorded inference failure (an injected fault, a broken runtime) is an effect:
        # replay it on the real lease, with what the model had emitted before failing.
        model = ReplayModel(attempt.output, tokenizer=lease.model.tokenizer,
                            context_length=agent.context_length,
                            model_path=lease.model.model_path)
        return _FailingLease(lease, model)

    @contextlib.asynccontextmanager
    async def lease(self, agent: AgentSpec) -> AsyncIterator[Any]:
        lease = await self.acquire(agent)
        try:
            yield lease
        finally:
            lease.release()

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        await self.inner.run(task_status=task_status)

    def stop(self) -> None:
        self.inner.stop()

    async def aclose(self) -> None:
        await self.inner.aclose()

    def models(self) -> list[ResidentModel]:
        return self.inner.models()

    async def unload_idle(self, *, limit: int | None = None) -> list[str]:
        return await self.inner.unload_idle(limit=limit)


class _FailingLease:
    def __init__(self, lease: ModelLease, model: ReplayModel) -> None:
        self._lease = lease
        self.model = model
        self.load_info = lease.load_info
        self.prepared = lease.prepared
        self.generation_lock = lease.generation_lock

    def release(self) -> None:
        self._lease.release()


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


# --- the registry the trace names -----------------------------------------------------------


@functools.lru_cache(maxsize=16)
def _load_registry(path: Path | None, _stamp: tuple[int, int]) -> Registry:
    return Registry.load(path)


def _registry_at(path: Path | None) -> Registry:
    from ._resources import data_file

    file = data_file("models.json") if path is None else path.expanduser().resolve()
    stat = file.stat()
    # Keyed by size and mtime: a registry edited between two replays is read again.
    return _load_registry(None if path is None else file, (stat.st_mtime_ns, stat.st_size))


def resolve_registry(record: Mapping[str, Any], registry: Registry | str | Path | None = None
                     ) -> tuple[Registry, list[str]]:
    """The registry to replay `record` with, and warnings.

    An explicit `registry` is used as given (a warning if its digest is not the recorded
    one); otherwise the recorded `registry_source` if its digest matches, else the packaged
    registry (a warning if it does not match either).
    """
    digest = record.get("registry_digest")
    if registry is not None:
        given = registry if isinstance(registry, Registry) else _registry_at(Path(registry))
        return given, _digest_warning(digest, given)
    source = record.get("registry_source")
    if source:
        try:
            named = _registry_at(Path(source))
        except (OrionError, OSError):
            named = None
        if named is not None and named.digest == digest:
            return named, []
    packaged = _registry_at(None)
    return packaged, _digest_warning(digest, packaged)


def _digest_warning(digest: object, registry: Registry) -> list[str]:
    if digest is None or registry.digest == digest:
        return []
    where = registry.source or "the given registry"
    return [f"the trace was recorded with registry {str(digest)[:12]}…, replayed with {where} "
            f"({registry.digest[:12]}…): agents, prompts or routing hints may differ"]


# --- tokenizers -----------------------------------------------------------------------------


@functools.lru_cache(maxsize=8)
def _tokenizer_at(path: Path, _stamp: tuple[int, int]) -> Tokenizer:
    return Tokenizer.from_file(path)


def _find_tokenizers(script: _Script, record: Mapping[str, Any],
                     cache_dir: Path) -> dict[str, Tokenizer]:
    """sha256 -> tokenizer, for the recorded models whose tokenizer.json is on this machine:
    the converted copy in the model cache, or the one beside the recorded source file."""
    source = (record.get("model") or {}).get("source")
    final_sha = (record.get("model") or {}).get("sha256")
    found: dict[str, Tokenizer] = {}
    for sha in {a.sha256 for a in script.attempts.values() if a.sha256}:
        candidates = [cache_dir / sha[:16] / TOKENIZER_FILENAME]
        if source and sha == final_sha:
            candidates.append(Path(source).parent / TOKENIZER_FILENAME)
        for path in candidates:
            try:
                stat = path.stat()
                found[sha] = _tokenizer_at(path, (stat.st_mtime_ns, stat.st_size))
                break
            except (OSError, ModelLoadError):
                continue
    return found


# --- running and comparing ------------------------------------------------------------------


@functools.cache
def _tracer_provider() -> TracerProvider:
    # One private provider for every replay: building one per engine costs more than a replay.
    return TracerProvider()


def _params(raw: Mapping[str, Any]) -> GenerationParams:
    known = {name: raw[name] for name in GenerationParams.__slots__ if name in raw}
    if isinstance(known.get("stop"), list):
        known["stop"] = tuple(known["stop"])
    return GenerationParams(**known)


def _live_params(record: Mapping[str, Any], params: GenerationParams
                 ) -> tuple[GenerationParams, str | None]:
    """The parameters that make a live run comparable, or why its outputs are not."""
    sampling = record.get("sampling") or {}
    if (record.get("cache") or {}).get("level") or not sampling:
        return params, None
    if float(sampling.get("temperature", 0.0)) <= 0:
        return params, None
    seed = sampling.get("seed")
    if isinstance(seed, int) and seed >= 0:
        # The seed the recorded run sampled with (drawn by the engine when none was asked).
        return replace(params, seed=seed), None
    return params, ("tokens and text: the recorded run sampled (temperature "
                    f"{sampling.get('temperature')}) with a random seed the trace does not hold")


async def _send(engine: Engine, record: Mapping[str, Any], params: GenerationParams,
                canceller: _Canceller) -> None:
    request = record.get("request") or {}
    # Contents as recorded, text or not: a prompt refused for its type must be refused again.
    messages = [Message(str(m.get("role", "")), m.get("content"))  # type: ignore[arg-type]
                if isinstance(m, dict) else Message("", m)
                for m in request.get("messages") or []]
    options: dict[str, Any] = {"agent": request.get("agent"), "params": params,
                               "cache": request.get("cache")}
    with anyio.CancelScope() as scope:
        canceller.scope = scope
        try:
            if record.get("streaming"):
                async with engine.stream(messages, **options) as stream:
                    async for _ in stream:
                        pass
            else:
                await engine.infer(messages, **options)
        except RequestFailed:
            pass  # the trace line says how it failed; that is what is compared


async def replay(
    record: Mapping[str, Any], *, registry: Registry | str | Path | None = None,
    machine: str | Path | None = None, thresholds: Mapping[str, float] | None = None,
    live: bool = False, cache_dir: str | Path | None = None,
) -> ReplayReport:
    """Replay one recorded request on a fresh engine and compare it with the recording.

    `registry`, `machine` (a statechart file) and `thresholds` (embedding routing) replace
    the current ones, to see what a change would do to recorded traffic. Without `live`, no
    model is loaded: the adapters serve the recorded effects. With `live`, the real models
    (from `cache_dir`) generate where the recorded run generated, and the outputs are
    compared token by token.
    """
    started = time.perf_counter()
    record = upgrade_record(dict(record))
    request_id = str(record.get("request_id", "?"))
    resolved, warnings = await anyio.to_thread.run_sync(resolve_registry, record, registry)
    script = _Script.from_record(record)
    warnings += script.warnings
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    clock = replay_clock(record)
    canceller = _Canceller(script.abort)
    skipped: list[str] = []
    params = _params((record.get("request") or {}).get("params") or {})
    redacted = _REDACTED in json.dumps((record.get("request") or {}).get("messages"),
                                       ensure_ascii=False)
    if redacted:
        # The trace writer redacts secrets and personal data: the replayed prompt is not the
        # recorded one, so its tokens are taken from the trace instead of encoded again.
        warnings.append("the recorded prompt was redacted (secrets or personal data): replay "
                        "sends the redacted text, so rule routing and the result cache key "
                        "may differ from the recording")
    router = ReplayRouter(record, resolved, thresholds=thresholds, canceller=canceller)
    replay_loader: ReplayLoader | None = None
    live_loader: _LiveLoader | None = None
    if live:
        live_loader = _LiveLoader(ModelLoader(root, clock=clock), script)
        loader: Any = live_loader
        params, why = _live_params(record, params)
        if why is not None:
            skipped.append(why)
        if script.abort is not None:
            canceller = _Canceller(None)
            skipped.append("the recorded caller cancelled: a live run is not cancelled at the "
                           "same token, so only its path up to the cancellation is compared")
    else:
        tokenizers = await anyio.to_thread.run_sync(_find_tokenizers, script, record, root)
        replay_loader = ReplayLoader(script, resolved, record=record, tokenizers=tokenizers,
                                     clock=clock, canceller=canceller,
                                     encode_prompts=not redacted)
        loader = replay_loader
    # The breaker board is an effect too: refuse where the recorded run was refused.
    breakers = ReplayBreakers(frozenset(a.agent for a in script.attempts.values()
                                        if a.breaker_open), record.get("breakers"), clock=clock)
    with tempfile.TemporaryDirectory(prefix="orion-replay-") as folder:
        trace_file = Path(folder) / "replay.jsonl"
        engine = Engine(
            resolved, router=router, loader=cast(ModelLoader, loader),
            caches=replay_caches(record, clock), clock=clock, embeddings=False,
            warm_up=False, trace_path=trace_file, tracer_provider=_tracer_provider(),
            machine=machine, memory_interval_s=3600.0, breakers=breakers)
        failure: str | None = None
        try:
            async with engine:
                await _send(engine, record, params, canceller)
        except Exception as exc:  # a broken statechart or phase: report it, do not crash
            failure = f"{type(exc).__name__}: {exc}"
        replayed_records = await anyio.to_thread.run_sync(
            lambda: list(read_traces(trace_file)) if trace_file.exists() else [])
    warnings += router.warnings + (live_loader.warnings if live_loader else [])
    replayed = replayed_records[-1] if replayed_records else None
    if replayed is None:
        divergences = [Divergence(None, "trace line", "one record",
                                  _Verbatim(failure or "none written"))]
    else:
        until_abort = live and script.abort is not None
        divergences = _path_divergences(record, replayed, until_abort=until_abort)
        if divergences:
            skipped.clear()  # the outputs of another path are not compared at all
        elif not until_abort:
            decoded = live or (replay_loader is not None
                               and replay_loader.decodes(_final_agent(record)))
            if not decoded and (record.get("result") or {}).get("token_ids"):
                skipped.append("text: no tokenizer.json of the recorded model here, so the "
                               "recorded text is replayed as it is and only token ids are "
                               "compared")
            divergences = _output_divergences(record, replayed, text=decoded, outputs=not (
                live and any(s.startswith("tokens and text") for s in skipped)))
        if failure is not None:
            divergences.append(Divergence(None, "replay", "no error", _Verbatim(failure)))
    return ReplayReport(
        request_id=request_id, mode="live" if live else "recorded",
        divergences=tuple(divergences), warnings=tuple(dict.fromkeys(warnings)),
        skipped=tuple(skipped), elapsed_ms=(time.perf_counter() - started) * 1e3,
        recorded=record, replayed=replayed)


def _final_agent(record: Mapping[str, Any]) -> str:
    result = record.get("result") or {}
    return str(result.get("agent") or (result.get("routing") or {}).get("agent") or "")


def _transition(t: Mapping[str, Any] | None) -> _Verbatim:
    if t is None:
        return _Verbatim("(no transition)")
    return _Verbatim(f"{t.get('source')} --{t.get('event')}--> {t.get('target')}")


def compare(recorded: Mapping[str, Any], replayed: Mapping[str, Any], *, outputs: bool = True,
            text: bool = True) -> list[Divergence]:
    """How `replayed` differs from `recorded` (two trace records of one request).

    The path first: each phase's decisions, then the transition that left it, in order;
    the first difference is the only one reported, since everything after it follows from
    it. On the same path, the outputs: agent, fallback, cache, error, finish reason, prompt
    and generated token ids (the first differing index), and the text if `text`.
    """
    return (_path_divergences(recorded, replayed)
            or _output_divergences(recorded, replayed, outputs=outputs, text=text))


def _path_divergences(recorded: Mapping[str, Any], replayed: Mapping[str, Any], *,
                      until_abort: bool = False) -> list[Divergence]:
    rt = list(recorded.get("transitions") or [])
    pt = list(replayed.get("transitions") or [])
    rp = list(recorded.get("phases") or [])
    pp = list(replayed.get("phases") or [])
    if until_abort and rt and rt[-1].get("event") == "abort":
        # Up to the phase the caller cancelled, which a live run does not cancel.
        rt, rp = rt[:-1], rp[: len(rt) - 2]
        pt, pp = pt[: len(rt)], pp[: len(rp)]
    for i in range(max(len(rt), len(pt))):
        if i >= 1 and i - 1 < len(rp) and i - 1 < len(pp):
            divergence = _phase_divergence(rp[i - 1], pp[i - 1])
            if divergence is not None:
                return [divergence]
        r, p = (rt[i] if i < len(rt) else None), (pt[i] if i < len(pt) else None)
        key = ("event", "source", "target")
        if r is None or p is None or any(r.get(k) != p.get(k) for k in key):
            state = (r or p or {}).get("source")
            return [Divergence(state, f"transition {i}", _transition(r), _transition(p))]
    return []


def _phase_divergence(recorded: Mapping[str, Any],
                      replayed: Mapping[str, Any]) -> Divergence | None:
    state = str(recorded.get("state"))
    r_attrs: Mapping[str, Any] = recorded.get("attributes") or {}
    p_attrs: Mapping[str, Any] = replayed.get("attributes") or {}
    for name in _DECISIONS.get(state, _ERRORS):
        if r_attrs.get(name) != p_attrs.get(name):
            return Divergence(state, name, r_attrs.get(name), p_attrs.get(name))
    return None


def _output_divergences(recorded: Mapping[str, Any], replayed: Mapping[str, Any], *,
                        outputs: bool, text: bool) -> list[Divergence]:
    r: Mapping[str, Any] = recorded.get("result") or {}
    p: Mapping[str, Any] = replayed.get("result") or {}
    final = str(r.get("state"))
    producer = "routing" if r.get("cache") else "inferencing"
    found: list[Divergence] = []
    for name, state in (("agent", "loading_agent"), ("requested_agent", "routing"),
                        ("agents_tried", "loading_agent"), ("fallback", "fallback"),
                        ("cache", "routing"), ("error_reason", final), ("error", final)):
        if r.get(name) != p.get(name):
            found.append(Divergence(state, f"result.{name}", r.get(name), p.get(name)))
    if not outputs:
        return found
    if r.get("finish_reason") != p.get("finish_reason"):
        found.append(Divergence(producer, "result.finish_reason", r.get("finish_reason"),
                                p.get("finish_reason")))
    for name, state, rv, pv in (
        ("prompt_token_ids", "loading_agent", recorded.get("prompt_token_ids"),
         replayed.get("prompt_token_ids")),
        ("result.token_ids", producer, r.get("token_ids"), p.get("token_ids")),
    ):
        divergence = _first_difference(name, state, list(rv or ()), list(pv or ()))
        if divergence is not None:
            found.append(divergence)
    if text and r.get("text") != p.get("text"):
        found.append(Divergence(producer, "result.text", r.get("text"), p.get("text")))
    return found


def _first_difference(name: str, state: str, recorded: list[Any],
                      replayed: list[Any]) -> Divergence | None:
    for i, (a, b) in enumerate(zip(recorded, replayed, strict=False)):
        if a != b:
            return Divergence(state, f"{name}[{i}] (of {len(recorded)})", a, b)
    if len(recorded) != len(replayed):
        return Divergence(state, f"{name}: length", len(recorded), len(replayed))
    return None


def find_records(path: Path, request_id: str | None = None) -> list[dict[str, Any]]:
    """The records of a trace file, or those whose request (or trace) id starts with
    `request_id`; an OrionError naming the file if none does."""
    records = list(read_traces(path))
    if request_id is None:
        return records
    chosen = [r for r in records if str(r.get("request_id", "")).startswith(request_id)
              or str(r.get("trace_id", "")).startswith(request_id)]
    if not chosen:
        raise OrionError(f"no request {request_id!r} in {path} ({len(records)} records); "
                         "`orion-fsm trace show` lists their ids")
    return chosen
