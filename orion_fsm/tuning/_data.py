"""The training JSONL (`{"input", "target", "system"?, "history"?}` per line, as `orion-fsm
feedback export` writes it): read, checked line by line, split into train and held-out."""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path
from typing import TypeVar

from orion_fsm._exceptions import TuningError
from orion_fsm.services.feedback._store import TrainingExample

__all__ = ["load_examples", "split_examples"]

T = TypeVar("T")


def load_examples(path: Path) -> list[TrainingExample]:
    """Every line of `path` as a TrainingExample; TuningError naming the first bad line."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise TuningError(f"training data {path} does not exist; write it with "
                          "`orion-fsm feedback export --output FILE`") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise TuningError(f"cannot read training data {path}: {exc}") from None
    examples = []
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            doc = json.loads(line)
        except ValueError as exc:
            raise TuningError(f"{path}, line {number}: not JSON ({exc.args[0]}); each line "
                              'must be {"input": ..., "target": ..., "system": ...}') from None
        examples.append(_example(doc, f"{path}, line {number}"))
    if not examples:
        raise TuningError(f"training data {path} holds no examples; rate answers and export "
                          "them with `orion-fsm feedback export`")
    return examples


def _example(doc: object, where: str) -> TrainingExample:
    if not isinstance(doc, dict):
        raise TuningError(f"{where}: expected a JSON object with input and target")
    for key in ("input", "target"):
        value = doc.get(key)
        if not isinstance(value, str) or not value.strip():
            raise TuningError(f"{where}: {key!r} must be non-empty text, got {value!r}")
    system = doc.get("system", "")
    if not isinstance(system, str):
        raise TuningError(f"{where}: 'system' must be text, got {system!r}")
    history = doc.get("history", [])
    if not isinstance(history, list) or not all(
            isinstance(turn, list) and len(turn) == 2 and turn[0] in ("user", "assistant")
            and isinstance(turn[1], str) for turn in history):
        raise TuningError(f"{where}: 'history' must be a list of [role, text] turns (role "
                          "user or assistant)")
    return TrainingExample(doc["input"], doc["target"], system,
                           tuple((str(r), str(c)) for r, c in history))


def split_examples(examples: Sequence[T], held_out: float, seed: int
                   ) -> tuple[list[T], list[T]]:
    """(train, held-out): a seeded shuffle, at least one example on each side."""
    order = list(examples)
    random.Random(seed).shuffle(order)
    count = min(max(1, round(len(order) * held_out)), len(order) - 1)
    return order[count:], order[:count]
