"""What every runtime's generation shares: its parameters, events and outcome, and the text
side of a generation (detokenizing, stop strings held back and never emitted).

The runtimes (`_ctransformers`, `_llama_cpp`) choose the tokens; `TextEmitter` turns them
into the events callers see, so both emit exactly the same text for the same ids.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from orion_fsm._exceptions import InferenceError

from ._tokenizer import IncrementalDecoder, Tokenizer

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

    from ._constrained import Grammar, MaskStats

__all__ = [
    "CoreGate",
    "GenerationEvent",
    "GenerationOutcome",
    "PulledStream",
    "SamplingParams",
    "ScoreBuffers",
    "TextEmitter",
    "Threads",
    "TokenScores",
    "checked_prompt",
    "merged",
    "reused_prefix",
]

# ChatML's end of turn and GPT-2's end of text: ends of a generation whatever the runtime says.
END_TOKENS = ("<|im_end|>", "<|endoftext|>")


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 0.7  # 0 = greedy
    top_k: int = 40  # 0 = no top-k cut
    top_p: float = 0.95
    repetition_penalty: float = 1.1
    seed: int = -1  # -1 = random
    stop: tuple[str, ...] = ()
    grammar: Grammar | None = None  # every token chosen under this grammar's mask
    # Each token's log-probability and entropy in its events (a virtual member's early stop
    # reads them). Off by default: the softmax over SmolLM2's 49,152 logits is ~0.12 ms of
    # numpy a token on a quiet machine (~0.4 ms measured loaded), and a generation about
    # twice that slower (ggml's threads wait on it: 128 tokens 1.155 s against 1.122 s).
    scores: bool = False


@dataclass(frozen=True)
class GenerationEvent:
    """One emitted chunk of text and the token ids consumed since the previous chunk; with
    each id its log-probability and the entropy (nats) of the distribution it was drawn
    from, under the model's own logits (empty when the runtime gave none)."""

    token_ids: tuple[int, ...]
    text: str
    logprobs: tuple[float, ...] = ()
    entropies: tuple[float, ...] = ()


@dataclass(frozen=True)
class GenerationOutcome:
    token_ids: tuple[int, ...]  # every generated id, end-of-sequence excluded
    text: str  # exactly the text emitted through events
    finish_reason: str  # "stop" (EOS or stop sequence) | "length" | "cancelled"
    mask: MaskStats | None = None  # under a grammar: what the mask cost and changed
    # Prompt tokens this call evaluated: the rest were reused from the instance's context.
    prefilled: int = field(default=0, compare=False)


# Threads for one runtime call: a number, or asked again before every call (a CPU allotter
# hands out cores per token, so concurrent generations share the cores without waiting).
Threads = int | Callable[[], int] | None


class CoreGate(Protocol):
    """Cores for one runtime call: `acquire()` blocks until at least one is free and returns
    how many the call may use; `release(n)` gives them back. Called from worker threads.

    `share` is how many of the pool's consumers the call runs for: a batched decode step
    computes the next token of several generations at once, so it takes their shares."""

    def acquire(self, share: int = 1) -> int: ...

    def release(self, granted: int) -> None: ...


def reused_prefix(cached: Sequence[int], prompt: Sequence[int]) -> int:
    """Prompt tokens a context holding `cached` need not evaluate again: their common prefix,
    less the prompt's last token, which is always evaluated for its logits (both runtimes)."""
    limit = min(len(cached), len(prompt) - 1)
    n = 0
    while n < limit and cached[n] == prompt[n]:
        n += 1
    return n


def checked_prompt(prompt_ids: Sequence[int], vocab_size: int, context_length: int) -> list[int]:
    """The prompt as a list, refused when a runtime could not evaluate it."""
    if not prompt_ids:
        raise InferenceError("cannot generate from an empty prompt")
    if min(prompt_ids) < 0 or max(prompt_ids) >= vocab_size:
        # The runtimes index their embedding table unchecked: a bad id would crash them.
        raise InferenceError(
            f"prompt holds token ids outside the vocabulary of {vocab_size}; "
            "encode prompts with this model's tokenizer"
        )
    if len(prompt_ids) >= context_length:
        raise InferenceError(
            f"prompt of {len(prompt_ids)} tokens does not fit the context of "
            f"{context_length}; shorten it or load the model with a longer context"
        )
    return list(prompt_ids)


def merged(events: Sequence[GenerationEvent]) -> GenerationEvent:
    """Consecutive events as one (a caller that fell behind, or an interval's worth)."""
    if len(events) == 1:
        return events[0]
    return GenerationEvent(tuple(i for e in events for i in e.token_ids),
                           "".join(e.text for e in events),
                           tuple(p for e in events for p in e.logprobs),
                           tuple(h for e in events for h in e.entropies))


class PulledStream:
    """What every runtime's pulled stream shares: the events it handed out, its outcome once
    it ended (`outcome` raises before), and the "cancelled" outcome an early close leaves.

    `interval_s`: after the first event (never delayed), an event is handed out at most this
    often, holding what was made meanwhile: each hand-out costs the caller a worker-thread hop
    and an event-loop wake-up, CPU the model's own threads need on a small machine (see the
    README's llama_cpp figures). 0: every event at once.
    """

    def __init__(self, interval_s: float = 0.0) -> None:
        self._outcome: GenerationOutcome | None = None
        self._token_ids: list[int] = []
        self._texts: list[str] = []
        self._interval_s = interval_s
        self._handed_at: float | None = None

    def _hold_until(self) -> float | None:
        """When the next event may be handed out (`time.monotonic`); None: at once."""
        if self._interval_s <= 0 or self._handed_at is None:
            return None
        return self._handed_at + self._interval_s

    @property
    def outcome(self) -> GenerationOutcome:
        if self._outcome is None:
            raise InferenceError("the generation has not finished; call next_event() until None")
        return self._outcome

    def _handed(self, event: GenerationEvent) -> GenerationEvent:
        """`event`, counted in what a cancelled outcome holds."""
        self._token_ids.extend(event.token_ids)
        self._texts.append(event.text)
        self._handed_at = time.monotonic()
        return event

    def _cancelled(self) -> None:
        """Closed before its end: the outcome is what it handed out, "cancelled"."""
        if self._outcome is None:
            self._outcome = GenerationOutcome(tuple(self._token_ids), "".join(self._texts),
                                              "cancelled")


