"""A model loaded in llama.cpp (llama-cpp-python's low-level API) with continuous batching.

One `LlamaRuntime` owns the model, one context whose sequences are the slots, and one decode
thread: every step puts the next token of each active sequence (and chunks of the prompts of
those joining) in one `llama_batch`. `LlamaSequence` is one slot, a `Model` like ctransformers'.
"""

from __future__ import annotations

import ctypes
import importlib
import importlib.util
import logging
import os
import random
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Final

from orion_fsm._exceptions import InferenceError, ModelLoadError

from ._constrained import MaskedSampler
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
    reused_prefix,
)
from ._tokenizer import Tokenizer

__all__ = ["LLAMA_CPP_EXTRA", "LlamaRuntime", "LlamaSequence", "LlamaStream", "llama_cpp_available"]

LLAMA_CPP_EXTRA: Final = "pip install 'orion-fsm[llama-cpp]'"
_STEP_TOKENS: Final = 256  # tokens one decode step takes, all sequences together
_PROMPT_CHUNK: Final = 128  # prompt tokens of one sequence per step: the others keep streaming
_LAST_N_TOKENS: Final = 64  # window of the repetition penalty, as on ctransformers
_COPY_GAIN: Final = 16  # a prefix copied from another sequence must save at least this many
_WAIT_POLL_S: Final = 0.05
# From idle, the first step waits while requests keep arriving (each this soon after the
# last, for this long at most): a prompt's step is long, and one that just misses it waits
# for all of it (concurrent requests reach the runtime a few ms apart through the engine).
_GATHER_GAP_S: Final = 0.005
_GATHER_MAX_S: Final = 0.025

# llama.cpp runs its threads under OpenMP (libgomp), which spins a waiting thread 300,000
# times before it sleeps at one of ggml's barriers, but only 100 once the process holds more
# OpenMP threads than cores (two models decoding, two Engines in one process): each of a
# token's hundreds of barriers then costs a futex sleep and wake-up. Measured: an engine
# alone 110 tok/s, beside a second, idle llama.cpp engine 82, and 111 with this setting, which
# keeps 1,000 spins there (ACTIVE) and the default 300,000 otherwise (the explicit count:
# ACTIVE alone spins for ever between tokens). libgomp reads it when llama.cpp loads it: set
# just before the import, unless the user chose either.
_OPENMP_ENV: Final = {"OMP_WAIT_POLICY": "ACTIVE", "GOMP_SPINCOUNT": "300000"}
_backend_ready = threading.Lock()
_backend_started = False
# llama-cpp-python 0.3.36 reads ggml's log levels by an older enum, in which 3 meant an error;
# it is WARN now (DEBUG 1, INFO 2, WARN 3, ERROR 4, CONT 5), so every load printed warnings
# such as "control-looking token" to stderr. Only errors are printed; the callback is kept
# referenced for as long as llama.cpp may call it.
_GGML_LOG_ERROR: Final = 4
_log_callback: Any = None


def _log(level: int, text: bytes, _: Any) -> None:
    if level == _GGML_LOG_ERROR:
        sys.stderr.write(text.decode("utf-8", "replace"))


def llama_cpp_available() -> bool:
    """llama-cpp-python is installed (the `llama-cpp` extra); does not import it."""
    return importlib.util.find_spec("llama_cpp") is not None


def _llama() -> Any:
    """The llama_cpp module, imported on first use (it loads a shared library), with the
    backend initialised once and its log quiet but for errors."""
    global _backend_started
    if "llama_cpp" not in sys.modules and not any(k in os.environ for k in _OPENMP_ENV):
        os.environ.update(_OPENMP_ENV)
    try:
        llama = importlib.import_module("llama_cpp")
    except ImportError as exc:
        raise ModelLoadError(
            f"the llama_cpp runtime needs llama-cpp-python: {LLAMA_CPP_EXTRA} ({exc})"
        ) from exc
    with _backend_ready:
        if not _backend_started:
            global _log_callback
            logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)
            _log_callback = llama.llama_log_callback(_log)
            llama.llama_log_set(_log_callback, ctypes.c_void_p(0))
            llama.llama_backend_init()
            _backend_started = True
    return llama


