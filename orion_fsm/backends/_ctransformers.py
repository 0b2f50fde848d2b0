"""A model loaded in ctransformers and its blocking, streaming generation loop.

One `LoadedModel` owns one runtime context, so it runs one generation at a time; callers
run `generate` in a worker thread and receive text deltas through a synchronous callback.
"""

from __future__ import annotations

import functools
import platform
import random
import threading
import time
from collections.abc import Callable, Generator, Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Final

from orion_fsm._exceptions import InferenceError, ModelLoadError

from ._constrained import MaskedSampler, logits_view
from ._convert import read_gguf_header
from ._generation import (
    END_TOKENS,
    CoreGate,
    GenerationEvent,
    GenerationOutcome,
    PulledStream,
    SamplingParams,
    ScoreBuffers,
    TextEmitter,
    Threads,
    TokenScores,
    checked_prompt,
    merged,
)
from ._tokenizer import Tokenizer

__all__ = [
    "CoreGate",
    "GenerationEvent",
    "GenerationOutcome",
    "GenerationStream",
    "LoadedModel",
    "SamplingParams",
    "Threads",
]

# Prompt tokens evaluated per runtime call: past ~32 throughput is flat (~250 tok/s for
# SmolLM2 on 2 cores), and smaller chunks let a cancellation interrupt a long prompt sooner.
_PROMPT_CHUNK: Final = 64
_LAST_N_TOKENS: Final = 64  # window for the repetition penalty (ctransformers' default)
_LOCK_POLL_SECONDS: Final = 0.05


@functools.cache
def _runtime_library() -> str:
    # ctransformers picks its CPU build (avx2/avx/basic) with py-cpuinfo on every load, which
    # costs ~1.1 s against ~50 ms for the load itself. Decide once, from /proc/cpuinfo when
    # there is one, and hand it the choice.
    from ctransformers import lib

    # A source build ("local") always wins in ctransformers; keep that.
    local = (Path(lib.__file__).parent / "lib" / "local").is_dir()
    path: str = lib.find_library(None if local else _x86_build())
    return path


def _x86_build() -> str | None:
    """ctransformers' build for this x86 CPU on Linux; None lets ctransformers decide."""
    from orion_fsm.services.models._cpu import cpu_flags

    if platform.system() != "Linux" or platform.machine() != "x86_64":
        return None
    flags = cpu_flags()
    if not flags:
        return None
    if "avx2" in flags:
        return "avx2"
    return "avx" if {"avx", "f16c"} <= flags else "basic"


