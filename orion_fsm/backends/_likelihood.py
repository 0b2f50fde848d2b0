"""A llama.cpp model that reads instead of writing: how likely it finds a text after another.

`LikelihoodScorer.score(prefix, continuation)` is the mean log-probability of the
continuation's tokens given the prefix: one `llama_decode` of both, with logits computed only at
the continuation's positions (a vocabulary of 262,144 at every position of a 250-token passage
would cost more than the model itself). What a reranker asks: is this question likely after
this passage?
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

import numpy as np

from orion_fsm._exceptions import ModelLoadError

from ._generation import CoreGate
from ._llama_cpp import _llama, free_native, load_model

__all__ = ["LikelihoodScorer"]

_CONTEXT: Final = 512  # a passage's first tokens and a question: what a score reads


class LikelihoodScorer:
    """One llama.cpp model and a context to score with; one score at a time (thread-safe)."""

    def __init__(self, model_path: Path, *, context_length: int = _CONTEXT,
                 threads: int = 1) -> None:
        llama = self._llama = _llama()
        # Held by a score and by close(): a search cancelled mid-score leaves its thread
        # running, and the Engine's exit must not free the context under it.
        self._lock = threading.Lock()
        self.model_path = model_path
        self.context_length = context_length
        self._threads = threads
        model = load_model(llama, model_path)
        self._model: Any = model
        self._ctx: Any = None
        self._batch: Any = None
        try:
            vocab = self._vocab = llama.llama_model_get_vocab(model)
            self.n_vocab = int(llama.llama_vocab_n_tokens(vocab))
            # The model's own rule: Gemma and Llama read a BOS first, SmolLM2 does not.
            bos = int(llama.llama_vocab_bos(vocab))
            self.bos = bos if llama.llama_vocab_get_add_bos(vocab) and bos >= 0 else None
            cparams = llama.llama_context_default_params()
            cparams.n_ctx = cparams.n_batch = cparams.n_ubatch = context_length
            cparams.n_seq_max = 1
            cparams.n_threads = cparams.n_threads_batch = threads
            cparams.no_perf = True
            self._ctx = llama.llama_init_from_model(model, cparams)
            if not self._ctx:
                raise ModelLoadError(f"llama.cpp could not create a context of "
                                     f"{context_length} tokens for {model_path}")
            self._memory = llama.llama_get_memory(self._ctx)
            self._batch = llama.llama_batch_init(context_length, 0, 1)
        except BaseException:
            self.close()
            raise

    def tokenize(self, text: str) -> list[int]:
        """`text` in the model's own vocabulary (no BOS, special tokens read as text)."""
        data = text.encode("utf-8")
        room = len(data) + 8  # a token covers at least one byte
        buffer = (self._llama.llama_token * room)()
        count = self._llama.llama_tokenize(self._vocab, data, len(data), buffer, room,
                                           False, False)
        if count < 0:  # cannot happen with a byte per token; llama.cpp says how many it needs
            raise ValueError(f"llama.cpp needs {-count} tokens for {len(data)} bytes")
        return list(buffer[:count])

    def score(self, prefix: Sequence[int], continuation: Sequence[int], *,
              cores: CoreGate | None = None) -> float:
        """Mean log-probability of `continuation` after `prefix` (BOS added when the model
        wants one); the prefix is cut from its end to fit. Blocks: call it in a worker thread.
        `cores`: the engine's core pool, which grants the threads of the decode."""
        if not continuation:
            raise ValueError("nothing to score: the continuation is empty")
        head = [] if self.bos is None else [self.bos]
        room = self.context_length - len(head) - len(continuation)
        if room < 1:
            raise ValueError(f"a continuation of {len(continuation)} tokens leaves no room for "
                             f"a prefix in a context of {self.context_length}")
        tokens = [*head, *prefix[:room], *continuation]
        first = len(tokens) - len(continuation) - 1  # the position predicting the first one
        llama = self._llama
        with self._lock:
            if self._ctx is None:
                raise ModelLoadError(f"the scorer of {self.model_path.name} is closed")
            llama.llama_memory_clear(self._memory, True)
            batch = self._batch
            batch.n_tokens = len(tokens)
            for i, token in enumerate(tokens):
                batch.token[i], batch.pos[i] = token, i
                batch.n_seq_id[i], batch.seq_id[i][0] = 1, 0
                batch.logits[i] = first <= i < len(tokens) - 1
            granted = cores.acquire() if cores is not None else 0
            try:
                threads = granted or self._threads
                llama.llama_set_n_threads(self._ctx, threads, threads)
                if llama.llama_decode(self._ctx, batch) != 0:
                    raise ModelLoadError(f"llama.cpp could not decode {len(tokens)} tokens "
                                         f"with {self.model_path.name}")
            finally:
                if cores is not None:
                    cores.release(granted)
            total = 0.0
            for k, token in enumerate(continuation):
                row = np.ctypeslib.as_array(llama.llama_get_logits_ith(self._ctx, first + k),
                                            shape=(self.n_vocab,)).astype(np.float64)
                top = row.max()
                total += row[token] - top - np.log(np.exp(row - top).sum())
        return float(total / len(continuation))

    def close(self) -> None:
        with self._lock:
            self._free()

    def _free(self) -> None:
        free_native(self._llama, self._batch, self._ctx, self._model)
        self._batch = self._ctx = self._model = None

    def __enter__(self) -> LikelihoodScorer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
