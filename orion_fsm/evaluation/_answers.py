"""Labelled answer sets (the format of eval/answers.jsonl, documented in eval/README.md): loading
them, and deciding whether an answer passes its question's check."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
import tempfile
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio

from orion_fsm._exceptions import EvaluationError

__all__ = ["AnswerCheck", "AnswerQuestion", "load_answer_set", "matches", "passes"]

# A generated function that loops forever or waits on something fails, it never hangs the run.
CODE_TIMEOUT_S = 5.0
_CODE_MEMORY_BYTES = 512 * 1024 * 1024
_POSITIVE = ("any", "exact", "regex", "number", "python")
_NUMBER = re.compile(r"(?<![\w.,])-?\d+(?:[.,]\d+)*")
_FENCE = re.compile(r"```[ \t]*([\w+-]*)[^\n]*\n(.*?)(?:```|\Z)", re.DOTALL)

# Run in a fresh `python -I`: no network (sockets refuse), bounded memory, the answer's code
# block by block (a block that raises keeps what it defined before), then the test with `f`
# bound to the requested function, or else to the last function the answer defined.
_RUNNER = """\
import resource, socket, sys, types
resource.setrlimit(resource.RLIMIT_AS, ({memory}, {memory}))
def _refused(*args, **kwargs):
    raise OSError("no network during an answer check")
socket.socket = _refused
socket.create_connection = _refused
namespace = {{"__name__": "answer"}}
for block in {blocks!r}:
    try:
        exec(compile(block, "answer", "exec"), namespace)
    except BaseException:
        pass
functions = [v for v in namespace.values()
             if isinstance(v, types.FunctionType) and v.__module__ == "answer"]
f = namespace.get({function!r})
if not callable(f):
    if not functions:
        sys.exit(3)
    f = functions[-1]
namespace["f"] = f
exec(compile({test!r}, "test", "exec"), namespace)
"""


@dataclass(frozen=True, slots=True)
class AnswerCheck:
    """What a correct answer contains. Exactly one positive test (`any`, `exact`, `regex`,
    `number` or `python` with `function`), and `none`: texts a correct answer must not contain."""

    any: tuple[str, ...] = ()
    exact: str | None = None  # the whole answer (a fixed format, as feedback teaches)
    regex: str | None = None
    number: float | None = None
    python: str | None = None  # asserts on `f`, run in a subprocess (CODE_TIMEOUT_S)
    function: str | None = None  # the function the question asks for
    none: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        doc: dict[str, Any] = {}
        if self.any:
            doc["any"] = list(self.any)
        for name in ("exact", "regex", "number", "python", "function"):
            if (value := getattr(self, name)) is not None:
                doc[name] = value
        if self.none:
            doc["none"] = list(self.none)
        return doc


@dataclass(frozen=True, slots=True)
class AnswerQuestion:
    """One labelled question: the agent the router should send it to, and how to check it."""

    id: str
    question: str
    category: str
    agent: str
    check: AnswerCheck
    lang: str | None = None


def _fold(text: str) -> str:
    """Case and accents aside: 'Léonard' matches 'leonard', 'PARIS' matches 'Paris'."""
    decomposed = unicodedata.normalize("NFKD", text.casefold())
    return "".join(c for c in decomposed if not unicodedata.combining(c))


def _normal(text: str) -> str:
    """Folded, spacing collapsed, final punctuation aside: 'Answer:  paris' is 'Answer: Paris.'"""
    return " ".join(_fold(text).split()).rstrip(".!?。 ")


def _contains(text: str, phrase: str) -> bool:
    # Word boundaries where the phrase starts or ends with a letter or digit: '4' is not in '14'.
    start = r"(?<!\w)" if phrase[:1].isalnum() else ""
    end = r"(?!\w)" if phrase[-1:].isalnum() else ""
    return re.search(start + re.escape(_fold(phrase)) + end, _fold(text)) is not None


def _numbers(text: str) -> set[float]:
    """Every number written in the text, '1,5' (French) and '1,000' (English) both read."""
    found = set()
    for token in _NUMBER.findall(text.replace("\u202f", "").replace("\u00a0", "")):
        candidates = {token.replace(",", "."), token.replace(",", "")}
        for candidate in candidates:
            try:
                found.add(float(candidate))
            except ValueError:  # '1.2.3': not one number
                continue
    return found


def code_blocks(text: str) -> list[str]:
    """The answer's code: its fenced blocks, or else the whole text."""
    blocks = [body for _, body in _FENCE.findall(text)]
    return blocks or [text]


async def passes(check: AnswerCheck, text: str) -> bool:
    """Whether `text` passes `check`. A `python` check runs in a subprocess with a timeout."""
    if check.python is None:
        return matches(check, text)
    if any(_contains(text, phrase) for phrase in check.none):
        return False
    assert check.function is not None  # a python check names its function
    return await _run_python(check.python, check.function, code_blocks(text))


