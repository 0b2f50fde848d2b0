from __future__ import annotations

from pathlib import Path

import pytest

from orion_fsm import ContextStore, evaluate_context
from orion_fsm.services.context._eval import ContextQuestion, holds_answer
from tests.services.context.conftest import WordTokenizer

RANDOM_TITLE = ":mod:`random` --- Generate pseudo-random numbers > Functions for sequences"
CHOICE = ".. function:: choice(seq)\n\n   Return a random element from the sequence *seq*.\n"


def test_the_answer_text_anywhere_in_heading_or_text_is_a_hit() -> None:
    assert holds_answer("Intro", "Call  random.CHOICE\n(x) here", "random.choice")
    assert holds_answer(RANDOM_TITLE, "text", "pseudo-random")


def test_a_qualified_answer_matches_its_modules_definition_unless_strict() -> None:
    assert holds_answer(RANDOM_TITLE, CHOICE, "random.choice")
    assert not holds_answer(RANDOM_TITLE, CHOICE, "random.choice", strict=True)
    # Cited as code also counts; a `currentmodule` directive names the module too.
    assert holds_answer(RANDOM_TITLE, "Prefer :func:`choice` here.", "random.choice")
    assert holds_answer("Recipes", ".. currentmodule:: random\n\nUse choice(x).",
                        "random.choice")
    assert holds_answer(":mod:`os` --- OS", ".. data:: environ\n\n   A mapping.", "os.environ")


def test_a_qualified_answer_needs_the_module_and_the_name_as_code() -> None:
    # Another module's chunk, a longer name, the name as a plain word, a module only in a
    # subsection's title: all misses.
    assert not holds_answer(":mod:`secrets` --- Secrets", CHOICE, "random.choice")
    assert not holds_answer(RANDOM_TITLE, ".. function:: choices(seq)", "random.choice")
    assert not holds_answer(":mod:`signal` --- Signals", "Set a signal handler.",
                            "signal.signal")
    assert not holds_answer("Intro > Comparison with :mod:`random`", CHOICE, "random.choice")
    assert not holds_answer(RANDOM_TITLE, CHOICE, "choice(seq) returns")


@pytest.mark.anyio
async def test_evaluation_counts_strict_hits_beside_qualified_ones(tmp_path: Path) -> None:
    text = ("random --- pseudo-random numbers\n================================\n\n"
            ".. module:: random\n\n" + CHOICE + "\n.. function:: shuffle(x)\n\n"
            "   Shuffle the sequence *x* in place.\n")
    async with await ContextStore.open(tmp_path / "s", tokenizer=WordTokenizer(),
                                       tokenizer_id="words") as store:
        await store.add(text, name="random.rst")
        report = await evaluate_context(store, [
            ContextQuestion("random element of a sequence", "random.choice"),
            ContextQuestion("shuffle a list in place", "shuffle(x)"),
            ContextQuestion("sort a list", "sorted(")], top_k=1, mode="lexical")
    assert (report.hits, report.strict_hits, report.questions) == (2, 1, 3)
    assert [m.answer for m in report.misses] == ["sorted("]
    assert report.as_dict()["strict_recall"] == round(1 / 3, 4)
