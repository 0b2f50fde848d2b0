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
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio

from bench._common import check
from orion_fsm import (
    AnswerCheck,
    AnswerQuestion,
    Engine,
    Registry,
    TrainingExample,
    TuneConfig,
    evaluate_answers,
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


def _questions(examples: list[TrainingExample]) -> list[AnswerQuestion]:
    """The test examples as an answer set: each answer must be the target (`exact`)."""
    return [AnswerQuestion(f"t{i}", e.input, "answer_format", AGENT, AnswerCheck(exact=e.target))
            for i, e in enumerate(examples)]


async def _scores(registry: Registry, cache: Path, agents: list[str],
                  examples: list[TrainingExample]) -> tuple[dict[str, float],
                                                            dict[str, list[str]]]:
    """Test accuracy of each agent through the Engine and the evaluator (greedy), and the
    first answers of each."""
    async with Engine(registry=registry, cache_dir=cache, trace_path=False, embeddings=False,
                      caches=False, threads=1, feedback=False) as engine:
        report = await evaluate_answers(engine, _questions(examples), agents=agents,
                                        temperatures=[0], max_tokens=24)
    accuracy = {a: report.score(a).overall.accuracy for a in agents}
    shown = {a: [x.text.strip() for x in report.answers if x.agent == a][:3] for a in agents}
    return accuracy, shown


def _merge_recipes(base: Path, tuned: Path) -> dict[str, Any]:
    """The tuned model merged back onto its base: each method on the task vector (tuned -
    base; the base's own is zero), with the density mergekit's examples use, and the same
    merges stored in the base's 4-bit type (what a merge into the first model's type did)."""
    from orion_fsm.modelops import MergedModel, MergeRecipe

    pair = (MergedModel(base), MergedModel(tuned))
    return {
        "task_arithmetic": MergeRecipe("task_arithmetic", pair, base=base),
        "ties (density 0.5)": MergeRecipe("ties", pair, base=base, density=0.5),
        "dare (density 0.5)": MergeRecipe("dare", pair, base=base, density=0.5),
        "ties (density 0.2)": MergeRecipe("ties", pair, base=base, density=0.2),
        "linear (0.5 / 0.5)": MergeRecipe("linear", pair),
        "slerp (t 0.5)": MergeRecipe("slerp", pair, t=0.5),
        "task_arithmetic, stored q4_1": MergeRecipe("task_arithmetic", pair, base=base,
                                                     dtype="q4_1"),
    }


def _with_agents(registry_file: Path, variant: str, models: dict[str, Path]) -> Registry:
    """The tune's registry plus one agent per merged model (a copy of the tuned variant)."""
    doc = json.loads(registry_file.read_text(encoding="utf-8"))
    tuned = next(a for a in doc["agents"] if a["id"] == variant)
    for agent_id, path in models.items():
        doc["agents"].append({**tuned, "id": agent_id, "model": {"path": str(path)}})
    return Registry.from_dict(doc, source=registry_file)


def _slug(method: str) -> str:
    return "merge-" + "".join(c if c.isalnum() else "-" for c in method).strip("-")


def _stages() -> Callable[[str, int, int], None]:
    """Progress as one stderr line per stage finished (a bench log, not a terminal bar)."""
    started = time.monotonic()

    def report(stage: str, done: int, total: int) -> None:
        if total and done == total:
            print(f"  {stage}: {total} done at {time.monotonic() - started:.0f} s",
                  file=sys.stderr, flush=True)

    return report


def tune_on_feedback(quick: bool = False) -> dict[str, Any]:
    from orion_fsm.backends import ensure_converted
    from orion_fsm.modelops import merge_models

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
        tuned_path = Path(report.model_path)
        # The runtime file the tune copied its other tensors from: the task vector's origin.
        base_path = ensure_converted(Registry.load().get(AGENT).model.locate(),
                                     root / "cache").model_path
        merged: dict[str, Path] = {}
        merge_s: dict[str, float] = {}
        recipes = _merge_recipes(base_path, tuned_path)
        if quick:
            recipes = {k: v for k, v in recipes.items() if k.startswith("task_arithmetic")}
        for method, recipe in recipes.items():
            out = root / "merged" / _slug(method) / tuned_path.name
            t = time.monotonic()
            merge_models(recipe, out)
            merge_s[method] = round(time.monotonic() - t, 1)
            shutil.copyfile(tuned_path.parent / "tokenizer.json", out.parent / "tokenizer.json")
            merged[_slug(method)] = out
        registry = _with_agents(root / "models.user.json", report.variant, merged)
        t = time.monotonic()
        scores, shown = anyio.run(_scores, registry, root / "cache",
                                  [AGENT, report.variant, *merged], test)
        engine_s = time.monotonic() - t
        size_mb = {"base": round(base_path.stat().st_size / 1e6, 1),
                   "tuned": round(tuned_path.stat().st_size / 1e6, 1),
                   **{m: round(merged[_slug(m)].stat().st_size / 1e6, 1) for m in recipes}}
    finally:
        shutil.rmtree(root, ignore_errors=True)
    before, after = scores[AGENT], scores[report.variant]
    gain = after - before
    kept = {m: round((scores[_slug(m)] - before) / gain, 3) if gain > 0 else None
            for m in recipes}
    best = max((k for k in kept.values() if k is not None), default=0.0)
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
                        "seconds": report.seconds, "tokens_per_example": report.tokens,
                        "steps_by_threads": report.steps_by_threads},
        "test_accuracy": {"base": before, "tuned": after,
                          **{m: scores[_slug(m)] for m in recipes}},
        "merge_gain_kept": kept,
        "answers": {"base": shown[AGENT], "tuned": shown[report.variant],
                    **{m: shown[_slug(m)] for m in recipes}},
        "gguf_mb": size_mb,
        "seconds": {"tune": round(tune_s, 1), "merges": merge_s,
                    "engine_check": round(engine_s, 1)},
        "load_average_at_start": round(load_avg, 1),  # other jobs share the 2 cores
        "checks": [
            check("test accuracy through the Engine, base -> tuned (gain, points)",
                  gain * 100, "> 0 (the tuned variant answers in the format)", gain > 0),
            check("base+tuned merge, best method: share of the tuned gain kept", best,
                  ">= 0.9", best >= 0.9),
            check("tune time, SmolLM2, 2 shared cores (s)", tune_s,
                  "<= 600 (quick <= 180)", tune_s <= (180 if quick else 600)),
        ],
    }


