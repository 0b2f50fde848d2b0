"""`orion-fsm eval FILE`: answer quality on a labelled answer set (eval/answers.jsonl format),
per agent and temperature, with 95 % intervals; also what `models compare` runs and prints."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import anyio

from orion_fsm import (
    TRACE_FILE_ENV,
    AgentScore,
    AnswerQuestion,
    AnswerReport,
    Engine,
    EvalProgress,
    EvaluationError,
    OrionError,
    Tally,
    evaluate_answers,
    load_answer_set,
)


def add_parser(sub: Any) -> None:
    ev = sub.add_parser(
        "eval", help="score agents on a labelled answer set (accuracy per category, 95 %% CI)",
        description="Ask every question of FILE (JSONL, the format of eval/answers.jsonl; see "
                    "eval/README.md) and score the answers per agent, temperature and category. "
                    "Without --agents each question goes to the agent it is labelled with.")
    ev.add_argument("file", metavar="FILE")
    ev.add_argument("--agents", metavar="A,B", help="agents that answer every question, "
                    "virtual ones (code+logic) included (default: each question's labelled "
                    "agent)")
    ev.add_argument("--temperatures", metavar="T,T", default="default",
                    help="comma-separated temperatures; 'default' is each agent's registry "
                    "default, a virtual agent's members' own (the default)")
    add_sampling_options(ev)
    ev.add_argument("--json", action="store_true", help="print the report (with every answer) "
                    "as one JSON object")
    ev.set_defaults(handler=lambda args: anyio.run(_eval, args))


def add_sampling_options(parser: argparse.ArgumentParser) -> None:
    """What `eval` and `models compare` share."""
    parser.add_argument("--samples", type=int, default=1,
                        help="answers per question at a temperature above 0, with seeds "
                        "SEED, SEED+1, ... (default: 1)")
    parser.add_argument("--seed", type=int, default=0, help="first seed (default: 0)")
    parser.add_argument("--max-tokens", type=int, help="cap on every answer (default: each "
                        "agent's)")
    parser.add_argument("--categories", metavar="C,C", help="only the questions of these "
                        "categories")
    parser.add_argument("--concurrency", type=int, default=1,
                        help="requests in flight at once (default: 1)")
    parser.add_argument("--trace-file", default=os.environ.get(TRACE_FILE_ENV),
                        help="JSONL trace file: every answer is a request with its record "
                        "(default: $ORION_FSM_TRACE_FILE, else the state folder's)")


def _split(value: str | None) -> list[str] | None:
    if value is None:
        return None
    items = [item.strip() for item in value.split(",") if item.strip()]
    return items or None


def parse_temperatures(value: str) -> list[float | None]:
    """'0,0.3,default' -> [0.0, 0.3, None]."""
    temperatures: list[float | None] = []
    for item in _split(value) or ["default"]:
        if item == "default":
            temperatures.append(None)
            continue
        try:
            temperatures.append(float(item))
        except ValueError:
            raise EvaluationError(f"--temperatures expects numbers separated by commas (or "
                                  f"'default'), e.g. 0,0.3,0.7; got {item!r}") from None
    return temperatures


def questions_for(args: argparse.Namespace, path: str) -> list[AnswerQuestion]:
    """The answer set at `path`, narrowed to --categories."""
    questions = load_answer_set(path)
    wanted = _split(args.categories)
    if wanted is None:
        return questions
    known = list(dict.fromkeys(q.category for q in questions))
    unknown = [c for c in wanted if c not in known]
    if unknown:
        raise EvaluationError(f"no question of category {', '.join(unknown)} in {path}; its "
                              f"categories: {', '.join(known)}")
    return [q for q in questions if q.category in wanted]


@contextmanager
def progress_bar(enabled: bool) -> Iterator[EvalProgress | None]:
    """A tqdm bar on stderr (when it is a terminal) fed by the evaluator's progress calls."""
    if not enabled:
        yield None
        return
    from tqdm import tqdm  # only the CLI draws bars

    bar = tqdm(desc="answers", unit="answer", leave=False, file=sys.stderr)

    def update(done: int, total: int) -> None:
        bar.total = total
        bar.update(done - bar.n)

    try:
        yield update
    finally:
        bar.close()


async def run_evaluation(args: argparse.Namespace, registry: str | None,
                         questions: Sequence[AnswerQuestion], agents: Sequence[str] | None,
                         temperatures: Sequence[float | None]) -> AnswerReport:
    """One Engine over `registry`, the questions asked of `agents` (None: labelled ones)."""
    engine = Engine(registry=registry, cache_dir=args.cache_dir, trace_path=args.trace_file,
                    embeddings=False, warm_up=False)
    failure: OrionError | None = None
    async with engine:
        try:
            with progress_bar(sys.stderr.isatty()) as progress:
                return await evaluate_answers(
                    engine, questions, agents=agents, temperatures=temperatures,
                    samples=args.samples, seed=args.seed, max_tokens=args.max_tokens,
                    concurrency=args.concurrency, progress=progress)
        except OrionError as exc:
            failure = exc  # raised outside the engine's block: one line, not a group
    assert failure is not None
    raise failure


def tally_text(tally: Tally) -> str:
    low, high = tally.interval
    return (f"{tally.accuracy:6.1%} [{low:6.1%}, {high:6.1%}] {tally.correct:>4}/{tally.total:<4}"
            + (f" ({tally.failed} failed)" if tally.failed else ""))


def score_lines(score: AgentScore, label: str | None = None) -> list[str]:
    lines = [f"{label or score.agent} @ {score.setting}: "
             f"{tally_text(score.overall)}"]
    lines += [f"    {name:<14} {tally_text(t)}" for name, t in score.categories.items()]
    return lines


async def _eval(args: argparse.Namespace) -> int:
    questions = questions_for(args, args.file)
    report = await run_evaluation(args, args.registry, questions, _split(args.agents),
                                  parse_temperatures(args.temperatures))
    if args.json:
        print(json.dumps({"file": args.file, **report.as_dict()}, ensure_ascii=False, indent=2))
        return 0
    print(f"{args.file}: {report.questions} questions, {len(report.answers)} answers "
          f"(accuracy, 95 % Wilson interval, correct/asked)")
    for score in report.scores:
        print("\n".join(score_lines(score)))
    return 0
