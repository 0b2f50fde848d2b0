"""Fault injection around the real backend: models that raise, hang or return garbage, and real
broken files (missing, truncated, corrupt models; malformed registries; unwritable paths).

`faulty_loader(rate, kinds, seed)` has the signature of `LoadedModel.load`, for the loader's
`load_model=` seam; the models it loads are real and fail only when the seeded plan says so.
"""

from __future__ import annotations

import json
import random
import shutil
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Final, Literal

from orion_fsm._exceptions import ConfigurationError, InferenceError, ModelLoadError
from orion_fsm.backends import (
    CoreGate,
    GenerationEvent,
    GenerationOutcome,
    GenerationStream,
    LoadedModel,
    SamplingParams,
    Threads,
)

__all__ = [
    "FAULT_KINDS",
    "FaultKind",
    "FaultPlan",
    "FaultyModel",
    "break_model_file",
    "faulty_loader",
    "occupy_path",
    "write_broken_registry",
]

FaultKind = Literal["raise", "hang", "malformed", "load_error"]
FAULT_KINDS: Final[tuple[FaultKind, ...]] = ("raise", "hang", "malformed", "load_error")
_GENERATION_KINDS: Final = frozenset({"raise", "hang", "malformed"})
_POLL_S: Final = 0.01  # how often a hung generation looks at should_stop()
# Text a broken runtime could hand back: a replacement character, C0 controls, a lone byte.
_GARBAGE: Final = b"\xff\xfe\x00\x07garbage\x1b[0m\xc3".decode("utf-8", errors="replace")


class FaultPlan:
    """Decides, call by call, whether to inject a fault and which one. Thread-safe, seeded.

    `injected` counts what was injected, by kind, so a test or benchmark can compare it with
    what the engine reported.
    """

    def __init__(self, rate: float, kinds: Sequence[FaultKind] = ("raise", "hang", "malformed"),
                 seed: int = 0, *, hang_s: float = 3600.0, after_tokens: int = 0) -> None:
        if not 0.0 <= rate <= 1.0:
            raise ConfigurationError("FaultPlan.rate", rate, "a fault rate between 0 and 1")
        unknown = set(kinds) - set(FAULT_KINDS)
        if unknown or not kinds:
            raise ConfigurationError("FaultPlan.kinds", list(kinds),
                                     f"fault kinds among {', '.join(FAULT_KINDS)}")
        if after_tokens < 0:
            raise ConfigurationError("FaultPlan.after_tokens", after_tokens, "0 or more")
        self.rate = rate
        self.kinds = tuple(kinds)
        self.hang_s = hang_s
        # raise and hang strike after this many real tokens: a runtime that stalls or
        # fails mid-generation, once text already reached a streaming caller.
        self.after_tokens = after_tokens
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self.injected: Counter[str] = Counter()
        self.calls = 0

    def draw(self, among: frozenset[str]) -> FaultKind | None:
        """The fault for this call, among the kinds that apply to it, or None."""
        candidates = [k for k in self.kinds if k in among]
        with self._lock:
            self.calls += 1
            if not candidates or self._rng.random() >= self.rate:
                return None
            kind = candidates[self._rng.randrange(len(candidates))]
            self.injected[kind] += 1
            return kind


class FaultyModel(LoadedModel):
    """A real loaded model whose generations fail as the plan says; otherwise it delegates."""

    def __init__(self, inner: LoadedModel, plan: FaultPlan) -> None:
        # Not LoadedModel.__init__: the runtime and its lock belong to `inner`.
        self.inner = inner
        self.plan = plan
        self.model_path = inner.model_path
        self.tokenizer = inner.tokenizer
        self.context_length = inner.context_length
        self.eos_token_ids = inner.eos_token_ids

        self.hanging = 0  # generations stuck in an injected hang right now

    @property
    def closed(self) -> bool:
        return self.inner.closed

    @property
    def cached_ids(self) -> tuple[int, ...]:
        return self.inner.cached_ids

    @property
    def generating(self) -> bool:
        return self.hanging > 0 or self.inner.generating

    def close(self) -> None:
        self.inner.close()

    def generate(self, prompt_ids: Sequence[int], params: SamplingParams, *,
                 on_event: Callable[[GenerationEvent], None],
                 should_stop: Callable[[], bool], threads: Threads = None,
                 cores: CoreGate | None = None) -> GenerationOutcome:
        kind = self.plan.draw(_GENERATION_KINDS)
        if kind in ("raise", "hang") and self.plan.after_tokens:
            stream = _LateFaultStream(kind, self, prompt_ids, params, should_stop)
            try:
                while (event := stream.next_event()) is not None:
                    on_event(event)
                return stream.outcome
            finally:
                stream.close()
        if kind == "raise":
            raise InferenceError(f"injected fault: model {self.model_path} failed to sample")
        if kind == "hang":
            self.hanging += 1
            try:
                _hang(should_stop, self.plan.hang_s)
            finally:
                self.hanging -= 1
            return GenerationOutcome((), "", "cancelled")
        if kind == "malformed":
            event = self._garbage()
            on_event(event)
            return GenerationOutcome(event.token_ids, event.text, "stop")
        return self.inner.generate(prompt_ids, params, on_event=on_event,
                                   should_stop=should_stop, threads=threads, cores=cores)

    def open_stream(self, prompt_ids: Sequence[int], params: SamplingParams, *,
                    should_stop: Callable[[], bool] | None = None, threads: Threads = None,
                    cores: CoreGate | None = None, interval_s: float = 0.0) -> GenerationStream:
        kind = self.plan.draw(_GENERATION_KINDS)
        if kind is None:
            return self.inner.open_stream(prompt_ids, params, should_stop=should_stop,
                                          threads=threads, cores=cores, interval_s=interval_s)
        if kind in ("raise", "hang") and self.plan.after_tokens:
            return _LateFaultStream(kind, self, prompt_ids, params, should_stop)
        return _FaultyStream(kind, self, should_stop)

    def _garbage(self) -> GenerationEvent:
        vocab = self.tokenizer.vocab_size
        return GenerationEvent((vocab + 7, -1, vocab), _GARBAGE)