def load_model(llama: Any, model_path: Path) -> Any:
    """A llama.cpp model on the CPU; ModelLoadError naming the file when llama.cpp refuses it."""
    mparams = llama.llama_model_default_params()
    mparams.n_gpu_layers = 0
    model = llama.llama_model_load_from_file(str(model_path).encode(), mparams)
    if not model:
        raise ModelLoadError(f"llama.cpp could not load {model_path}; check that it is a "
                             "GGUF model of an architecture this llama.cpp knows")
    return model


def free_native(llama: Any, batch: Any, ctx: Any, model: Any) -> None:
    """Free what llama.cpp allocated, the batch and context before their model."""
    if batch is not None:
        llama.llama_batch_free(batch)
    if ctx is not None:
        llama.llama_free(ctx)
    if model is not None:
        llama.llama_model_free(model)


@dataclass(eq=False)
class _Job:
    """One generation in the decode loop; everything but `events`/`outcome` is the loop's."""

    seq: _Slot
    prompt: list[int]
    params: SamplingParams
    should_stop: Callable[[], bool]
    threads: Threads
    cores: CoreGate | None
    emitter: TextEmitter
    done: threading.Condition
    pending: list[int] = field(default_factory=list)  # ids to evaluate next (prompt, then last)
    generated: list[int] = field(default_factory=list)
    budget: int = 0
    prefilled: int = 0
    sampler: Any = None  # a llama_sampler chain, or None under a grammar
    masked: MaskedSampler | None = None
    started: bool = False
    events: deque[GenerationEvent] = field(default_factory=deque)
    outcome: GenerationOutcome | None = None
    error: Exception | None = None
    # The reader waits for the next event: the loop wakes it per token. False while it holds
    # an interval (or is busy elsewhere): tokens queue without a wake-up, the end still wakes.
    waiting: bool = False


@dataclass(eq=False)
class _Slot:
    """A sequence id of the context and the ids its KV cells hold (positions 0..n-1)."""

    seq_id: int
    cached: list[int] = field(default_factory=list)
    job: _Job | None = None  # in the decode loop
    holder: _Job | None = None  # whose stream has not been read to its end, nor closed
    open: bool = False
    closing: bool = False  # its generation is ended at the next step