class LoadedModel:
    """One ctransformers model and its tokenizer; a lock keeps generations one at a time."""

    tokenizer: Tokenizer
    context_length: int
    eos_token_ids: frozenset[int]

    def __init__(
        self, llm: Any, tokenizer: Tokenizer, *, model_path: Path, threads: int | None
    ) -> None:
        self._llm: Any = llm
        self._lock = threading.Lock()
        self._threads = threads
        self.model_path = model_path
        self.tokenizer = tokenizer
        self.context_length = int(llm.context_length)
        ends = {tokenizer.token_id(t) for t in END_TOKENS} | {int(llm.eos_token_id)}
        self.eos_token_ids = frozenset(i for i in ends if i is not None)

    @classmethod
    def load(
        cls,
        model_path: Path,
        tokenizer_path: Path,
        *,
        context_length: int,
        threads: int | None = None,
        model_type: str = "llama",
    ) -> LoadedModel:
        """Load a converted model (see `ensure_converted`). Blocking: ~0.15 s for SmolLM2."""
        header = read_gguf_header(model_path)
        if header.version != 2:
            raise ModelLoadError(
                f"{model_path} is GGUF v{header.version}; ctransformers only opens v2 files. "
                "Pass it through ensure_converted() first"
            )
        tokenizer = Tokenizer.from_file(tokenizer_path)
        if context_length <= 0:
            raise ModelLoadError(f"context_length must be positive, got {context_length}")
        try:
            from ctransformers import LLM, Config

            config = Config(
                context_length=context_length,
                gpu_layers=0,
                threads=threads if threads is not None else -1,
                batch_size=_PROMPT_CHUNK,
            )
            llm = LLM(str(model_path), model_type, config=config, lib=_runtime_library())
        except Exception as exc:  # ctransformers raises RuntimeError/ValueError/OSError
            raise ModelLoadError(
                f"ctransformers could not load {model_path} as {model_type!r}: {exc}"
            ) from exc
        if llm.vocab_size != tokenizer.vocab_size:
            raise ModelLoadError(
                f"tokenizer {tokenizer_path} has {tokenizer.vocab_size} tokens but model "
                f"{model_path} has {llm.vocab_size}; they do not belong together"
            )
        return cls(llm, tokenizer, model_path=model_path, threads=threads)

    def __enter__(self) -> LoadedModel:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def closed(self) -> bool:
        return self._llm is None

    @property
    def cached_ids(self) -> tuple[int, ...]:
        """Token ids the context holds from the last generation: a prompt sharing a prefix
        with them evaluates only what follows it."""
        llm = self._llm
        return () if llm is None else tuple(llm._context)

    @property
    def generating(self) -> bool:
        """A generation holds the instance (possibly a thread stuck in the runtime)."""
        return self._lock.locked()

    def close(self) -> None:
        """Free the runtime's memory. Waits for a running generation; idempotent."""
        with self._lock:
            # The last reference: ctransformers frees the model in LLM.__del__.
            self._llm = None

    def generate(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        *,
        on_event: Callable[[GenerationEvent], None],
        should_stop: Callable[[], bool],
        threads: Threads = None,
        cores: CoreGate | None = None,
    ) -> GenerationOutcome:
        """Generate from `prompt_ids`, streaming text deltas to `on_event`. Blocking.

        Stops on an end-of-sequence id, a stop string (never emitted, nor anything after it),
        `max_tokens`, or when `should_stop()` turns true (checked between tokens).
        `threads` (default: the load's) is read before each runtime call; `cores`, if given,
        is held around each call (see `CoreGate`).
        """
        steps = self._steps(self._checked(prompt_ids), params, should_stop, threads, cores)
        try:
            while True:
                try:
                    event = next(steps)
                except StopIteration as done:
                    outcome: GenerationOutcome = done.value
                    return outcome
                on_event(event)
        finally:
            steps.close()  # also when on_event raises: releases the model

    def open_stream(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        *,
        should_stop: Callable[[], bool] | None = None,
        threads: Threads = None,
        cores: CoreGate | None = None,
        interval_s: float = 0.0,
    ) -> GenerationStream:
        """The same generation, pulled one event at a time (see `GenerationStream`); after
        the first event, one at most every `interval_s` (see `PulledStream`).

        Does not block: the model is taken by the first `next_event()` call.
        """
        return GenerationStream(self, self._checked(prompt_ids), params, should_stop,
                                threads=threads, cores=cores, interval_s=interval_s)

    def _checked(self, prompt_ids: Sequence[int]) -> list[int]:
        return checked_prompt(prompt_ids, self.tokenizer.vocab_size, self.context_length)

    def _steps(
        self, prompt: list[int], params: SamplingParams, should_stop: Callable[[], bool],
        threads: Threads = None, cores: CoreGate | None = None,
    ) -> Generator[GenerationEvent, None, GenerationOutcome]:
        # Wait for the lock in short steps so a request cancelled while queued leaves at once.
        while not self._lock.acquire(timeout=_LOCK_POLL_SECONDS):
            if should_stop():
                return GenerationOutcome((), "", "cancelled")
        try:
            llm = self._llm
            if llm is None:
                raise InferenceError(f"model {self.model_path} was closed; load it again")
            generation = _Generation(self, llm, params, should_stop,
                                     threads=self._threads if threads is None else threads,
                                     cores=cores)
            return (yield from generation.run(prompt))
        finally:
            # A plain Lock may be released by another thread: stream steps hop between
            # worker threads.
            self._lock.release()


class GenerationStream(PulledStream):
    """A generation pulled event by event, for callers that hop threads per step.

    `next_event()` blocks (run it in a worker thread) and returns None once finished, when
    `outcome` is set. `close()` ends it early ("cancelled") and frees the model; idempotent.
    Steps must not run concurrently.
    """

    def __init__(
        self,
        model: LoadedModel,
        prompt: list[int],
        params: SamplingParams,
        should_stop: Callable[[], bool] | None,
        *,
        threads: Threads = None,
        cores: CoreGate | None = None,
        interval_s: float = 0.0,
    ) -> None:
        super().__init__(interval_s)
        self._closed = False
        stop = should_stop or (lambda: False)
        self._steps = model._steps(prompt, params, lambda: self._closed or stop(), threads,
                                   cores)

    def next_event(self) -> GenerationEvent | None:
        if self._outcome is not None:
            return None
        until = self._hold_until()
        events: list[GenerationEvent] = []
        try:
            events.append(next(self._steps))
            # The steps run in this thread: an interval's worth of them, in one hand-out.
            while until is not None and time.monotonic() < until:
                events.append(next(self._steps))
        except StopIteration as done:
            self._outcome = done.value
        return self._handed(merged(events)) if events else None

    def close(self) -> None:
        self._closed = True
        self._steps.close()
        self._cancelled()


