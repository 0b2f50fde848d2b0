"""Constrained decoding: a grammar compiled by llguidance masks the logits of every step.

`Grammar` is the compiled value a request carries in its `SamplingParams`; `MaskedSampler`
picks each token under the mask with the request's temperature, top-k/p, repetition penalty
and seed. llguidance builds its token masks in Rust from the model's own tokenizer.json.
"""

from __future__ import annotations

import functools
import hashlib
import threading
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from orion_fsm._exceptions import GrammarError, InferenceError

if TYPE_CHECKING:
    import llguidance
    import numpy as np
    import numpy.typing as npt

    from ._generation import SamplingParams
    from ._tokenizer import Tokenizer

__all__ = ["Grammar", "GrammarError", "MaskStats", "MaskedSampler", "compile_grammar"]

GRAMMAR_KINDS: Final = ("json_schema", "regex", "lark")
_LAST_N_TOKENS: Final = 64  # repetition-penalty window, as in the unconstrained sampler


@dataclass(frozen=True, slots=True)
class Grammar:
    """An output format compiled to llguidance's grammar text, named by its digest."""

    kind: str  # json_schema | regex | lark: what `source` is written in
    text: str  # llguidance's grammar (JSON), what the matcher runs
    digest: str  # sha256 of `text`: the trace and the L1 key name the format by it


@dataclass(frozen=True, slots=True)
class MaskStats:
    """What constraining one generation cost and changed."""

    steps: int  # tokens chosen under the mask
    forced: int  # steps where the model's own best token was not allowed
    mask_ms: tuple[float, ...]  # time to compute (and apply) each step's mask
    complete: bool  # the output is a full sentence of the grammar


def compile_grammar(kind: str, source: str | dict[str, Any]) -> Grammar:
    """Compile `source` (a JSON schema, a regex or a Lark grammar); GrammarError if it cannot."""
    import llguidance

    matcher = llguidance.LLMatcher
    if kind == "json_schema":
        try:
            # Compact JSON: no whitespace runs for a small model to loop in.
            text = matcher.grammar_from_json_schema(
                source, defaults={"whitespace_flexible": False})
        except ValueError as exc:
            raise GrammarError(f"not a JSON schema: {exc}") from None
    elif kind == "regex" and isinstance(source, str):
        text = matcher.grammar_from_regex(source)
    elif kind == "lark" and isinstance(source, str):
        text = matcher.grammar_from_lark(source)
    else:
        raise GrammarError(f"unknown grammar kind {kind!r}; expected one of {GRAMMAR_KINDS}")
    return _validated(kind, text)


@functools.lru_cache(maxsize=256)
def _validated(kind: str, text: str) -> Grammar:
    import llguidance

    problem = llguidance.LLMatcher.validate_grammar(text)
    if problem:
        raise GrammarError(problem.strip().splitlines()[0])
    return Grammar(kind, text, hashlib.sha256(text.encode()).hexdigest())


class _Compiled:
    """llguidance's view of one tokenizer, and each grammar's matcher compiled once for it."""

    def __init__(self, tokenizer: Tokenizer, eos_ids: Sequence[int]) -> None:
        import llguidance

        self.tokenizer = llguidance.LLTokenizer(tokenizer.to_json(), eos_token=sorted(eos_ids))
        self._matchers: dict[str, llguidance.LLMatcher] = {}
        self._lock = threading.Lock()  # generations of different models run concurrently

    def matcher(self, grammar: Grammar) -> llguidance.LLMatcher:
        import llguidance

        with self._lock:
            template = self._matchers.get(grammar.digest)
        if template is None:
            template = llguidance.LLMatcher(self.tokenizer, grammar.text, log_level=0)
            if template.is_error():
                raise InferenceError(f"the output grammar does not compile: {template.get_error()}")
            with self._lock:
                if len(self._matchers) >= 64:
                    self._matchers.pop(next(iter(self._matchers)))
                self._matchers[grammar.digest] = template
        return template.deep_copy()  # a fresh parse state; the compiled grammar is shared


_COMPILED: weakref.WeakKeyDictionary[Tokenizer, _Compiled] = weakref.WeakKeyDictionary()
_COMPILED_LOCK = threading.Lock()