class LlamaRuntime:
    """One llama.cpp model and context, shared by up to `sequences` slots, and the thread that
    decodes for all of them. Frees itself when the last slot is closed."""

    def __init__(self, model_path: Path, tokenizer: Tokenizer, *, context_length: int,
                 sequences: int, threads: int | None) -> None:
        from orion_fsm.services.models._cpu import usable_cores

        llama = self._llama = _llama()
        self.model_path = model_path
        self.tokenizer = tokenizer
        self.context_length = context_length
        self.sequences = sequences
        self._threads = threads or usable_cores()
        model = load_model(llama, model_path)
        self._model = model
        self._ctx: Any = None
        self._batch: Any = None
        try:
            self._vocab = llama.llama_model_get_vocab(model)
            n_vocab = int(llama.llama_vocab_n_tokens(self._vocab))
            if n_vocab != tokenizer.vocab_size:
                raise ModelLoadError(
                    f"the tokenizer has {tokenizer.vocab_size} tokens but model {model_path} "
                    f"has {n_vocab}; they do not belong together")
            self.n_vocab = n_vocab
            cparams = llama.llama_context_default_params()
            # One KV buffer for every sequence: a prefix is shared by tagging its cells.
            cparams.n_ctx = context_length * sequences
            cparams.n_batch = cparams.n_ubatch = _STEP_TOKENS
            cparams.n_seq_max = sequences
            cparams.kv_unified = True
            cparams.n_threads = cparams.n_threads_batch = self._threads
            cparams.no_perf = True
            self._ctx = llama.llama_init_from_model(model, cparams)
            if not self._ctx:
                raise ModelLoadError(f"llama.cpp could not create a context of "
                                     f"{cparams.n_ctx} tokens for {model_path}")
            self._memory = llama.llama_get_memory(self._ctx)
            self._batch = llama.llama_batch_init(_STEP_TOKENS, 0, 1)
            ends = {tokenizer.token_id(t) for t in END_TOKENS}
            ends |= {int(llama.llama_vocab_eos(self._vocab)),
                     int(llama.llama_vocab_eot(self._vocab))}
            self.eos_token_ids = frozenset(i for i in ends if i is not None and i >= 0)
        except BaseException:
            self._free()
            raise
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._slots = [_Slot(i) for i in range(sequences)]
        self._incoming: list[_Job] = []
        self._active: list[_Job] = []
        self._open = 0
        self._stopping = False
        self._scores = ScoreBuffers()  # the decode thread's
        self.steps = 0  # decode steps run (tests and the bench read them)
        self.batched_steps = 0  # steps that decoded for more than one sequence
        self._thread = threading.Thread(target=self._loop, name=f"llama-decode:{model_path.stem}",
                                        daemon=True)
        self._thread.start()

    # --- slots ------------------------------------------------------------------------------

    def open_sequence(self) -> LlamaSequence:
        """A free sequence of the context as a slot; ModelLoadError when all are taken."""
        with self._lock:
            if self._stopping:
                raise ModelLoadError(f"model {self.model_path} was closed; load it again")
            # A slot given back without waiting (`abandon`) is free once its job has ended.
            slot = next((s for s in self._slots if not s.open and s.job is None), None)
            if slot is None:
                raise ModelLoadError(f"all {self.sequences} sequences of {self.model_path} are "
                                     "taken; raise the agent's `parallel` and reload it")
            slot.open, slot.closing = True, False
            self._open += 1
            return LlamaSequence(self, slot)

    @property
    def closed(self) -> bool:
        return self._ctx is None

    def _close_sequence(self, slot: _Slot, *, wait: bool = True) -> None:
        """A slot is closed: its generation, if any, is ended at the next step, and waited
        for unless `wait` is False (a generation stuck in the runtime). After the last one the
        decode thread stops and frees everything on its way out (waited for likewise)."""
        with self._lock:
            if not slot.open:
                return
            slot.open, slot.closing = False, True
            self._open -= 1
            # Its KV cells stay: only the decode thread touches the context, and the next
            # generation on this sequence reuses or drops them.
            last = self._open == 0
            if last:
                self._stopping = True
            self._wake.notify_all()
            while wait and slot.job is not None:  # the loop ends it at its next step
                self._wake.wait(_WAIT_POLL_S)
        if last and wait:
            self._thread.join()

    def _free(self) -> None:
        free_native(self._llama, self._batch, self._ctx, self._model)
        self._batch = self._ctx = self._model = None

    # --- jobs -------------------------------------------------------------------------------

    def _submit(self, job: _Job) -> bool:
        """Queue a job on its slot, waiting while the slot's previous one ends; False when
        `should_stop` turned true meanwhile."""
        with self._lock:
            if self._stopping or not job.seq.open:
                raise InferenceError(f"model {self.model_path} was closed; load it again")
            # One generation at a time: the previous one's caller is done with it.
            while job.seq.job is not None or job.seq.holder is not None:
                if job.should_stop():
                    return False
                self._wake.wait(_WAIT_POLL_S)
            job.seq.job = job.seq.holder = job
            self._incoming.append(job)
            self._wake.notify_all()
            return True

    def _let_go(self, job: _Job) -> None:
        """The caller is done with the job's stream: its sequence may take the next one."""
        with self._lock:
            if job.seq.holder is job:
                job.seq.holder = None
                self._wake.notify_all()

    def _loop(self) -> None:
        try:
            self._serve()
        finally:
            # Here, not in the last `close()`: a sequence given back while the thread was stuck
            # in the runtime (`abandon`) has nobody waiting to free it.
            self._free()

    def _serve(self) -> None:
        llama = self._llama
        while True:
            with self._lock:
                while not self._incoming and not self._active and not self._stopping:
                    self._wake.wait()
                if self._stopping and not self._incoming and not self._active:
                    return
                if not self._active:
                    self._gather()
                joining, self._incoming = self._incoming, []
            try:
                for job in joining:
                    self._start(job)
                self._active += [j for j in joining if j.outcome is None]
                for job in [j for j in self._active if j.seq.closing or j.should_stop()]:
                    self._end(job, "cancelled")
                if self._active:
                    self._step(llama)
            except Exception as exc:
                # should_stop or the runtime failed: end every generation, keep serving.
                for job in [*joining, *self._active]:
                    if job.outcome is None:
                        self._fail(job, InferenceError(
                            f"model {self.model_path} failed to generate: {exc}"))

    def _gather(self) -> None:
        """Hold the first step from idle while more generations arrive (under the lock)."""
        seen, last = len(self._incoming), time.monotonic()
        end = last + _GATHER_MAX_S
        # Every open sequence already in: nobody else can come.
        while not self._stopping and seen < self._open:
            left = min(last + _GATHER_GAP_S, end) - time.monotonic()
            if left <= 0:
                return
            self._wake.wait(left)
            if len(self._incoming) != seen:
                seen, last = len(self._incoming), time.monotonic()

    def _start(self, job: _Job) -> None:
        """Reuse the KV cells of the longest prefix a sequence holds (its own, or copied from
        another's), drop the rest of its own, and set up its sampler."""
        llama, slot, prompt = self._llama, job.seq, job.prompt
        own = reused_prefix(slot.cached, prompt)
        donor, shared = max(((s, reused_prefix(s.cached, prompt))
                             for s in self._slots if s is not slot),
                            key=lambda x: x[1], default=(None, 0))
        if donor is not None and shared >= own + _COPY_GAIN:
            llama.llama_memory_seq_rm(self._memory, slot.seq_id, -1, -1)
            llama.llama_memory_seq_cp(self._memory, donor.seq_id, slot.seq_id, 0, shared)
            slot.cached = prompt[:shared]
        elif llama.llama_memory_seq_rm(self._memory, slot.seq_id, own, -1):
            del slot.cached[own:]
        else:  # a cache that cannot drop part of a sequence (sliding window): all of it
            llama.llama_memory_seq_rm(self._memory, slot.seq_id, -1, -1)
            slot.cached.clear()
        job.pending = prompt[len(slot.cached):]
        job.budget = min(job.params.max_tokens, self.context_length - len(prompt))
        try:
            if job.params.grammar is not None:
                job.masked = MaskedSampler(job.params.grammar, job.params, self.tokenizer,
                                           sorted(self.eos_token_ids), prompt)
            else:
                job.sampler = self._sampler(job.params, prompt)
        except Exception as exc:
            self._fail(job, exc)

    def _sampler(self, params: SamplingParams, prompt: Sequence[int]) -> Any:
        llama = self._llama
        chain = llama.llama_sampler_chain_init(llama.llama_sampler_chain_default_params())
        add = llama.llama_sampler_chain_add
        if params.repetition_penalty != 1.0:
            add(chain, llama.llama_sampler_init_penalties(
                self.n_vocab, _LAST_N_TOKENS, params.repetition_penalty, 0.0, 0.0))
        if params.temperature <= 0:
            add(chain, llama.llama_sampler_init_greedy())
        else:
            if params.top_k > 0:
                add(chain, llama.llama_sampler_init_top_k(params.top_k))
            if params.top_p < 1.0:
                add(chain, llama.llama_sampler_init_top_p(params.top_p, 1))
            add(chain, llama.llama_sampler_init_temp(params.temperature))
            seed = params.seed if params.seed >= 0 else random.randrange(2**31 - 1)
            add(chain, llama.llama_sampler_init_dist(seed))
        for token in prompt[-_LAST_N_TOKENS:]:  # the penalty's window starts in the prompt
            llama.llama_sampler_accept(chain, token)
        return chain

    def _step(self, llama: Any) -> None:
        """One llama_decode for every active sequence: its last token, or a prompt chunk."""
        batch, n = self._batch, 0
        outputs: list[tuple[_Job, int]] = []  # jobs whose logits this step yields, and where
        fed: list[tuple[_Job, list[int]]] = []
        # Generating sequences first (one token each), then prompt chunks in arrival order.
        for job in sorted(self._active, key=lambda j: len(j.pending) > 1):
            room = _STEP_TOKENS - n
            if room <= 0:
                break
            take = job.pending[: min(room, _PROMPT_CHUNK)]
            pos = len(job.seq.cached)
            for k, token in enumerate(take):
                batch.token[n] = token
                batch.pos[n] = pos + k
                batch.n_seq_id[n] = 1
                batch.seq_id[n][0] = job.seq.seq_id
                batch.logits[n] = 0
                n += 1
            if len(take) == len(job.pending):
                batch.logits[n - 1] = 1
                outputs.append((job, n - 1))
            fed.append((job, take))
        batch.n_tokens = n
        rc = self._decode(llama, [j for j, _ in fed])
        self.steps += 1
        self.batched_steps += len(fed) > 1
        if rc != 0:
            for job, _ in fed:
                llama.llama_memory_seq_rm(self._memory, job.seq.seq_id, -1, -1)
                job.seq.cached.clear()
                self._fail(job, InferenceError(
                    f"model {self.model_path} failed to evaluate (llama_decode returned {rc})"))
            return
        for job, take in fed:
            job.seq.cached += take
            del job.pending[: len(take)]
            if not job.started:
                job.prefilled += len(take)
        for job, index in outputs:
            job.started = True
            try:
                self._advance(job, *self._sample(llama, job, index))
            except Exception as exc:
                self._fail(job, exc)

    def _decode(self, llama: Any, jobs: list[_Job]) -> int:
        # Cores from the engine's pool, for every generation in the batch at once.
        gate = next((j.cores for j in jobs if j.cores is not None), None)
        asked = next((j.threads for j in jobs if j.threads is not None), None)
        explicit = asked() if callable(asked) else asked
        granted = 0
        if gate is not None:
            granted = gate.acquire(share=sum(j.cores is not None for j in jobs))
        try:
            threads = explicit or granted or self._threads
            llama.llama_set_n_threads(self._ctx, threads, threads)
            return int(llama.llama_decode(self._ctx, self._batch))
        finally:
            if gate is not None:
                gate.release(granted)

    def _sample(self, llama: Any, job: _Job,
                index: int) -> tuple[int, tuple[float, float] | None]:
        """The token chosen for `job` from the batch's `index`-th logits, and its (logprob,
        entropy) under the model's own distribution (early stopping reads them)."""
        import numpy as np

        logits = np.ctypeslib.as_array(llama.llama_get_logits_ith(self._ctx, index),
                                       shape=(self.n_vocab,))
        # Before a sampler may rewrite the logits.
        scores = TokenScores.of(logits, self._scores) if job.params.scores else None
        if job.masked is not None:
            token = job.masked.choose(logits)
        else:
            token = int(llama.llama_sampler_sample(job.sampler, self._ctx, index))
        return token, None if scores is None else scores.of_token(token)

    def _advance(self, job: _Job, token: int, score: tuple[float, float] | None) -> None:
        """A token was chosen for `job`: emit it, or end the generation."""
        if token in self.eos_token_ids or self._llama.llama_vocab_is_eog(self._vocab, token):
            self._end(job, "stop")
            return
        job.generated.append(token)
        if job.emitter.push(token, score):
            self._end(job, "stop", flush=False)
            return
        self._publish(job)
        if job.masked is not None and job.masked.stopped:
            self._end(job, "stop")  # the grammar admits nothing more
        elif len(job.generated) >= job.budget:
            self._end(job, "length")  # evaluating the last token would feed nobody's sample
        else:
            job.pending = [token]

    def _publish(self, job: _Job) -> None:
        events = job.emitter.take()
        if events:
            with self._lock:
                job.events.extend(events)
                if job.waiting:
                    job.done.notify_all()

    def _end(self, job: _Job, reason: str, *, flush: bool = True) -> None:
        if flush:  # no stop string completed: a held-back partial match is ordinary text
            job.emitter.flush()
        mask = job.masked.stats() if job.masked is not None else None
        outcome = GenerationOutcome(tuple(job.generated), job.emitter.text, reason, mask,
                                    job.prefilled)
        self._retire(job, outcome=outcome)

    def _fail(self, job: _Job, exc: Exception) -> None:
        self._retire(job, error=exc)

    def _retire(self, job: _Job, *, outcome: GenerationOutcome | None = None,
                error: Exception | None = None) -> None:
        if job.sampler is not None:
            self._llama.llama_sampler_free(job.sampler)
            job.sampler = None
        if job in self._active:
            self._active.remove(job)
        events = job.emitter.take()
        with self._lock:
            job.events.extend(events)
            job.error = error
            job.outcome = outcome or GenerationOutcome(
                tuple(job.generated), job.emitter.text, "cancelled", None, job.prefilled)
            job.seq.job = None
            job.done.notify_all()
            self._wake.notify_all()


