"""Retrieval quality of a context store on labelled questions: recall@k, where a hit is a
top-k chunk that contains the expected answer text (case and line breaks aside), or, for a
qualified answer `module.name`, a chunk of that module's documentation that defines or cites
`name` (the reST of `random` defines `choice(seq)`, never writes `random.choice`)."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orion_fsm._exceptions import ContextError

from ._store import ContextStore, SearchMode

if TYPE_CHECKING:
    from ._rerank import Reranker

__all__ = ["ContextEval", "ContextQuestion", "evaluate_context", "holds_answer",
           "load_questions"]

_SPACE = re.compile(r"\s+")
_QUALIFIED = re.compile(r"^([A-Za-z_][\w.]*)\.([A-Za-z_]\w*)$")
# The module a chunk documents: named in its document's title, or by a directive it holds.
_TITLE_MODULE = re.compile(r":mod:`([\w.]+)`")
_MODULE_DIRECTIVE = re.compile(r"^\s*\.\. (?:py:)?(?:current)?module:: ([\w.]+)", re.MULTILINE)


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
    strict_hits: int  # hits by the answer text alone (no module-qualified match)
    misses: tuple[ContextQuestion, ...]
    search_ms: tuple[float, ...]  # one per question

    @property
    def recall(self) -> float:
        return self.hits / self.questions if self.questions else 0.0

    @property
    def strict_recall(self) -> float:
        return self.strict_hits / self.questions if self.questions else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "top_k": self.top_k, "questions": self.questions,
                "hits": self.hits, "recall": round(self.recall, 4),
                "strict_hits": self.strict_hits,
                "strict_recall": round(self.strict_recall, 4),
                "misses": [{"query": m.query, "answer": m.answer} for m in self.misses]}


def _normal(text: str) -> str:
    return _SPACE.sub(" ", text).strip().lower()


def holds_answer(heading: str, text: str, answer: str, *, strict: bool = False) -> bool:
    """Whether a chunk (its section heading and text) answers: it contains the answer text;
    or (unless `strict`), for an answer `module.name`, the chunk documents that module (its
    title's `:mod:` or a `module`/`currentmodule` directive in it) and defines `name` (a
    directive `.. kind:: name`) or cites it as code (`name(`, `:role:`name``)."""
    if _normal(answer) in _normal(f"{heading}\n{text}"):
        return True
    qualified = None if strict else _QUALIFIED.match(answer.strip())
    if qualified is None:
        return False
    module, name = qualified.groups()
    title = heading.split(" > ", 1)[0]
    if module not in {*_TITLE_MODULE.findall(title), *_MODULE_DIRECTIVE.findall(text)}:
        return False
    name = re.escape(name)
    cited = re.compile(rf"\.\. [\w:]+:: (?:{re.escape(module)}\.)?{name}\b"
                       rf"|(?<![\w.]){name}\(|`~?(?:{re.escape(module)}\.)?{name}(?:\(\))?`")
    return cited.search(text) is not None


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
                           top_k: int = 5, mode: SearchMode = "fused",
                           reranker: Reranker | None = None) -> ContextEval:
    import time

    misses = []
    strict_hits = 0
    timings = []
    for q in questions:
        started = time.perf_counter()
        hits = await store.search(q.query, top_k, mode=mode, reranker=reranker)
        timings.append((time.perf_counter() - started) * 1e3)
        strict_hits += any(holds_answer(h.heading, h.text, q.answer, strict=True)
                           for h in hits)
        if not any(holds_answer(h.heading, h.text, q.answer) for h in hits):
            misses.append(q)
    return ContextEval(mode if reranker is None else f"{mode}+rerank", top_k, len(questions),
                       len(questions) - len(misses),
                       strict_hits, tuple(misses), tuple(timings))
