"""Fine-tuning on feedback, on SmolLM2: a feedback set of a behaviour the base model gets wrong
(a fixed answer format, `Answer: X.`, never asked for in the prompt: what corrections would
teach), tuned with `tune_agent`, then the held-out answers of the base agent and of the
registered variant compared through the Engine (ctransformers), with the time it all took.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio

from bench._common import check
from orion_fsm import (
    Engine,
    Registry,
    TrainingExample,
    TuneConfig,
    answer_matches,
    load_examples,
    tune_agent,
)

AGENT = "conversation"  # SmolLM2-135M-Instruct in the packaged registry
FEEDBACK_SET = Path(__file__).parents[1] / "eval" / "feedback_answer_format.jsonl"
TEST_SHARE = 40  # the last examples of the set: never seen by the tune, scored at the end

_CAPITALS = [("France", "Paris"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Germany", "Berlin"),
             ("Japan", "Tokyo"), ("Egypt", "Cairo"), ("Russia", "Moscow"),
             ("England", "London"), ("Greece", "Athens"), ("Portugal", "Lisbon"),
             ("Austria", "Vienna"), ("Ireland", "Dublin"), ("Norway", "Oslo"),
             ("Poland", "Warsaw"), ("China", "Beijing"), ("Canada", "Ottawa"),
             ("Belgium", "Brussels"), ("Sweden", "Stockholm"), ("Denmark", "Copenhagen"),
             ("Finland", "Helsinki"), ("Hungary", "Budapest"), ("Peru", "Lima"),
             ("Kenya", "Nairobi"), ("Thailand", "Bangkok"), ("Cuba", "Havana")]
_OPPOSITES = [("hot", "cold"), ("big", "small"), ("up", "down"), ("fast", "slow"),
              ("happy", "sad"), ("open", "closed"), ("light", "dark"), ("old", "young"),
              ("rich", "poor"), ("early", "late"), ("full", "empty"), ("hard", "soft"),
              ("wet", "dry"), ("high", "low"), ("strong", "weak"), ("long", "short"),
              ("left", "right"), ("day", "night"), ("in", "out"), ("yes", "no")]
_WORDS = ["apple", "river", "garden", "window", "planet", "pencil", "castle", "orange",
          "silver", "forest", "rocket", "button", "coffee", "bridge", "dragon", "winter",
          "guitar", "island", "mirror", "tiger"]
_SENTENCES = ["the cat sat on the mat", "we walked to the old bridge", "she reads a long book",
              "birds fly over the green hills", "my brother plays the guitar",
              "the train leaves at noon", "they painted the door red",
              "he found a coin in the sand", "the moon rises over the lake",
              "our team won the final game"]


def build_set(seed: int = 20) -> list[TrainingExample]:
    """Questions whose answers SmolLM2 mostly knows, with the fixed format as the target.
    The last TEST_SHARE lines ask about items no earlier line mentions (each item's two
    phrasings stay on one side), so the test scores the format, not a memorised answer."""
    rng = random.Random(seed)
    groups: list[list[tuple[str, str]]] = []
    for country, capital in _CAPITALS:
        groups.append([(f"What is the capital of {country}?", capital),
                       (f"Which city is the capital of {country}?", capital)])
    for word, opposite in _OPPOSITES:
        groups.append([(f"What is the opposite of {word}?", opposite),
                       (f"Give the opposite of the word '{word}'.", opposite)])
    for word in _WORDS:
        groups.append([(f"Write the word '{word}' in capital letters.", word.upper()),
                       (f"How do you write '{word}' in uppercase?", word.upper())])
    for sentence in _SENTENCES:
        groups.append([(f"What is the last word of: '{sentence}'?", sentence.split()[-1]),
                       (f"What is the first word of: '{sentence}'?", sentence.split()[0])])
    numbers = []
    for _ in range(80):
        a, b = rng.sample(range(2, 99), 2)
        numbers.append([(rng.choice(["Which number is larger: {} or {}?",
                                     "Which is bigger, {} or {}?"]).format(a, b),
                         str(max(a, b)))])
    rng.shuffle(groups)
    test_groups = groups[:TEST_SHARE // 4] + numbers[:TEST_SHARE // 2]
    train_groups = groups[TEST_SHARE // 4:] + numbers[TEST_SHARE // 2:]
    train = [pair for group in train_groups for pair in group]
    test = [pair for group in test_groups for pair in group]
    rng.shuffle(train)
    rng.shuffle(test)
    system = Registry.load().get(AGENT).system_prompt  # what the feedback export records
    return [TrainingExample(q, f"Answer: {a}.", system) for q, a in train + test]


def _write(path: Path, examples: list[TrainingExample]) -> None:
    path.write_text("".join(json.dumps(e.as_dict(), ensure_ascii=False) + "\n"
                            for e in examples), encoding="utf-8")


async def _answers(registry: Registry, cache: Path, agent: str,
                   examples: list[TrainingExample]) -> tuple[float, list[str]]:
    """Held-out accuracy of `agent` through the Engine (greedy), and its first answers."""
    async with Engine(registry=registry, cache_dir=cache, trace_path=False, embeddings=False,
                      caches=False, threads=1, feedback=False) as engine:
        answers = [(await engine.infer(e.input, agent=agent, system=e.system, max_tokens=24,
                                       temperature=0)).text.strip() for e in examples]
    passed = sum(answer_matches(a, e.target) for a, e in zip(answers, examples, strict=True))
    return passed / len(examples), answers[:5]


def _stages() -> Callable[[str, int, int], None]:
    """Progress as one stderr line per stage finished (a bench log, not a terminal bar)."""
    started = time.monotonic()

    def report(stage: str, done: int, total: int) -> None:
        if total and done == total:
            print(f"  {stage}: {total} done at {time.monotonic() - started:.0f} s",
                  file=sys.stderr, flush=True)

    return report


def tune_on_feedback(quick: bool = False) -> dict[str, Any]:
    if not FEEDBACK_SET.is_file():
        _write(FEEDBACK_SET, build_set())
    examples = load_examples(FEEDBACK_SET)
    train, test = examples[:-TEST_SHARE], examples[-TEST_SHARE:]
    if quick:
        train, test = train[:100], test[:20]
    config = TuneConfig(epochs=1 if quick else 3, lr=5e-4, batch=8, rank=8, layers=10,
                        held_out=0.2, min_examples=50, answer_tokens=10)
    root = Path(tempfile.mkdtemp(prefix="orion-bench-tune-"))
    try:
        data = root / "train.jsonl"
        _write(data, train)
        load_avg = os.getloadavg()[0]
        started = time.monotonic()
        report = tune_agent(Registry.load(), AGENT, data, cache_dir=root / "cache",
                            registry_out=root / "models.user.json", config=config,
                            progress=_stages())
        tune_s = time.monotonic() - started
        tuned = Registry.load(root / "models.user.json")
        t = time.monotonic()
        before, before_shown = anyio.run(_answers, tuned, root / "cache", AGENT, test)
        after, after_shown = anyio.run(_answers, tuned, root / "cache", report.variant, test)
        engine_s = time.monotonic() - t
        size_mb = Path(report.model_path).stat().st_size / 1e6
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return {
        "feedback_set": str(FEEDBACK_SET.relative_to(FEEDBACK_SET.parents[1])),
        "examples": {"set": len(examples), "tune_file": len(train), "test": len(test),
                     "tune_train": report.train_examples,
                     "tune_held_out": report.held_out_examples},
        "config": {k: report.config[k] for k in ("epochs", "lr", "batch", "rank", "layers",
                                                 "threads")},
        "tune_report": {"train_loss": report.train_loss, "held_out_loss": report.held_out_loss,
                        "best_epoch": report.best_epoch, "stopped_early": report.stopped_early,
                        "accuracy_before_hf": report.accuracy_before,
                        "accuracy_after_hf": report.accuracy_after,
                        "seconds": report.seconds},
        "engine_accuracy": {"base": before, "tuned": after},
        "answers": {"base": before_shown, "tuned": after_shown},
        "tuned_gguf_mb": round(size_mb, 1),
        "seconds": {"tune": round(tune_s, 1), "engine_check": round(engine_s, 1)},
        "load_average_at_start": round(load_avg, 1),  # other jobs share the 2 cores
        "checks": [
            check("test accuracy through the Engine, base -> tuned (gain, points)",
                  (after - before) * 100, "> 0 (the tuned variant answers in the format)",
                  after > before),
            check("tune time, SmolLM2, 2 shared cores (s)", tune_s,
                  "<= 600 (quick <= 180)", tune_s <= (180 if quick else 600)),
        ],
    }


BENCHMARKS: dict[str, Callable[..., dict[str, Any]]] = {"tune": tune_on_feedback}
