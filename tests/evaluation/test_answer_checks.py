"""Answer sets: loading (a malformed line is a one-line error naming it) and the checks (what
passes and what does not, including generated code run in a subprocess)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from orion_fsm import AnswerCheck, EvaluationError, OrionError, load_answer_set
from orion_fsm.evaluation import matches, passes

pytestmark = pytest.mark.anyio

SHIPPED = Path(__file__).parents[2] / "eval" / "answers.jsonl"


def line(**fields: Any) -> str:
    doc = {"id": "q1", "question": "What is the capital of France?", "category": "fact_en",
           "agent": "conversation", "check": {"any": ["Paris"]}, **fields}
    return json.dumps({k: v for k, v in doc.items() if v is not None})


def write(tmp_path: Path, *lines: str) -> Path:
    path = tmp_path / "answers.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_the_shipped_set_loads_with_every_category_and_agent() -> None:
    questions = load_answer_set(SHIPPED)
    assert len(questions) >= 120
    categories = {q.category for q in questions}
    assert categories == {"fact_en", "fact_fr", "code", "arithmetic", "logic"}
    assert {q.agent for q in questions} == {"conversation", "code", "logic"}
    assert {q.lang for q in questions} == {"en", "fr"}
    assert sum(q.check.python is not None for q in questions) >= 15


@pytest.mark.parametrize(("lines", "message"), [
    (["{not json"], "answers.jsonl:1: not JSON"),
    ([line(check=None)], "missing check"),
    ([line(agent="")], "must be non-empty texts"),
    ([line(check={"any": ["Paris"], "regex": "Paris"})], "exactly one of any, exact, regex"),
    ([line(check={"contains": "Paris"})], "exactly one of any, exact, regex"),
    ([line(check={"exact": " "})], '"exact" must be a non-empty text'),
    ([line(check={"regex": "(unclosed"})], "not a valid regex"),
    ([line(check={"regex": 5})], "\"regex\" must be a text"),
    ([line(check={"any": []})], "non-empty list"),
    ([line(check={"any": "Paris"})], "non-empty list"),
    ([line(check={"number": "four"})], "malformed \"check\""),
    ([line(check={"python": "assert f(1) == 2"})], "needs \"function\""),
    ([line(), line()], "answers.jsonl:2: id 'q1' is used twice"),
    (["", "  "], "holds no questions"),
    (["[1, 2]"], "expected a JSON object"),
])
def test_a_malformed_answer_set_is_one_error_naming_the_line(
        tmp_path: Path, lines: list[str], message: str) -> None:
    with pytest.raises(EvaluationError, match=message.replace("(", r"\(")) as caught:
        load_answer_set(write(tmp_path, *lines))
    assert "\n" not in str(caught.value)
    assert isinstance(caught.value, OrionError)


def test_a_missing_answer_set_says_it_cannot_be_read(tmp_path: Path) -> None:
    with pytest.raises(EvaluationError, match="cannot read the answer set"):
        load_answer_set(tmp_path / "nope.jsonl")


@pytest.mark.parametrize(("check", "text", "expected"), [
    (AnswerCheck(any=("Paris",)), "The capital is PARIS, of course.", True),
    (AnswerCheck(any=("Paris",)), "Parisian cafés are nice.", False),
    (AnswerCheck(any=("Léonard", "Vinci")), "C'est leonard.", True),
    (AnswerCheck(any=("oxygène",)), "L'OXYGENE", True),
    (AnswerCheck(any=("4",)), "It is 14.", False),
    (AnswerCheck(any=("carbon dioxide", "CO2")), "They absorb CO2.", True),
    (AnswerCheck(regex=r"(?-i:\bAu\b)"), "Its symbol is Au.", True),
    (AnswerCheck(regex=r"(?-i:\bAu\b)"), "au revoir", False),
    (AnswerCheck(regex=r"^\W*john\b"), "Anna is short.\nJohn.", True),
    (AnswerCheck(number=391), "17 x 23 = 391.", True),
    (AnswerCheck(number=391), "17 x 23 = 3910", False),
    (AnswerCheck(number=4), "2,5 + 1,5 = 4,0", True),
    (AnswerCheck(number=1.5), "La moitié de 3 est 1,5.", True),
    (AnswerCheck(number=1000), "That is 1,000 metres.", True),
    (AnswerCheck(number=-3), "x = -3", True),
    (AnswerCheck(any=("yes",), none=("not an animal",)), "Yes, Tom is not an animal.", False),
    (AnswerCheck(any=("yes",), none=("not an animal",)), "Yes, Tom is an animal.", True),
    (AnswerCheck(exact="Answer: Paris."), "answer:  PARIS", True),
    (AnswerCheck(exact="Answer: Paris."), "Answer: Paris. It is in France.", False),
    (AnswerCheck(exact="Answer: Paris."), "Paris", False),
    (AnswerCheck(exact="Réponse : Léon."), "reponse : leon!", True),
    (AnswerCheck(regex=""), "", True),
    (AnswerCheck(regex="(?!)"), "anything at all", False),
])
async def test_text_checks(check: AnswerCheck, text: str, expected: bool) -> None:
    assert await passes(check, text) is expected
    assert matches(check, text) is expected  # the same check outside an event loop (the tune)


def test_matches_refuses_a_check_that_runs_code() -> None:
    with pytest.raises(EvaluationError, match="await passes"):
        matches(AnswerCheck(python="assert f(1) == 1", function="f"), "def f(x): return x")


ADD = AnswerCheck(python="assert f(2, 3) == 5\nassert f(-1, 1) == 0", function="add")


@pytest.mark.parametrize(("text", "expected"), [
    ("```python\ndef add(a, b):\n    return a + b\n```\nThat adds them.", True),
    # Another name than the question's: the last function the answer defined is tested.
    ("```python\ndef add_two_numbers(a, b):\n    return a + b\n```", True),
    ("def add(a, b):\n    return a + b", True),  # no fence: the whole text
    ("```python\ndef add(a, b):\n    return a - b\n```", False),
    # A block that raises keeps what it defined before; a later block still runs.
    ("```python\ndef add(a, b):\n    return a + b\nadd(undefined)\n```\n"
     "```python\nprint(add(2, 3))\n```", True),
    ("```python\ndef add(a, b):\n    while True:\n        pass\n```", False),  # timeout
    ("```python\nimport socket\ndef add(a, b):\n    socket.create_connection(('1.1.1.1', 80))\n"
     "    return a + b\n```", False),  # no network
    # stdin is empty: input() raises at once rather than waiting for the timeout
    ("```python\ndef add(a, b):\n    return a + b\nx = input()\n```", True),
    ("I cannot write code.", False),
])
async def test_python_checks_run_the_answer_in_a_subprocess(text: str, expected: bool) -> None:
    assert await passes(ADD, text) is expected


# A correct answer for each Python question of the shipped set: its test must pass it, and
# must fail an answer that defines a function returning None.
REFERENCES = {
    "add": "def add(a, b):\n    return a + b",
    "is_even": "def is_even(n):\n    return n % 2 == 0",
    "reverse_string": "def reverse_string(s):\n    return s[::-1]",
    "square": "def square(x):\n    return x * x",
    "maximum": "def maximum(numbers):\n    return max(numbers)",
    "factorial": "import math\ndef factorial(n):\n    return math.factorial(n)",
    "count_vowels": "def count_vowels(s):\n    return sum(c in 'aeiou' for c in s.lower())",
    "is_palindrome": "def is_palindrome(s):\n    return s == s[::-1]",
    "celsius_to_fahrenheit": "def celsius_to_fahrenheit(c):\n    return c * 9 / 5 + 32",
    "sum_list": "def sum_list(numbers):\n    return sum(numbers)",
    "fibonacci": "def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n"
                 "        a, b = b, a + b\n    return a",
    "remove_duplicates": "def remove_duplicates(items):\n    return list(dict.fromkeys(items))",
    "first_element": "def first_element(items):\n    return items[0]",
    "is_positive": "def is_positive(n):\n    return n > 0",
    "average": "def average(numbers):\n    return sum(numbers) / len(numbers)",
    "to_upper": "def to_upper(s):\n    return s.upper()",
    "multiplier": "def multiplier(a, b):\n    return a * b",
    "longueur": "def longueur(liste):\n    return len(liste)",
    "minimum": "def minimum(nombres):\n    return min(nombres)",
}


async def test_shipped_python_tests_pass_a_correct_answer_and_fail_a_wrong_one() -> None:
    coded = [q for q in load_answer_set(SHIPPED) if q.check.python is not None]
    assert {q.check.function for q in coded} == set(REFERENCES)
    for q in coded:
        assert q.check.function is not None
        reference = f"```python\n{REFERENCES[q.check.function]}\n```"
        assert await passes(q.check, reference), q.id
        wrong = f"```python\ndef {q.check.function}(*args):\n    return None\n```"
        assert not await passes(q.check, wrong), q.id


async def test_restating_a_shipped_question_or_saying_nothing_never_passes() -> None:
    for q in load_answer_set(SHIPPED):
        if q.check.python is None:
            assert not await passes(q.check, q.question), q.id
            assert not await passes(q.check, ""), q.id
