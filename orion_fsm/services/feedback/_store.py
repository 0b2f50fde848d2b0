"""Feedback on answers: what each recent request showed its agent, and the SQLite store a
rating is written to (redacted, with the request's trace id) until it is exported as
`{"input", "target", "system"}` training lines for `orion-fsm models tune`.
"""

from __future__ import annotations

import json
import os
import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from orion_fsm._exceptions import FeedbackError
from orion_fsm._files import make_private_dirs
from orion_fsm.services.observability._sanitize import sanitize_text

if TYPE_CHECKING:
    import sqlite3  # imported where the store is opened: not at `import orion_fsm`

__all__ = ["SCORE_RANGE", "FeedbackRecord", "FeedbackStats", "FeedbackStore", "RecentRequests",
           "Served", "TrainingExample", "checked_score"]

SCORE_RANGE: Final = (0, 5)  # 0/1 ratings fit in it: /bad is 0, /good is 5
_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS feedback (
    request_id TEXT PRIMARY KEY,
    trace_id TEXT NOT NULL,
    agent TEXT NOT NULL,
    score INTEGER NOT NULL,
    correction TEXT,
    system TEXT NOT NULL,
    history TEXT NOT NULL,
    input TEXT NOT NULL,
    answer TEXT NOT NULL,
    served_at REAL NOT NULL,
    rated_at REAL NOT NULL
);
"""


@dataclass(frozen=True, slots=True)
class Served:
    """One answered request as its agent saw it: the turns rendered into its prompt (system
    prompt, history, retrieved passages included) and the answer. Held in memory only; what
    reaches the disk is redacted."""

    request_id: str
    trace_id: str
    agent: str
    turns: tuple[tuple[str, str], ...]  # (role, content), chat-template roles
    answer: str
    served_at: float


@dataclass(frozen=True, slots=True)
class FeedbackRecord:
    """A rating as stored: the redacted prompt and answer, keyed by the request id."""

    request_id: str
    trace_id: str
    agent: str
    score: int
    correction: str | None
    system: str
    history: tuple[tuple[str, str], ...]  # turns before the rated one
    input: str  # the user turn the answer replied to
    answer: str
    served_at: float
    rated_at: float

    def as_dict(self) -> dict[str, Any]:
        return {"request_id": self.request_id, "trace_id": self.trace_id, "agent": self.agent,
                "score": self.score, "correction": self.correction, "system": self.system,
                "history": [list(t) for t in self.history], "input": self.input,
                "answer": self.answer, "served_at": self.served_at, "rated_at": self.rated_at}


@dataclass(frozen=True, slots=True)
class TrainingExample:
    """One line of the training JSONL: what the agent should answer to `input`."""

    input: str
    target: str
    system: str = ""
    history: tuple[tuple[str, str], ...] = ()

    def as_dict(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"input": self.input, "target": self.target,
                               "system": self.system}
        if self.history:  # absent for a single turn: the seed's two-key shape plus system
            doc["history"] = [list(t) for t in self.history]
        return doc


@dataclass(frozen=True, slots=True)
class FeedbackStats:
    """`orion-fsm feedback stats`: ratings by score and agent, and how many would export."""

    total: int
    by_score: dict[int, int]
    by_agent: dict[str, int]
    corrections: int
    exportable: int  # at the min_score asked for
    min_score: int

    def as_dict(self) -> dict[str, Any]:
        return {"total": self.total, "by_score": {str(k): v for k, v in self.by_score.items()},
                "by_agent": self.by_agent, "corrections": self.corrections,
                "exportable": self.exportable, "min_score": self.min_score}


def checked_score(score: object, request_id: str | None = None) -> int:
    """The score as an int in SCORE_RANGE (True/False: 5/0), or FeedbackError naming it."""
    low, high = SCORE_RANGE
    if isinstance(score, bool):
        return high if score else low
    if not isinstance(score, int) or not low <= score <= high:
        raise FeedbackError(f"score must be an integer from {low} to {high} (or 0/1, "
                            f"True/False), got {score!r}", field="score",
                            request_id=request_id)
    return score


class RecentRequests:
    """The last `capacity` answered requests, by id: a rating names one of them. Bounded, so a
    busy engine keeps a fixed amount of text; older requests can no longer be rated."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._items: OrderedDict[str, Served] = OrderedDict()
        self._lock = threading.Lock()  # noted from the event loop, read from a worker thread

    def note(self, served: Served) -> None:
        with self._lock:
            self._items[served.request_id] = served
            self._items.move_to_end(served.request_id)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)

    def get(self, request_id: str) -> Served | None:
        with self._lock:
            return self._items.get(request_id)