def matches(check: AnswerCheck, text: str) -> bool:
    """Whether `text` passes a check that reads the text only (every kind but `python`, which
    runs code: `passes`). Synchronous, for a caller outside an event loop (the tune)."""
    if check.python is not None:
        raise EvaluationError("a python check runs the answer's code: await passes() instead")
    if any(_contains(text, phrase) for phrase in check.none):
        return False
    if check.any:
        return any(_contains(text, phrase) for phrase in check.any)
    if check.exact is not None:
        return _normal(text) == _normal(check.exact)
    if check.regex is not None:
        return re.search(check.regex, text, re.IGNORECASE | re.MULTILINE) is not None
    assert check.number is not None  # one positive test each
    expected = check.number
    return any(math.isclose(n, expected, rel_tol=1e-6, abs_tol=1e-9) for n in _numbers(text))


async def _run_python(test: str, function: str, blocks: Sequence[str]) -> bool:
    script = _RUNNER.format(memory=_CODE_MEMORY_BYTES, blocks=list(blocks), function=function,
                            test=test)
    with tempfile.TemporaryDirectory(prefix="orion-answer-") as folder:
        with anyio.move_on_after(CODE_TIMEOUT_S):
            done = await anyio.run_process(
                [sys.executable, "-I", "-c", script], cwd=folder, check=False,
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            return done.returncode == 0
    return False  # timed out: the process was killed


def _check(raw: object, where: str) -> AnswerCheck:
    if not isinstance(raw, Mapping):
        raise EvaluationError(f"{where}: \"check\" must be an object such as "
                              f'{{"any": ["Paris"]}}; got {raw!r}')
    unknown = set(raw) - {*_POSITIVE, "function", "none"}
    positive = [name for name in _POSITIVE if name in raw]
    if unknown or len(positive) != 1:
        raise EvaluationError(f"{where}: \"check\" needs exactly one of any, exact, regex, "
                              f"number, python (plus optional none, function); got keys "
                              f"{sorted(raw)}")
    try:
        check = AnswerCheck(
            any=tuple(str(p) for p in raw.get("any", ())), exact=raw.get("exact"),
            regex=raw.get("regex"),
            number=float(raw["number"]) if "number" in raw else None,
            python=raw.get("python"), function=raw.get("function"),
            none=tuple(str(p) for p in raw.get("none", ())))
    except (TypeError, ValueError) as exc:
        raise EvaluationError(f"{where}: malformed \"check\": {exc}") from None
    if "any" in raw and (not isinstance(raw["any"], list) or not check.any
                         or not all(check.any)):
        raise EvaluationError(f"{where}: \"any\" must be a non-empty list of non-empty texts")
    if check.exact is not None and not (isinstance(check.exact, str) and check.exact.strip()):
        raise EvaluationError(f"{where}: \"exact\" must be a non-empty text (the whole answer)")
    if check.regex is not None:
        if not isinstance(check.regex, str):
            raise EvaluationError(f"{where}: \"regex\" must be a text (a Python regex)")
        try:
            re.compile(check.regex)
        except re.error as exc:
            raise EvaluationError(f"{where}: \"regex\" is not a valid regex: {exc}") from None
    if check.python is not None and not (isinstance(check.python, str)
                                         and isinstance(check.function, str)):
        raise EvaluationError(f"{where}: a \"python\" check is a test (text) and needs "
                              f"\"function\", the name of the function it tests as f")
    return check


def _question(item: object, where: str) -> AnswerQuestion:
    if not isinstance(item, Mapping):
        raise EvaluationError(f"{where}: expected a JSON object, got {type(item).__name__}")
    missing = [k for k in ("id", "question", "category", "agent", "check") if k not in item]
    if missing:
        raise EvaluationError(f"{where}: missing {', '.join(missing)} (each line needs id, "
                              f"question, category, agent and check)")
    fields = {k: item[k] for k in ("id", "question", "category", "agent")}
    if not all(isinstance(v, str) and v for v in fields.values()):
        raise EvaluationError(f"{where}: id, question, category and agent must be non-empty "
                              f"texts")
    lang = item.get("lang")
    return AnswerQuestion(check=_check(item["check"], where),
                          lang=None if lang is None else str(lang), **fields)


def load_answer_set(path: str | Path) -> list[AnswerQuestion]:
    """The questions of a JSONL answer set; a malformed line is an error naming it."""
    try:
        lines = Path(path).read_text(encoding="utf-8").split("\n")
    except OSError as exc:
        raise EvaluationError(f"cannot read the answer set {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise EvaluationError(f"the answer set {path} is not UTF-8 text") from None
    questions: list[AnswerQuestion] = []
    seen: set[str] = set()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            item = json.loads(line)
        except ValueError as exc:
            raise EvaluationError(f"{where}: not JSON ({exc})") from None
        question = _question(item, where)
        if question.id in seen:
            raise EvaluationError(f"{where}: id {question.id!r} is used twice")
        seen.add(question.id)
        questions.append(question)
    if not questions:
        raise EvaluationError(f"the answer set {path} holds no questions: one JSON object per "
                              f"line (see eval/README.md)")
    return questions