def _old_answer(torch: Any, model: Any, prompt: list[int], stops: list[int], limit: int) -> None:
    """One prompt at a time with the KV cache (how the tune's answer check used to run)."""
    cache, step = None, torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(limit):
            result = model(input_ids=step, cache=cache, use_cache=True, logits_to_keep=1)
            cache = result.cache
            token = int(result.logits[0, -1].argmax())
            if token in stops:
                break
            step = torch.tensor([[token]])


def tune_steps(quick: bool = False) -> dict[str, Any]:
    """Where a tune's time goes on SmolLM2, each way measured against the direct call in one
    run, interleaved: a training step as transformers computes the loss (every block, the
    output head at every position) against the tune's (the frozen blocks run once per
    example, the head on target tokens only), torch on 1 and 2 threads; the answer check one
    prompt at a time against batched; loading and writing."""
    from orion_fsm.backends import Tokenizer, ensure_converted
    from orion_fsm.backends._convert import write_gguf_copy
    from orion_fsm.tuning import _lora

    rounds = 2 if quick else 5
    load_avg = os.getloadavg()[0]
    started = time.monotonic()
    torch, transformers, peft = _lora._libraries()
    imported_s = time.monotonic() - started
    spec = Registry.load().get(AGENT)
    source = spec.model.locate()
    config = TuneConfig(lr=5e-4, batch=8, rank=8, layers=10, answer_tokens=10)
    root = Path(tempfile.mkdtemp(prefix="orion-bench-steps-"))
    try:
        t = time.monotonic()
        converted = ensure_converted(source, root / "cache")
        converted_s = time.monotonic() - t
        t = time.monotonic()
        model = _lora._load(transformers, torch, source)
        dequantized_s = time.monotonic() - t
        tokenizer = Tokenizer.from_file(converted.tokenizer_path)
        encoded = [_lora._encode(spec, tokenizer, e) for e in load_examples(FEEDBACK_SET)]
        torch.manual_seed(0)
        torch.set_num_threads(1)
        blocks = int(model.config.num_hidden_layers)
        first = blocks - (config.layers or blocks)
        batches = [encoded[i * config.batch:(i + 1) * config.batch] for i in range(rounds)]
        t = time.monotonic()
        states = [_lora._states_below(torch, model, b, first, config.batch) for b in batches]
        prefix_per_example = (time.monotonic() - t) / (rounds * config.batch)
        tuned = peft.get_peft_model(model, peft.LoraConfig(
            r=config.rank, lora_alpha=2 * config.rank, lora_dropout=0.0,
            target_modules=list(_lora._TARGETS), layers_to_transform=list(range(first, blocks)),
            bias="none"))
        tuned.train()
        steps: dict[str, list[float]] = {"direct": [], "tune": [], "tune, 2 threads": []}
        for batch, below in zip(batches, states, strict=True):
            for way in steps:  # interleaved: the machine's noise hits every way alike
                torch.set_num_threads(2 if way.endswith("2 threads") else 1)
                t = time.monotonic()
                if way == "direct":
                    loss = _direct_loss(torch, tuned, batch)
                else:
                    loss = _lora._loss(torch, model, batch, below, first)
                loss.backward()
                tuned.zero_grad()
                steps[way].append(time.monotonic() - t)
        torch.set_num_threads(1)
        model = tuned.merge_and_unload()
        model.eval()
        asked = encoded[:config.batch * 2]
        stops = _lora._stop_ids(spec, tokenizer)
        t = time.monotonic()
        for e in asked:
            _old_answer(torch, model, e.prompt, stops, config.answer_tokens)
        one_by_one = (time.monotonic() - t) / len(asked)
        t = time.monotonic()
        _lora._generate(torch, model, tokenizer, asked, stops, spec, config.answer_tokens)
        batched = (time.monotonic() - t) / len(asked)
        t = time.monotonic()
        replaced = _lora._merged_tensors(model, list(range(first, blocks)))
        write_gguf_copy(converted.model_path, root / "tuned.gguf", replaced)
        write_s = time.monotonic() - t
    finally:
        shutil.rmtree(root, ignore_errors=True)
    step = {k: statistics.median(v) for k, v in steps.items()}
    tokens = [e.length for e in encoded]
    padded = sum(max(e.length for e in b) * len(b) for b in batches)
    real = sum(e.length for b in batches for e in b)
    return {
        "model": f"{spec.id} ({source.name}), LoRA rank 8 on the last 10 of {blocks} blocks",
        "tokens_per_example": {"mean": round(statistics.mean(tokens), 1), "max": max(tokens),
                               "target_mean": round(statistics.mean(len(e.target)
                                                                    for e in encoded), 1),
                               "padding_share_in_batches": round(1 - real / padded, 3)},
        "seconds": {"import torch/transformers/peft": round(imported_s, 1),
                    "convert for the runtime": round(converted_s, 1),
                    "dequantize (transformers reads the GGUF)": round(dequantized_s, 1),
                    "frozen blocks, per example (once per tune)": round(prefix_per_example, 3),
                    **{f"train step of {config.batch}, {k} (median)": round(v, 2)
                       for k, v in step.items()},
                    "answer, one prompt at a time": round(one_by_one, 3),
                    "answer, batched by 16": round(batched, 3),
                    "write the GGUF": round(write_s, 1)},
        "rounds": rounds,
        "load_average_at_start": round(load_avg, 1),
        "checks": [
            check("train step, direct / tune (x)", step["direct"] / step["tune"],
                  "measured (> 1: the tune's step is cheaper)", True),
            check("train step, 1 / 2 torch threads (x)", step["tune"] / step["tune, 2 threads"],
                  "measured (> 1: two threads help on this shared machine)", True),
            check("answer check per prompt, one by one / batched (x)", one_by_one / batched,
                  "measured", True),
        ],
    }


def _direct_loss(torch: Any, model: Any, batch: list[Any]) -> Any:
    """The loss as transformers computes it from labels: every block, the head everywhere."""
    width = max(e.length for e in batch)
    ids = torch.tensor([e.prompt + e.target + [0] * (width - e.length) for e in batch])
    mask = torch.tensor([[1] * e.length + [0] * (width - e.length) for e in batch])
    labels = torch.tensor([[-100] * len(e.prompt) + e.target + [-100] * (width - e.length)
                           for e in batch])
    return model(input_ids=ids, attention_mask=mask, labels=labels).loss


BENCHMARKS: dict[str, Callable[..., dict[str, Any]]] = {"tune": tune_on_feedback,
                                                         "tune.steps": tune_steps}