class LlamaSequence:
    """One slot of a `LlamaRuntime`: a sequence of its context, one generation at a time;
    its KV cells keep the ids it last evaluated (prefix reuse)."""

    def __init__(self, runtime: LlamaRuntime, slot: _Slot) -> None:
        self._runtime = runtime
        self._slot = slot
        self._closed = False
        self.model_path = runtime.model_path
        self.tokenizer = runtime.tokenizer
        self.context_length = runtime.context_length
        self.eos_token_ids = runtime.eos_token_ids

    @classmethod
    def load(cls, model_path: Path, tokenizer_path: Path, *, context_length: int,
             sequences: int = 1, threads: int | None = None) -> LlamaSequence:
        """A new runtime for the file and its first slot (more: `runtime.open_sequence()`)."""
        tokenizer = Tokenizer.from_file(tokenizer_path)
        if context_length <= 0:
            raise ModelLoadError(f"context_length must be positive, got {context_length}")
        if sequences <= 0:
            raise ModelLoadError(f"sequences must be positive, got {sequences}")
        runtime = LlamaRuntime(model_path, tokenizer, context_length=context_length,
                               sequences=sequences, threads=threads)
        return runtime.open_sequence()

    @property
    def runtime(self) -> LlamaRuntime:
        return self._runtime

    @property
    def seq_id(self) -> int:
        return self._slot.seq_id

    def __enter__(self) -> LlamaSequence:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def cached_ids(self) -> tuple[int, ...]:
        return tuple(self._slot.cached)

    @property
    def generating(self) -> bool:
        """A generation holds the slot (possibly in a decode step stuck in the runtime)."""
        return self._slot.job is not None

    def close(self) -> None:
        """Give the sequence back; the runtime is freed with its last one. Idempotent."""
        if not self._closed:
            self._closed = True
            self._runtime._close_sequence(self._slot)

    def abandon(self) -> None:
        """Give the sequence back without waiting for its generation, stuck in the runtime
        (the stall watchdog gave up on it): the decode thread ends it when its call returns,
        and frees the runtime then if this was its last sequence. Idempotent."""
        if not self._closed:
            self._closed = True
            self._runtime._close_sequence(self._slot, wait=False)

    def generate(self, prompt_ids: Sequence[int], params: SamplingParams, *,
                 on_event: Callable[[GenerationEvent], None], should_stop: Callable[[], bool],
                 threads: Threads = None, cores: CoreGate | None = None) -> GenerationOutcome:
        """Generate from `prompt_ids`, streaming text deltas to `on_event`. Blocking; the
        tokens come from the runtime's batched decode loop (see `LlamaStream`), one event
        per emitted chunk (no hop to save: `on_event` runs in this thread)."""
        stream = self._stream(prompt_ids, params, should_stop, threads, cores, catch_up=False)
        try:
            while (event := stream.next_event()) is not None:
                on_event(event)
            return stream.outcome
        finally:
            stream.close()

    def open_stream(self, prompt_ids: Sequence[int], params: SamplingParams, *,
                    should_stop: Callable[[], bool] | None = None, threads: Threads = None,
                    cores: CoreGate | None = None, interval_s: float = 0.0) -> LlamaStream:
        """The generation, pulled one event at a time; joins the decode loop at the first
        `next_event()`. A caller that fell behind gets what was queued as one event, and
        after the first event one at most every `interval_s` (see `PulledStream`)."""
        return self._stream(prompt_ids, params, should_stop, threads, cores, catch_up=True,
                            interval_s=interval_s)

    def _stream(self, prompt_ids: Sequence[int], params: SamplingParams,
                should_stop: Callable[[], bool] | None, threads: Threads,
                cores: CoreGate | None, *, catch_up: bool,
                interval_s: float = 0.0) -> LlamaStream:
        prompt = checked_prompt(prompt_ids, self.tokenizer.vocab_size, self.context_length)
        if self._closed:
            raise InferenceError(f"model {self.model_path} was closed; load it again")
        return LlamaStream(self._runtime, self._slot, prompt, params, should_stop,
                           threads=threads, cores=cores, catch_up=catch_up,
                           interval_s=interval_s)


