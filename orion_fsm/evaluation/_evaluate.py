"""Answer quality measured through the public Engine: every question of an answer set asked of
each agent at each temperature (N seeded samples), scored per category with Wilson intervals;
and the comparison of two agents' scores."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import anyio

from orion_fsm._exceptions import EvaluationError, RequestFailed
from orion_fsm._types import Result

from ._answers import AnswerQuestion, passes
from ._stats import Verdict, difference_interval, verdict, wilson_interval

if TYPE_CHECKING:
    from orion_fsm._engine import Engine

__all__ = ["AgentScore", "Answer", "AnswerReport", "Comparison", "EvalProgress", "Tally",
           "compare", "evaluate"]

EvalProgress = Callable[[int, int], None]  # (answers scored, answers to score)


@dataclass(frozen=True, slots=True)
class Tally:
    """Answers that passed out of those asked; `failed` of them ended in error (counted wrong)."""

    correct: int
    total: int
    failed: int = 0

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else 0.0

    @property
    def interval(self) -> tuple[float, float]:
        """Wilson 95 % interval. Samples of one question are not independent draws: with
        samples > 1 the interval is somewhat narrower than the truth."""
        return wilson_interval(self.correct, self.total)

    def as_dict(self) -> dict[str, Any]:
        low, high = self.interval
        return {"correct": self.correct, "total": self.total, "failed": self.failed,
                "accuracy": round(self.accuracy, 4), "ci95": [round(low, 4), round(high, 4)]}


@dataclass(frozen=True, slots=True)
class Answer:
    """One sample: what `agent` answered to a question at `temperature` with `seed`."""

    question_id: str
    category: str
    agent: str  # the agent asked
    served_by: str | None  # the agent that answered (another one after a fallback)
    temperature: float | None  # None: a virtual agent's members at their own defaults
    seed: int
    passed: bool
    text: str
    request_id: str  # its trace record
    error: str | None = None  # the request ended in error: reason and message

    def as_dict(self) -> dict[str, Any]:
        return {"question": self.question_id, "category": self.category, "agent": self.agent,
                "served_by": self.served_by, "temperature": self.temperature, "seed": self.seed,
                "passed": self.passed, "text": self.text, "request_id": self.request_id,
                "error": self.error}


@dataclass(frozen=True, slots=True)
class AgentScore:
    """One agent at one temperature: overall and per category."""

    agent: str
    temperature: float | None  # None: a virtual agent's members at their own defaults
    overall: Tally
    categories: Mapping[str, Tally]

    @property
    def setting(self) -> str:
        """The temperature it was measured at, in words."""
        return ("its members' default temperatures" if self.temperature is None
                else f"temperature {self.temperature:g}")

    def as_dict(self) -> dict[str, Any]:
        return {"agent": self.agent, "temperature": self.temperature,
                "overall": self.overall.as_dict(),
                "categories": {name: t.as_dict() for name, t in self.categories.items()}}


@dataclass(frozen=True, slots=True)
class AnswerReport:
    """Every score and every answer of one evaluation (JSON-ready with `as_dict`)."""

    questions: int
    samples: int
    seed: int
    max_tokens: int | None  # None: each agent's default
    scores: tuple[AgentScore, ...]
    answers: tuple[Answer, ...]

    def score(self, agent: str, temperature: float | None = None) -> AgentScore:
        """The score of `agent` (at `temperature`, if it was measured at several)."""
        found = [s for s in self.scores if s.agent == agent
                 and (temperature is None or s.temperature == temperature)]
        if len(found) != 1:
            measured = ", ".join(f"{s.agent} at {s.setting}" for s in self.scores)
            at = "any temperature" if temperature is None else f"temperature {temperature:g}"
            raise EvaluationError(f"no single score for agent {agent!r} at {at}; measured: "
                                  f"{measured}")
        return found[0]

    def as_dict(self) -> dict[str, Any]:
        return {"questions": self.questions, "samples": self.samples, "seed": self.seed,
                "max_tokens": self.max_tokens, "scores": [s.as_dict() for s in self.scores],
                "answers": [a.as_dict() for a in self.answers]}


@dataclass(frozen=True, slots=True)
class Comparison:
    """B's overall accuracy minus A's, its 95 % interval, and what that says about B."""

    a: AgentScore
    b: AgentScore
    difference: float
    low: float
    high: float
    verdict: Verdict

    def as_dict(self) -> dict[str, Any]:
        return {"a": self.a.as_dict(), "b": self.b.as_dict(),
                "difference": round(self.difference, 4),
                "ci95": [round(self.low, 4), round(self.high, 4)], "verdict": self.verdict}


def compare(a: AgentScore, b: AgentScore) -> Comparison:
    """B against A on their overall tallies (Newcombe's interval of the difference)."""
    diff, low, high = difference_interval(a.overall.correct, a.overall.total,
                                          b.overall.correct, b.overall.total)
    return Comparison(a, b, diff, low, high, verdict(low, high))


@dataclass(frozen=True, slots=True)
class _Ask:
    question: AnswerQuestion
    agent: str
    temperature: float | None
    seed: int


def _plan(engine: Engine, questions: Sequence[AnswerQuestion], agents: Sequence[str] | None,
          temperatures: Iterable[float | None], samples: int, seed: int) -> list[_Ask]:
    wanted = list(temperatures)
    if not wanted:
        raise EvaluationError("no temperature to evaluate at: give at least one (or None for "
                              "each agent's default)")
    if any(t is not None and not t >= 0 for t in wanted):
        raise EvaluationError(f"temperatures must be >= 0 (None: the agent's default); got "
                              f"{wanted}")
    if samples < 1:
        raise EvaluationError(f"samples must be at least 1; got {samples}")
    asked = list(dict.fromkeys(agents if agents is not None else (q.agent for q in questions)))
    registry = engine.registry
    known = [*registry.agents, *registry.virtual]
    unknown = [a for a in asked if a not in known]
    if unknown:
        raise EvaluationError(f"unknown agent(s) {', '.join(unknown)}; the registry has "
                              f"{', '.join(known)}")
    plan = []
    for agent in asked:
        # A virtual agent has no temperature of its own: by default each member keeps its.
        default = (None if agent in registry.virtual
                   else registry.get(agent).generation.temperature)
        mine = [q for q in questions if agents is not None or q.agent == agent]
        for temperature in dict.fromkeys(default if t is None else float(t) for t in wanted):
            # Greedy decoding ignores the seed: one sample says all there is.
            draws = 1 if temperature == 0 else samples
            plan += [_Ask(q, agent, temperature, seed + s) for q in mine for s in range(draws)]
    return plan


async def _answer(engine: Engine, ask: _Ask, max_tokens: int | None) -> Answer:
    q = ask.question
    try:
        # cache=False: the model is measured, not the result cache (each sample is a request
        # of its own, with its trace record).
        result = await engine.infer(q.question, agent=ask.agent, temperature=ask.temperature,
                                    seed=ask.seed, max_tokens=max_tokens, cache=False)
    except RequestFailed as exc:
        if exc.reason == "invalid":  # our request was wrong, not the model's answer
            raise EvaluationError(f"question {q.id} to agent {ask.agent}: {exc}") from None
        failed = exc.result if isinstance(exc.result, Result) else None
        return Answer(q.id, q.category, ask.agent, None if failed is None else failed.agent,
                      ask.temperature, ask.seed, False, "" if failed is None else failed.text,
                      exc.request_id or "", f"{exc.reason}: {exc}")
    return Answer(q.id, q.category, ask.agent, result.agent, ask.temperature, ask.seed,
                  await passes(q.check, result.text), result.text, result.request_id)


def _tally(answers: Iterable[Answer]) -> Tally:
    done = list(answers)
    return Tally(sum(a.passed for a in done), len(done), sum(a.error is not None for a in done))


async def evaluate(
    engine: Engine, questions: Sequence[AnswerQuestion], *,
    agents: Sequence[str] | None = None, temperatures: Iterable[float | None] = (None,),
    samples: int = 1, seed: int = 0, max_tokens: int | None = None, concurrency: int = 1,
    progress: EvalProgress | None = None,
) -> AnswerReport:
    """Ask every question and score the answers.

    `agents`: each one answers every question; None sends each question to its labelled
    agent (`question.agent`). `temperatures`: None is the agent's registry default. Each
    question is asked `samples` times with seeds `seed, seed + 1, ...` (once at temperature 0,
    which is greedy); the same seeds for every agent and temperature. A request that ends in
    error counts as a wrong answer (`Tally.failed`); one the engine refuses as invalid raises
    EvaluationError. `concurrency`: requests in flight at once.
    """
    if concurrency < 1:
        raise EvaluationError(f"concurrency must be at least 1; got {concurrency}")
    plan = _plan(engine, questions, agents, temperatures, samples, seed)
    answers: list[Answer | None] = [None] * len(plan)
    limiter = anyio.CapacityLimiter(concurrency)
    done = 0

    refused: list[EvaluationError] = []

    async def run(index: int, ask: _Ask, scope: anyio.CancelScope) -> None:
        nonlocal done
        async with limiter:
            try:
                answers[index] = await _answer(engine, ask, max_tokens)
            except EvaluationError as exc:
                # Every other request would be refused the same way: stop, say it once
                # (not as an exception group of the same error).
                refused.append(exc)
                scope.cancel()
                return
        done += 1
        if progress is not None:
            progress(done, len(plan))

    if progress is not None:
        progress(0, len(plan))
    async with anyio.create_task_group() as tg:
        for index, ask in enumerate(plan):
            tg.start_soon(run, index, ask, tg.cancel_scope)
    if refused:
        raise refused[0]
    scored = [a for a in answers if a is not None]
    scores = []
    for agent, temperature in dict.fromkeys((a.agent, a.temperature) for a in scored):
        mine = [a for a in scored if a.agent == agent and a.temperature == temperature]
        categories = dict.fromkeys(a.category for a in mine)
        scores.append(AgentScore(agent, temperature, _tally(mine), {
            c: _tally(a for a in mine if a.category == c) for c in categories}))
    return AnswerReport(len(questions), samples, seed, max_tokens, tuple(scores), tuple(scored))