def _split(turns: Sequence[tuple[str, str]]) -> tuple[str, tuple[tuple[str, str], ...], str]:
    """(system, earlier turns, the last user turn) of the turns a prompt was rendered from."""
    system = "\n\n".join(c for r, c in turns if r == "system")
    rest = [(r, c) for r, c in turns if r != "system"]
    last = max((i for i, (r, _) in enumerate(rest) if r == "user"), default=None)
    if last is None:
        return system, tuple(rest), ""
    return system, tuple(rest[:last]), rest[last][1]


class FeedbackStore:
    """The ratings, one row per request (a later rating of the same request replaces it).

    SQLite in WAL mode, file 0600 in a 0700 folder; each call opens its own connection, so the
    engine (worker threads) and the CLI can use it at once, and a killed process loses nothing
    committed. Blocking: call it from a worker thread in async code.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def _connect(self, *, create: bool) -> sqlite3.Connection:
        import sqlite3

        try:
            if create:
                make_private_dirs(self.path.parent)
                # Created private before SQLite opens it: ratings quote what users typed.
                os.close(os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600))
            elif not self.path.is_file():
                raise FeedbackError(f"no feedback store at {self.path}: rate answers first "
                                    "(REPL /good /bad /fix, engine.feedback, POST /v1/feedback)")
            db = sqlite3.connect(self.path, isolation_level=None, timeout=30.0)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")  # WAL: a crash never leaves half a row
            db.executescript(_SCHEMA)
        except (OSError, sqlite3.Error) as exc:
            raise FeedbackError(f"cannot open the feedback store {self.path}: {exc}; check "
                                "that its folder is writable and the file is a SQLite "
                                "database") from exc
        return db

    def add(self, served: Served, score: int, correction: str | None,
            rated_at: float) -> FeedbackRecord:
        """Store a rating of `served` (redacted with the traces' sanitiser)."""
        import sqlite3

        system, history, user = _split(served.turns)
        record = FeedbackRecord(
            request_id=served.request_id, trace_id=served.trace_id, agent=served.agent,
            score=score,
            correction=None if correction is None else sanitize_text(correction),
            system=sanitize_text(system),
            history=tuple((r, sanitize_text(c)) for r, c in history),
            input=sanitize_text(user), answer=sanitize_text(served.answer),
            served_at=served.served_at, rated_at=rated_at)
        db = self._connect(create=True)
        try:
            db.execute(
                "INSERT OR REPLACE INTO feedback VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (record.request_id, record.trace_id, record.agent, record.score,
                 record.correction, record.system, json.dumps(record.history),
                 record.input, record.answer, record.served_at, record.rated_at))
        except sqlite3.Error as exc:
            raise FeedbackError(f"cannot write to the feedback store {self.path}: {exc}",
                                request_id=served.request_id) from exc
        finally:
            db.close()
        return record

    def records(self, *, agent: str | None = None) -> Iterator[FeedbackRecord]:
        """Every rating, oldest first."""
        import sqlite3

        db = self._connect(create=False)
        try:
            query = "SELECT * FROM feedback" + (" WHERE agent = ?" if agent else "")
            rows = db.execute(query + " ORDER BY rated_at, request_id",
                              (agent,) if agent else ()).fetchall()
        except sqlite3.Error as exc:
            raise FeedbackError(f"cannot read the feedback store {self.path}: {exc}") from exc
        finally:
            db.close()
        for row in rows:
            yield FeedbackRecord(
                request_id=row[0], trace_id=row[1], agent=row[2], score=row[3],
                correction=row[4], system=row[5],
                history=tuple((str(r), str(c)) for r, c in json.loads(row[6])),
                input=row[7], answer=row[8], served_at=row[9], rated_at=row[10])

    def examples(self, *, min_score: int, agent: str | None = None
                 ) -> Iterator[TrainingExample]:
        """Training examples: a correction whatever the score (it says what the answer should
        have been), else the answer itself when rated at least `min_score`."""
        for record in self.records(agent=agent):
            target = record.correction if record.correction else (
                record.answer if record.score >= min_score else None)
            if target and record.input:
                yield TrainingExample(record.input, target, record.system, record.history)

    def stats(self, *, min_score: int) -> FeedbackStats:
        records = list(self.records())
        by_score: dict[int, int] = {}
        by_agent: dict[str, int] = {}
        for r in records:
            by_score[r.score] = by_score.get(r.score, 0) + 1
            by_agent[r.agent] = by_agent.get(r.agent, 0) + 1
        return FeedbackStats(
            total=len(records), by_score=dict(sorted(by_score.items())), by_agent=by_agent,
            corrections=sum(1 for r in records if r.correction),
            exportable=sum(1 for _ in self.examples(min_score=min_score)),
            min_score=min_score)