def _compiled(tokenizer: Tokenizer, eos_ids: Sequence[int]) -> _Compiled:
    with _COMPILED_LOCK:
        found = _COMPILED.get(tokenizer)
        if found is None:
            found = _COMPILED[tokenizer] = _Compiled(tokenizer, eos_ids)
        return found


def logits_view(runtime: Any) -> npt.NDArray[np.float32]:
    """The logits of the last evaluated token, without a copy (ctransformers' own buffer)."""
    import numpy as np

    size = int(runtime.ctransformers_llm_logits_size())
    return np.ctypeslib.as_array(runtime.ctransformers_llm_logits_data(), shape=(size,))


class MaskedSampler:
    """Chooses each token of one generation among those the grammar allows next."""

    def __init__(self, grammar: Grammar, params: SamplingParams, tokenizer: Tokenizer,
                 eos_ids: Sequence[int], prompt: Sequence[int]) -> None:
        import numpy as np

        compiled = _compiled(tokenizer, eos_ids)
        self._matcher = compiled.matcher(grammar)
        self._params = params
        self._vocab = compiled.tokenizer.vocab_size
        self._mask = np.full((self._vocab + 31) // 32, -1, dtype=np.int32)
        self._recent = list(prompt[-_LAST_N_TOKENS:])
        self._rng = np.random.default_rng(params.seed if params.seed >= 0 else None)
        self._times: list[float] = []
        self._forced = 0

    @property
    def stopped(self) -> bool:
        """The grammar admits no further token: the output is complete."""
        return bool(self._matcher.is_stopped())

    def choose(self, logits: npt.NDArray[np.float32]) -> int:
        """The next token among the allowed ones, sampled as the request asks."""
        import numpy as np

        started = time.perf_counter()
        matcher, params = self._matcher, self._params
        matcher.unsafe_compute_mask_ptr(self._mask.ctypes.data, self._mask.nbytes)
        allowed = np.unpackbits(self._mask.view(np.uint8), bitorder="little")[: len(logits)]
        allowed = allowed.astype(bool, copy=False)
        scores = np.where(allowed, logits, -np.inf).astype(np.float32, copy=False)
        self._times.append((time.perf_counter() - started) * 1e3)
        if params.repetition_penalty != 1.0 and self._recent:
            recent = np.fromiter(set(self._recent), dtype=np.int64)
            seen = scores[recent]
            scores[recent] = np.where(seen > 0, seen / params.repetition_penalty,
                                      seen * params.repetition_penalty)
        best = int(np.argmax(scores))
        if not np.isfinite(scores[best]):
            raise InferenceError(f"the output grammar allows no token here: {matcher.get_error()}")
        if not allowed[int(np.argmax(logits))]:
            self._forced += 1
        token = best if params.temperature <= 0 else self._sample(scores)
        if not matcher.consume_token(token):
            raise InferenceError(f"the output grammar refused token {token}: {matcher.get_error()}")
        self._recent.append(token)
        del self._recent[:-_LAST_N_TOKENS]
        return token

    def _sample(self, scores: npt.NDArray[np.float32]) -> int:
        import numpy as np

        params = self._params
        candidates = np.flatnonzero(np.isfinite(scores))
        values = scores[candidates]
        if 0 < params.top_k < len(candidates):
            keep = np.argpartition(values, -params.top_k)[-params.top_k:]
            candidates, values = candidates[keep], values[keep]
        order = np.argsort(values)[::-1]
        candidates, values = candidates[order], values[order].astype(np.float64)
        probs = np.exp((values - values[0]) / params.temperature)
        probs /= probs.sum()
        if params.top_p < 1.0:
            # The smallest prefix whose mass reaches top_p (always at least one token).
            cut = int(np.searchsorted(np.cumsum(probs), params.top_p)) + 1
            candidates, probs = candidates[:cut], probs[:cut] / probs[:cut].sum()
        return int(candidates[self._rng.choice(len(candidates), p=probs)])

    def stats(self) -> MaskStats:
        return MaskStats(len(self._times), self._forced, tuple(self._times),
                         bool(self._matcher.is_accepting()))