class _FaultyStream(GenerationStream):
    """A stream that fails like its fault kind; `close()` from any thread ends a hang."""

    def __init__(self, kind: FaultKind, model: FaultyModel,
                 should_stop: Callable[[], bool] | None) -> None:
        # Not GenerationStream.__init__: no real generation is opened.
        self._kind = kind
        self._model = model
        self._stop = should_stop or (lambda: False)
        self._closed_event = threading.Event()
        self._sent = False
        self._fault_outcome: GenerationOutcome | None = None

    def next_event(self) -> GenerationEvent | None:
        if self._fault_outcome is not None:
            return None
        if self._kind == "raise":
            raise InferenceError(
                f"injected fault: model {self._model.model_path} failed to sample")
        if self._kind == "hang":
            self._model.hanging += 1
            try:
                _hang(lambda: self._closed_event.is_set() or self._stop(),
                      self._model.plan.hang_s)
            finally:
                self._model.hanging -= 1
            self._fault_outcome = GenerationOutcome((), "", "cancelled")
            return None
        if not self._sent:
            self._sent = True
            return self._model._garbage()
        event = self._model._garbage()
        self._fault_outcome = GenerationOutcome(event.token_ids, event.text, "stop")
        return None

    @property
    def outcome(self) -> GenerationOutcome:
        if self._fault_outcome is None:
            raise InferenceError("the generation has not finished; call next_event() until None")
        return self._fault_outcome

    def close(self) -> None:
        self._closed_event.set()
        if self._fault_outcome is None:
            self._fault_outcome = GenerationOutcome((), "", "cancelled")


class _LateFaultStream(GenerationStream):
    """The real generation for the plan's `after_tokens` tokens, then its fault: it raises,
    or hangs until told to stop (closed, or `should_stop`)."""

    def __init__(self, kind: FaultKind, model: FaultyModel, prompt_ids: Sequence[int],
                 params: SamplingParams, should_stop: Callable[[], bool] | None) -> None:
        # Not GenerationStream.__init__: the real stream is `inner`.
        self._kind = kind
        self._model = model
        self._stop = should_stop or (lambda: False)
        self._closed_event = threading.Event()
        self._inner = model.inner.open_stream(prompt_ids, params, should_stop=should_stop)
        self._token_ids: list[int] = []
        self._texts: list[str] = []
        self._fault_outcome: GenerationOutcome | None = None

    def next_event(self) -> GenerationEvent | None:
        if self._fault_outcome is not None:
            return None
        if len(self._token_ids) >= self._model.plan.after_tokens:
            self._inner.close()  # the model is free again, as after a real failure
            if self._kind == "raise":
                raise InferenceError(f"injected fault: model {self._model.model_path} failed "
                                     f"to sample after {len(self._token_ids)} tokens")
            _hang(lambda: self._closed_event.is_set() or self._stop(), self._model.plan.hang_s)
            self._fault_outcome = GenerationOutcome(tuple(self._token_ids),
                                                    "".join(self._texts), "cancelled")
            return None
        event = self._inner.next_event()
        if event is None:
            self._fault_outcome = self._inner.outcome  # it ended before the fault struck
            return None
        self._token_ids.extend(event.token_ids)
        self._texts.append(event.text)
        return event

    @property
    def outcome(self) -> GenerationOutcome:
        if self._fault_outcome is None:
            raise InferenceError("the generation has not finished; call next_event() until None")
        return self._fault_outcome

    def close(self) -> None:
        self._closed_event.set()
        self._inner.close()
        if self._fault_outcome is None:
            self._fault_outcome = GenerationOutcome(tuple(self._token_ids),
                                                    "".join(self._texts), "cancelled")


def _hang(should_stop: Callable[[], bool], hang_s: float) -> None:
    """Block the worker thread like a stuck runtime, yet leave when told to stop."""
    deadline = time.monotonic() + hang_s
    while not should_stop() and time.monotonic() < deadline:
        time.sleep(_POLL_S)