class _Generation:
    """State of one generate() call: sampling, detokenizing and stop-sequence handling."""

    def __init__(
        self,
        model: LoadedModel,
        llm: Any,
        params: SamplingParams,
        should_stop: Callable[[], bool],
        *,
        threads: Threads,
        cores: CoreGate | None = None,
    ) -> None:
        self._model = model
        self._threads = threads
        self._cores = cores
        self._prefilled = 0
        self._llm = llm
        self._params = params
        self._should_stop = should_stop
        self._emitter = TextEmitter(model.tokenizer, params.stop)
        self._scores = ScoreBuffers()  # pulled by one thread at a time
        self._generated: list[int] = []
        self._masked: MaskedSampler | None = None

    def _eval(self, tokens: Sequence[int]) -> None:
        threads = self._threads
        gate = self._cores
        if gate is None:
            self._llm.eval(tokens, threads=threads() if callable(threads) else threads)
            return
        granted = gate.acquire()
        try:
            # An explicit count still wins over the grant; the gate then only paces.
            n = threads() if callable(threads) else threads
            self._llm.eval(tokens, threads=granted if n is None else n)
        finally:
            gate.release(granted)

    def run(self, prompt: list[int]) -> Generator[GenerationEvent, None, GenerationOutcome]:
        params, llm = self._params, self._llm
        greedy = params.temperature <= 0
        # ctransformers reseeds its generator with the given seed on *every* sample (and -1
        # means time(NULL), one value per second), so draw a fresh seed per token here.
        rng = random.Random(params.seed if params.seed >= 0 else None)
        # This llama.cpp clamps top_k to at least 1, so 0 would mean greedy, not "disabled".
        top_k = params.top_k if params.top_k > 0 else self._model.tokenizer.vocab_size
        budget = min(params.max_tokens, self._model.context_length - len(prompt))

        try:
            # Reuses the evaluated prefix the previous generation left in the context.
            pending = llm.prepare_inputs_for_generation(prompt, reset=True)
            for start in range(0, len(pending), _PROMPT_CHUNK):
                if self._should_stop():
                    return (yield from self._finish("cancelled"))
                chunk = pending[start : start + _PROMPT_CHUNK]
                self._eval(chunk)
                self._prefilled += len(chunk)
        except Exception as exc:
            raise InferenceError(
                f"model {self._model.model_path} failed on the prompt: {exc}"
            ) from exc

        if params.grammar is not None:
            self._masked = MaskedSampler(params.grammar, params, self._model.tokenizer,
                                         sorted(self._model.eos_token_ids), prompt)
        for _ in range(budget):
            if self._should_stop():
                return (yield from self._finish("cancelled"))
            try:
                # The model's own distribution (temperature 1), before any sampling rule.
                scores = TokenScores.of(logits_view(llm), self._scores) if params.scores \
                    else None
                token = self._masked.choose(logits_view(llm)) if self._masked else int(
                    llm.sample(
                        # Greedy is top-k 1; temperature 0 itself would divide logits by zero.
                        top_k=1 if greedy else top_k,
                        top_p=1.0 if greedy else params.top_p,
                        temperature=1.0 if greedy else params.temperature,
                        repetition_penalty=params.repetition_penalty,
                        last_n_tokens=_LAST_N_TOKENS,
                        seed=rng.randrange(2**31 - 1),
                    )
                )
            except InferenceError:
                raise
            except Exception as exc:
                raise InferenceError(
                    f"model {self._model.model_path} failed to sample: {exc}"
                ) from exc
            if token in self._model.eos_token_ids:
                return (yield from self._finish("stop"))
            self._generated.append(token)
            if self._emitter.push(token, None if scores is None else scores.of_token(token)):
                return (yield from self._finish("stop", flush=False))
            yield from self._drain()
            if self._masked is not None and self._masked.stopped:
                return (yield from self._finish("stop"))  # the grammar admits nothing more
            if len(self._generated) == budget:
                break  # evaluating the last token would only feed a sample nobody takes
            try:
                self._eval([token])
            except Exception as exc:
                raise InferenceError(
                    f"model {self._model.model_path} failed to evaluate: {exc}"
                ) from exc
        return (yield from self._finish("length"))

    def _drain(self) -> Iterator[GenerationEvent]:
        yield from self._emitter.take()

    def _finish(
        self, reason: str, *, flush: bool = True
    ) -> Generator[GenerationEvent, None, GenerationOutcome]:
        if flush:
            self._emitter.flush()
        yield from self._drain()
        mask = self._masked.stats() if self._masked is not None else None
        return GenerationOutcome(tuple(self._generated), self._emitter.text, reason, mask,
                                 self._prefilled)
