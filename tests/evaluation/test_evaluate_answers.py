"""The evaluator through a real Engine on tiny GGUF models: what it asks of which agent, at which
temperatures and seeds, how it scores (checks whose verdict is known in advance: one accepts any
text, one none), failures counted as wrong answers, and a trace record per answer."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from orion_fsm import (
    AnswerCheck,
    AnswerQuestion,
    Engine,
    EvaluationError,
    evaluate_answers,
)
from tests.conftest import agent, assert_no_thread_leaked, read_trace_lines

pytestmark = pytest.mark.anyio

ANY = AnswerCheck(regex="")  # every text passes
NONE = AnswerCheck(regex="(?!)")  # no text passes


def question(qid: str, category: str, check: AnswerCheck, agent_id: str = "conversation"
             ) -> AnswerQuestion:
    return AnswerQuestion(qid, f"Question {qid}?", category, agent_id, check)


QUESTIONS = [question("a1", "easy", ANY), question("a2", "easy", ANY),
             question("a3", "hard", NONE), question("c1", "code", ANY, "code")]


async def test_each_question_goes_to_its_labelled_agent_and_is_scored_per_category(
        make_engine: Callable[..., Engine], tmp_path: Path) -> None:
    before = set(threading.enumerate())
    seen: list[tuple[int, int]] = []
    async with make_engine() as engine:
        report = await evaluate_answers(engine, QUESTIONS,
                                        progress=lambda d, t: seen.append((d, t)))
    conversation = report.score("conversation")
    assert conversation.temperature == 0.0  # the agent's registry default
    assert (conversation.overall.correct, conversation.overall.total) == (2, 3)
    assert {c: (t.correct, t.total) for c, t in conversation.categories.items()} == {
        "easy": (2, 2), "hard": (0, 1)}
    code = report.score("code")
    assert (code.overall.correct, code.overall.total) == (1, 1)
    assert [a.question_id for a in report.answers] == ["a1", "a2", "a3", "c1"]
    assert all(a.served_by == a.agent and a.error is None for a in report.answers)
    assert seen[0] == (0, 4) and seen[-1] == (4, 4) and len(seen) == 5
    # Every answer is a request of its own, with its trace record.
    records = read_trace_lines(tmp_path / "traces" / "test.jsonl")
    assert sorted(r["request_id"] for r in records) == sorted(a.request_id
                                                             for a in report.answers)
    low, high = conversation.overall.interval
    assert low < 2 / 3 < high
    await assert_no_thread_leaked(before)


async def test_agents_answer_every_question_at_every_temperature_with_distinct_seeds(
        make_engine: Callable[..., Engine]) -> None:
    async with make_engine() as engine:
        report = await evaluate_answers(engine, QUESTIONS[:3], agents=["code", "conversation"],
                                        temperatures=[0, 0.7, None], samples=3, seed=10,
                                        concurrency=2)
    assert [(s.agent, s.temperature) for s in report.scores] == [
        ("code", 0.0), ("code", 0.7), ("conversation", 0.0), ("conversation", 0.7)]
    # Greedy: one sample per question; sampled: `samples`, seeds 10, 11, 12 for everyone.
    assert report.score("code", 0).overall.total == 3
    sampled = report.score("conversation", 0.7)
    assert (sampled.overall.correct, sampled.overall.total) == (6, 9)
    seeds = {(a.agent, a.temperature, a.question_id): set() for a in report.answers}
    for a in report.answers:
        seeds[(a.agent, a.temperature, a.question_id)].add(a.seed)
    assert set(map(frozenset, seeds.values())) == {frozenset({10}), frozenset({10, 11, 12})}
    assert report.as_dict()["scores"][1]["categories"]["easy"]["total"] == 6


async def test_a_request_that_fails_is_a_wrong_answer_counted_as_failed(
        make_engine: Callable[..., Engine], tiny_models: dict[str, Path],
        tmp_path: Path) -> None:
    doc: dict[str, Any] = {"version": 1, "default_agent": "ok", "agents": [
        agent("ok", tiny_models["small"]), agent("broken", tmp_path / "missing.gguf")]}
    async with make_engine(doc) as engine:
        report = await evaluate_answers(engine, QUESTIONS[:2], agents=["broken", "ok"])
    broken = report.score("broken")
    assert (broken.overall.correct, broken.overall.total, broken.overall.failed) == (0, 2, 2)
    assert all(a.error is not None and not a.passed for a in report.answers
               if a.agent == "broken")
    assert report.score("ok").overall.correct == 2


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"agents": ["nobody"]}, "unknown agent\\(s\\) nobody"),
    ({"temperatures": [-1]}, "temperatures must be >= 0"),
    ({"temperatures": []}, "no temperature"),
    ({"samples": 0}, "samples must be at least 1"),
    ({"concurrency": 0}, "concurrency must be at least 1"),
    ({"max_tokens": 0}, "question a1 to agent conversation"),  # refused as invalid
])
async def test_bad_arguments_are_one_line_errors(make_engine: Callable[..., Engine],
                                                 kwargs: dict[str, Any], message: str) -> None:
    async with make_engine() as engine:
        with pytest.raises(EvaluationError, match=message) as caught:
            await evaluate_answers(engine, QUESTIONS[:1], **kwargs)
    assert "\n" not in str(caught.value)


async def test_a_question_labelled_with_an_unknown_agent_is_refused(
        make_engine: Callable[..., Engine]) -> None:
    async with make_engine() as engine:
        with pytest.raises(EvaluationError, match="unknown agent\\(s\\) logic"):
            await evaluate_answers(engine, [question("x", "c", ANY, "logic")])


async def test_a_virtual_agent_is_scored_like_its_members_on_the_same_questions(
        make_engine: Callable[..., Engine], registry_doc: dict[str, Any],
        tmp_path: Path) -> None:
    doc = {**registry_doc, "virtual_agents": [{
        "id": "duo", "description": "two members",
        "members": [{"agent": "conversation", "role": "solution", "weight": 0.6},
                    {"agent": "code", "role": "explanation", "weight": 0.4}],
        "early_stop": {"policy": "none"}}]}
    async with make_engine(doc) as engine:
        report = await evaluate_answers(engine, QUESTIONS[:3],
                                        agents=["duo", "conversation", "code"],
                                        temperatures=[None, 0])
    # Its default is each member's own temperature: no single number stands for it.
    assert [(s.agent, s.temperature) for s in report.scores] == [
        ("duo", None), ("duo", 0.0), ("conversation", 0.0), ("code", 0.0)]
    duo = report.score("duo", 0)
    assert (duo.overall.correct, duo.overall.total) == (2, 3)
    assert report.scores[0].setting == "its members' default temperatures"
    fused = [a for a in report.answers if a.agent == "duo"]
    assert all(a.served_by == "duo" and a.error is None for a in fused)
    # The fused answer holds both members' greedy answers, the solution's first.
    by_agent = {(a.agent, a.question_id): a.text for a in report.answers if a.temperature == 0}
    assert by_agent[("duo", "a1")] == "\n\n".join(
        t.strip() for t in (by_agent[("conversation", "a1")], by_agent[("code", "a1")]))
    records = read_trace_lines(tmp_path / "traces" / "test.jsonl")
    assert len(records) == len(report.answers)
