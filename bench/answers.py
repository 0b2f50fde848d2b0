"""Answer quality of the default registry on SmolLM2: eval/answers.jsonl, each question asked of
its labelled agent at temperatures 0, 0.2, 0.4, 0.7 and at the agent's registry default; the
check is that each default is not significantly worse than the best temperature measured."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio

from bench._common import check
from bench.virtual import _registry
from orion_fsm import Engine, compare, evaluate_answers, load_answer_set

ROOT = Path(__file__).parent.parent
ANSWERS = ROOT / "eval" / "answers.jsonl"
RESULTS = Path(__file__).parent / "results"
TEMPERATURES: tuple[float | None, ...] = (0.0, 0.2, 0.4, 0.7, None)  # None: registry default
# Long enough for the logic agent's steps and final line (~90-130 tokens on SmolLM2); the
# conversation agent's 256 would mostly measure repetition loops.
MAX_TOKENS = 160


def bench_answers(quick: bool = False) -> dict[str, Any]:
    questions = load_answer_set(ANSWERS)
    samples = 1 if quick else 3
    progress_every = 25

    def progress(done: int, total: int) -> None:
        if done % progress_every == 0 or done == total:
            print(f"  answers {done}/{total}", file=sys.stderr, flush=True)

    async def main() -> tuple[Any, dict[str, float], float]:
        async with Engine(trace_path=False, embeddings=False, warm_up=False) as engine:
            defaults = {a: s.generation.temperature for a, s in engine.registry.agents.items()}
            started = time.perf_counter()
            report = await evaluate_answers(engine, questions, temperatures=TEMPERATURES,
                                            samples=samples, max_tokens=MAX_TOKENS,
                                            concurrency=2, progress=progress)
            return report, defaults, time.perf_counter() - started

    report, defaults, elapsed = anyio.run(main)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "answers.json").write_text(json.dumps(report.as_dict(), indent=1,
                                                     ensure_ascii=False), encoding="utf-8")
    table: dict[str, dict[str, Any]] = {}
    checks = []
    for agent in dict.fromkeys(s.agent for s in report.scores):
        scores = sorted((s for s in report.scores if s.agent == agent),
                        key=lambda s: s.temperature)
        best = max(scores, key=lambda s: s.overall.accuracy)
        default = report.score(agent, defaults[agent])
        versus = compare(best, default)
        table[agent] = {
            "registry_default": defaults[agent], "best": best.temperature,
            "default_minus_best": round(versus.difference, 4),
            "default_minus_best_ci95": [round(versus.low, 4), round(versus.high, 4)],
            "by_temperature": {f"{s.temperature:g}": {
                "accuracy": round(s.overall.accuracy, 4),
                "ci95": [round(x, 4) for x in s.overall.interval], "n": s.overall.total,
                "categories": {c: round(t.accuracy, 4) for c, t in s.categories.items()}}
                for s in scores}}
        checks.append(check(f"{agent}: accuracy at the registry default ({defaults[agent]:g}) "
                            f"minus the best measured ({best.temperature:g})",
                            versus.difference, "not significantly below 0 (Newcombe 95 %)",
                            versus.verdict != "worse"))
    return {"questions": len(questions), "samples_per_temperature_above_0": samples,
            "max_tokens": MAX_TOKENS, "answers": len(report.answers),
            "elapsed_s": round(elapsed, 1),
            "answers_per_s": round(len(report.answers) / elapsed, 3),
            "agents": table, "checks": checks}


VIRTUAL = "code+logic"


def bench_virtual_answers(quick: bool = False) -> dict[str, Any]:
    """Issue 12's answer quality: code+logic (as shipped, and with early stop off, i.e. always
    the fusion of both answers) against its members alone, on the questions labelled for
    either member (code, arithmetic, logic), greedy: one deterministic answer each, so the
    comparison is of the agents, not of sampling luck."""
    questions = [q for q in load_answer_set(ANSWERS) if q.agent in ("code", "logic")]
    if quick:
        questions = questions[::3]

    async def scored(registry: Any, agents: list[str]) -> Any:
        async with Engine(registry=registry, trace_path=False, embeddings=False,
                          warm_up=False) as engine:
            # One at a time: a virtual request already takes both cores.
            return await evaluate_answers(engine, questions, agents=agents, temperatures=[0],
                                          max_tokens=MAX_TOKENS, concurrency=1)

    async def main() -> tuple[Any, Any, float]:
        started = time.perf_counter()
        shipped = await scored(None, [VIRTUAL, "code", "logic"])
        # The default registry with early stop off: both members always answer.
        fused = await scored(_registry(policy="none"), [VIRTUAL])
        return shipped, fused, time.perf_counter() - started

    shipped, fused, elapsed = anyio.run(main)
    runs = {f"{VIRTUAL} (leader_first early stop, as shipped)": (shipped, VIRTUAL),
            f"{VIRTUAL} (no early stop: fusion of both)": (fused, VIRTUAL),
            "code alone": (shipped, "code"), "logic alone": (shipped, "logic")}
    configs = {label: report.score(agent) for label, (report, agent) in runs.items()}
    passed = {label: {a.question_id: a.passed for a in report.answers if a.agent == agent}
              for label, (report, agent) in runs.items()}
    best_member = max(configs["code alone"], configs["logic alone"],
                      key=lambda s: s.overall.accuracy)
    best_label = "code alone" if best_member is configs["code alone"] else "logic alone"
    table, checks = {}, []
    for label, score in configs.items():
        row: dict[str, Any] = {
            "accuracy": round(score.overall.accuracy, 4),
            "ci95": [round(x, 4) for x in score.overall.interval], "n": score.overall.total,
            "failed": score.overall.failed,
            "categories": {c: round(t.accuracy, 4) for c, t in score.categories.items()}}
        if score.agent == VIRTUAL:
            versus = compare(best_member, score)
            mine, theirs = passed[label], passed[best_label]
            row |= {f"minus_{best_label.replace(' ', '_')}": round(versus.difference, 4),
                    "ci95_of_difference": [round(versus.low, 4), round(versus.high, 4)],
                    # Paired, question by question: right where the member was wrong, and
                    # the reverse.
                    "gained": sum(mine[q] and not theirs[q] for q in mine),
                    "lost": sum(theirs[q] and not mine[q] for q in mine)}
            checks.append(check(f"{label}: accuracy minus {best_label}'s", versus.difference,
                                "not significantly below 0 (Newcombe 95 %)",
                                versus.verdict != "worse"))
        table[label] = row
    return {"questions": len(questions), "temperature": 0, "max_tokens": MAX_TOKENS,
            "elapsed_s": round(elapsed, 1), "configurations": table, "checks": checks}


BENCHMARKS: dict[str, Callable[..., dict[str, Any]]] = {"answers": bench_answers,
                                                        "virtual_answers": bench_virtual_answers}
