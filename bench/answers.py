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


BENCHMARKS: dict[str, Callable[..., dict[str, Any]]] = {"answers": bench_answers}