def faulty_loader(rate: float, kinds: Sequence[FaultKind] = ("raise", "hang", "malformed"),
                  seed: int = 0, *, hang_s: float = 3600.0, after_tokens: int = 0,
                  only: Sequence[str] = (),
                  load: Callable[..., LoadedModel] = LoadedModel.load) -> FaultyLoader:
    """A `load_model` for `ModelLoader(load_model=...)`: loads the real model, then wraps it.

    With `load_error` among `kinds`, a load itself fails at `rate` with ModelLoadError.
    `after_tokens`: raise and hang strike after that many real tokens (mid-generation).
    `only`: fault only models whose path contains one of these strings (one agent's model,
    to watch its breaker open while the others serve). The plan is shared by every model it
    loads: `loader.plan.injected` counts the faults.
    """
    return FaultyLoader(FaultPlan(rate, kinds, seed, hang_s=hang_s, after_tokens=after_tokens),
                        load, only=only)


class FaultyLoader:
    """Callable with `LoadedModel.load`'s signature. Made by `faulty_loader`."""

    def __init__(self, plan: FaultPlan, load: Callable[..., LoadedModel], *,
                 only: Sequence[str] = ()) -> None:
        self.plan = plan
        self.only = tuple(only)
        self._load = load

    def __call__(self, model_path: Path, tokenizer_path: Path, *, context_length: int,
                 threads: int | None = None, model_type: str = "llama") -> LoadedModel:
        if self.only and not any(part in str(model_path) for part in self.only):
            return self._load(model_path, tokenizer_path, context_length=context_length,
                              threads=threads, model_type=model_type)
        if self.plan.draw(frozenset({"load_error"})) == "load_error":
            raise ModelLoadError(f"injected fault: the runtime refused {model_path}")
        model = self._load(model_path, tokenizer_path, context_length=context_length,
                           threads=threads, model_type=model_type)
        return FaultyModel(model, self.plan)


# --- broken files ---------------------------------------------------------------------------

ModelFileFault = Literal["missing", "truncated", "corrupt"]
# GGUF header: magic (4) version (4) tensor count (8) metadata count (8), then the first
# metadata key's length (8): an absurd length there breaks every reader the same way.
_FIRST_KEY_LENGTH_OFFSET: Final = 24


def break_model_file(source: Path, dest_dir: Path, kind: ModelFileFault) -> Path:
    """A broken copy of the model `source` in `dest_dir` (its tokenizer.json copied beside).

    missing: the path where the model should be, with no file. truncated: the first half of
    the file. corrupt: a header whose first metadata key claims an impossible length.
    """
    dest_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = source.parent / "tokenizer.json"
    if tokenizer.is_file():
        shutil.copyfile(tokenizer, dest_dir / "tokenizer.json")
    dest = dest_dir / f"{kind}-{source.name}"
    dest.unlink(missing_ok=True)
    if kind == "missing":
        return dest
    data = bytearray(source.read_bytes())
    if kind == "truncated":
        del data[len(data) // 2:]
    elif kind == "corrupt":
        data[_FIRST_KEY_LENGTH_OFFSET:_FIRST_KEY_LENGTH_OFFSET + 8] = b"\xff" * 8
    else:
        raise ValueError(f"unknown model file fault {kind!r}; use missing, truncated or corrupt")
    dest.write_bytes(bytes(data))
    return dest


RegistryFault = Literal["not_json", "not_an_object", "missing_field", "bad_value",
                        "unknown_fallback", "empty"]


def write_broken_registry(path: Path, kind: RegistryFault,
                          valid: dict[str, Any] | None = None) -> Path:
    """Write a malformed registry document at `path`, made from `valid` when it is given."""
    doc: dict[str, Any] = json.loads(json.dumps(valid)) if valid else {
        "version": 1, "default_agent": "a",
        "agents": [{"id": "a", "role": "a", "description": "a", "capabilities": [],
                    "model": {"path": "a.gguf"}, "format": "gguf", "model_type": "llama",
                    "chat_template": "chatml", "system_prompt": "", "context_length": 64,
                    "generation": {"max_tokens": 4}, "ram_estimate_mb": 1, "fallback": None}]}
    text: str
    if kind == "empty":
        text = ""
    elif kind == "not_json":
        text = json.dumps(doc)[:-2] + ",}"
    elif kind == "not_an_object":
        text = json.dumps(doc["agents"])
    elif kind == "missing_field":
        del doc["agents"][0]["model"]
        text = json.dumps(doc)
    elif kind == "bad_value":
        doc["agents"][0]["context_length"] = -5
        text = json.dumps(doc)
    elif kind == "unknown_fallback":
        doc["agents"][0]["fallback"] = "no-such-agent"
        text = json.dumps(doc)
    else:
        raise ValueError(f"unknown registry fault {kind!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def occupy_path(path: Path) -> Path:
    """Put a regular file at `path`, so whatever expects a directory there cannot write.

    Works even as root (permissions would not stop root). Returns `path / "sub"`: a directory
    path under it that can never be created.
    """
    if path.is_dir():
        shutil.rmtree(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("not a directory\n", encoding="utf-8")
    return path / "sub"