class LlamaStream(PulledStream):
    """A generation in the runtime's decode loop, pulled event by event.

    `next_event()` blocks (run it in a worker thread) and returns None once finished, when
    `outcome` is set. `close()` ends it early ("cancelled"); idempotent.
    """

    def __init__(self, runtime: LlamaRuntime, slot: _Slot, prompt: list[int],
                 params: SamplingParams, should_stop: Callable[[], bool] | None, *,
                 threads: Threads = None, cores: CoreGate | None = None,
                 catch_up: bool = True, interval_s: float = 0.0) -> None:
        super().__init__(interval_s)
        self._runtime = runtime
        self._closed = False
        self._catch_up = catch_up  # queued events as one (a reader that fell behind)
        stop = should_stop or (lambda: False)
        self._job = _Job(slot, prompt, params, lambda: self._closed or stop(), threads, cores,
                         TextEmitter(runtime.tokenizer, params.stop),
                         threading.Condition(runtime._lock))
        self._submitted = False

    def next_event(self) -> GenerationEvent | None:
        if self._outcome is not None:
            return None
        job = self._job
        if not self._submitted:
            self._submitted = True
            if not self._runtime._submit(job):
                self._outcome = GenerationOutcome((), "", "cancelled")
                return None
        with job.done:
            until = self._hold_until()
            while (until is not None and job.outcome is None
                   and (left := until - time.monotonic()) > 0):
                job.done.wait(left)  # woken early only by the end
            job.waiting = True
            while not job.events and job.outcome is None:
                job.done.wait()
            job.waiting = False
            # The loop may run ahead of the caller (even to its end): once the caller asks to
            # stop, nothing more, and the outcome holds only what it was given.
            stopped = job.should_stop()
            if job.events and not stopped:
                if not self._catch_up:
                    return self._handed(job.events.popleft())
                event = merged(job.events)
                job.events.clear()
                return self._handed(event)
            outcome = job.outcome
        if stopped:  # the loop ends the job at its next step
            self.close()
            return None
        self._outcome = outcome
        self._runtime._let_go(job)
        if job.error is not None:
            raise job.error
        return None

    def close(self) -> None:
        self._closed = True  # the loop ends the job at its next step
        if self._submitted:
            self._runtime._let_go(self._job)
        self._cancelled()
