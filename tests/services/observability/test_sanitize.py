"""The sanitiser's fast path: case-insensitive rules run on the lower-cased text must find
exactly what they find on the text itself, on the secrets corpus and on arbitrary text."""

from __future__ import annotations

import json
import re
from pathlib import Path

import hypothesis.strategies as st
import pytest
from hypothesis import given, settings

from orion_fsm.services.observability import _sanitize
from orion_fsm.services.observability._sanitize import sanitize_text

CORPUS = json.loads((Path(__file__).parents[2] / "data" / "secrets_corpus.json")
                    .read_text(encoding="utf-8"))
LOWERED = [rule for rule in _sanitize._RULES if rule.lowered is not None]
TEXTS = [c["text"] for c in CORPUS["positive"]] + list(CORPUS["negative"])


def _spans_agree(text: str) -> None:
    lower = text.lower()
    if len(lower) != len(text):
        return  # the fast path is not taken on such text
    for rule in LOWERED:
        assert rule.lowered is not None
        exact = [(m.span(), m.span("v") if "v" in m.groupdict() else None)
                 for m in rule.pattern.finditer(text)]
        fast = [(m.span(), m.span("v") if "v" in m.groupdict() else None)
                for m in rule.lowered.finditer(lower)]
        assert fast == exact, (rule.kind, text)


def test_every_case_insensitive_rule_but_private_keys_takes_the_fast_path() -> None:
    kinds = {rule.kind for rule in LOWERED}
    assert {"authorization", "bearer", "assignment", "spoken_secret", "url_password"} <= kinds
    assert "private_key" not in kinds  # upper-case literals: stays case-insensitive


@pytest.mark.parametrize("text", [*TEXTS, *(t.upper() for t in TEXTS),
                                  *(t.swapcase() for t in TEXTS)])
def test_the_fast_path_finds_the_same_spans_on_the_corpus(text: str) -> None:
    _spans_agree(text)


_WORDS = st.sampled_from(["password", "PASSWORD", "Mot de Passe", " is ", " = ", ": ",
                          "Authorization", "Bearer ", "token", "sk-", "[REDACTED:card]",
                          "https://u:", "@host", "Hunter2024!", "required", "ß", "İ", "x"])


@settings(max_examples=300, deadline=None)
@given(st.lists(_WORDS | st.text(max_size=5), max_size=16))
def test_the_fast_path_finds_the_same_spans_on_arbitrary_text(parts: list[str]) -> None:
    _spans_agree("".join(parts))


def test_a_redaction_marker_is_never_redacted_again() -> None:
    assert sanitize_text("mot de passe : Soleil2024") == "mot de passe : [REDACTED:assignment]"
    assert sanitize_text("MY PASSWORD IS [REDACTED:card]") == "MY PASSWORD IS [REDACTED:card]"


# The number and e-mail rules as first written; the rules now lead with their first
# character and search around "@" only (speed), and must find exactly the same spans.
_START, _END = r"(?<!\w)(?<!\d\.)", r"(?!\w|\.\d)"
REFERENCE = {
    "card": _START + r"\d(?:[ .-]?\d){12,18}" + _END,
    "phone": r"(?<![\w+])\+[1-9]\d{0,2}(?:[ .-]?\(?\d{1,4}\)?){2,6}(?!\w|\.\d)"
             r"|" + _START + r"0[1-9](?:[ .-]?\d{2}){4}" + _END +
             r"|" + _START + r"(?:\(\d{3}\) ?|\d{3}[-.])\d{3}[-.]\d{4}" + _END,
    "email": r"\b[A-Za-z0-9._%+-]{1,64}@(?:[A-Za-z0-9-]{1,63}\.){1,8}[A-Za-z]{2,24}\b",
}
RULES = {rule.kind: rule for rule in _sanitize._RULES}


def _same_as_reference(text: str) -> None:
    for kind, reference in REFERENCE.items():
        rule = RULES[kind]
        found = [m.span() for m in _sanitize._matches(rule, rule.pattern, text)]
        assert found == [m.span() for m in re.finditer(reference, text)], (kind, text)


@pytest.mark.parametrize("text", TEXTS)
def test_the_fast_number_and_email_rules_match_the_reference_on_the_corpus(text: str) -> None:
    _same_as_reference(text)


_NUMBERS = st.sampled_from(["4111", " ", ".", "-", "(", ")", "+", "0", "1", "33", "6", "a",
                            "@", "b.", "example.com", "x" * 70, "_", "é", "\n"])


@settings(max_examples=500, deadline=None)
@given(st.lists(_NUMBERS, max_size=40))
def test_the_fast_number_and_email_rules_match_the_reference_on_arbitrary_text(
        parts: list[str]) -> None:
    _same_as_reference("".join(parts))


@pytest.mark.parametrize("text", ["a@b.io " * 300, ("a." * 40 + "@") * 50,
                                  "x" * 700 + "@" + "y" * 700 + ".com",
                                  "@" + "a" * 2000 + "@b.cd", "a@" + "b." * 600 + "fr"])
def test_email_windows_merge_and_reach_like_a_whole_text_search(text: str) -> None:
    _same_as_reference(text)
