"""Retrieval quality of a context store on labelled questions: recall@k, where a hit is a
top-k chunk that contains the expected answer text (case and line breaks aside)."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orion_fsm._exceptions import ContextError

from ._store import ContextStore, SearchMode

__all__ = ["ContextEval", "ContextQuestion", "evaluate_context", "load_questions"]

_SPACE = re.compile(r"\s+")


@dataclass(frozen=True, slots=True)
class ContextQuestion:
    query: str
    answer: str  # text a relevant chunk contains


@dataclass(frozen=True, slots=True)
class ContextEval:
    """recall@k of one search mode, and the questions it missed."""

    mode: str
    top_k: int
    questions: int
    hits: int
    misses: tuple[ContextQuestion, ...]
    search_ms: tuple[float, ...]  # one per question

    @property
    def recall(self) -> float:
        return self.hits / self.questions if self.questions else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "top_k": self.top_k, "questions": self.questions,
                "hits": self.hits, "recall": round(self.recall, 4),
                "misses": [{"query": m.query, "answer": m.answer} for m in self.misses]}


def _normal(text: str) -> str:
    return _SPACE.sub(" ", text).strip().lower()


def load_questions(path: str | Path) -> list[ContextQuestion]:
    """JSONL of {"query": …, "answer": …}; a malformed line is an error naming it."""
    questions = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
                questions.append(ContextQuestion(str(item["query"]), str(item["answer"])))
            except (ValueError, KeyError, TypeError) as exc:
                raise ContextError(f"{path}:{number}: expected a JSON object with \"query\" "
                                   f"and \"answer\" ({exc})") from exc
    if not questions:
        raise ContextError(f"{path} holds no questions: one JSON object per line")
    return questions


async def evaluate_context(store: ContextStore, questions: Sequence[ContextQuestion], *,
                           top_k: int = 5, mode: SearchMode = "fused") -> ContextEval:
    import time

    misses = []
    timings = []
    for q in questions:
        started = time.perf_counter()
        hits = await store.search(q.query, top_k, mode=mode)
        timings.append((time.perf_counter() - started) * 1e3)
        answer = _normal(q.answer)
        if not any(answer in _normal(f"{h.heading}\n{h.text}") for h in hits):
            misses.append(q)
    return ContextEval(mode, top_k, len(questions), len(questions) - len(misses),
                       tuple(misses), tuple(timings))