class TextEmitter:
    """Generated ids to text events: decodes incrementally and holds back any tail that could
    grow into a stop string, so neither a stop string nor what follows it is ever emitted."""

    def __init__(self, tokenizer: Tokenizer, stop: tuple[str, ...]) -> None:
        self._decoder = IncrementalDecoder(tokenizer)
        self._stop = stop
        self._ready: list[GenerationEvent] = []  # events not yet taken
        self._unsent_ids: list[int] = []
        self._unsent_scores: list[tuple[float, float]] = []  # (logprob, entropy) per id
        self._held = ""  # decoded text that might be the start of a stop string
        self._emitted: list[str] = []

    @property
    def text(self) -> str:
        """Everything emitted so far."""
        return "".join(self._emitted)

    def push(self, token: int, score: tuple[float, float] | None = None) -> bool:
        """Feed one generated token (and its (logprob, entropy) when the runtime gave them);
        True when a stop string has appeared (the generation ends there: nothing after it is
        emitted)."""
        self._unsent_ids.append(token)
        if score is not None:
            self._unsent_scores.append(score)
        self._held += self._decoder.push(token)
        stops = self._stop
        if not stops or not self._held:
            self._send(self._held)
            return False
        hits = [i for i in (self._held.find(s) for s in stops if s) if i >= 0]
        if hits:
            self._send(self._held[: min(hits)])
            return True
        # Hold back the longest tail that could still grow into a stop string.
        keep = 0
        for s in stops:
            for n in range(min(len(s) - 1, len(self._held)), keep, -1):
                if self._held.endswith(s[:n]):
                    keep = n
                    break
        self._send(self._held[: len(self._held) - keep])
        return False

    def flush(self) -> None:
        """The generation ended without completing a stop string: a held-back partial match
        (and an unfinished character) is ordinary text."""
        self._held += self._decoder.flush()
        self._send(self._held)

    def take(self) -> list[GenerationEvent]:
        """The events made since the last call, oldest first."""
        ready, self._ready = self._ready, []
        return ready

    def _send(self, text: str) -> None:
        if not text:
            return
        self._held = self._held[len(text) :]
        self._emitted.append(text)
        scores = self._unsent_scores
        self._ready.append(GenerationEvent(tuple(self._unsent_ids), text,
                                           tuple(lp for lp, _ in scores),
                                           tuple(h for _, h in scores)))
        self._unsent_ids.clear()
        self._unsent_scores = []


class ScoreBuffers:
    """The float64 arrays `TokenScores.of` works in, kept by one thread from token to token:
    fresh ones cost their page faults every token (4x the arithmetic, measured)."""

    __slots__ = ("_shifted", "_weights")

    def __init__(self) -> None:
        self._shifted: npt.NDArray[np.float64] | None = None
        self._weights: npt.NDArray[np.float64] | None = None

    def arrays(self, size: int) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
        import numpy as np

        if self._shifted is None or self._weights is None or self._shifted.size != size:
            self._shifted, self._weights = np.empty(size), np.empty(size)
        return self._shifted, self._weights


class TokenScores:
    """The next token's distribution under the model's logits (temperature 1): its
    log-normaliser and entropy, computed once per step before sampling reads the buffer."""

    __slots__ = ("_entropy", "_lse", "_shifted")

    def __init__(self, shifted: npt.NDArray[np.float64] | None, lse: float,
                 entropy: float) -> None:
        self._shifted, self._lse, self._entropy = shifted, lse, entropy

    @classmethod
    def of(cls, logits: npt.NDArray[np.float32],
           buffers: ScoreBuffers | None = None) -> TokenScores:
        """The scores of `logits`; with `buffers`, computed in them and valid until their
        next use (read `of_token` before the next step)."""
        import numpy as np

        if logits.size == 0:
            return cls(None, 0.0, 0.0)
        shifted, weights = (buffers or ScoreBuffers()).arrays(logits.size)
        # In float64 (the runtime reuses its buffer; float32 sums round differently with the
        # buffer's alignment), floored: a masked (-inf) logit would make the entropy's
        # 0 x -inf a NaN.
        np.subtract(logits, float(logits.max()), out=shifted, dtype=np.float64)
        np.maximum(shifted, -1e4, out=shifted)
        np.exp(shifted, out=weights)
        total = float(weights.sum())
        lse = math.log(total)
        # Multiply-and-sum, not np.dot: a BLAS call wakes OpenBLAS's thread pool, which on a
        # busy machine costs 10-20 ms a token (measured) and steals the decode's cores.
        np.multiply(weights, shifted, out=weights)
        return cls(shifted, lse, lse - float(weights.sum()) / total)

    def of_token(self, token: int) -> tuple[float, float]:
        """(log-probability of `token`, entropy of the distribution), in nats."""
        shifted = self._shifted
        if shifted is None or not 0 <= token < shifted.size:
            return (0.0, 0.0)
        # Rounded: what is left of summation order at 1e-16 must not make two runs differ.
        return (round(float(shifted[token]) - self._lse, 9), round(self._entropy, 9))
