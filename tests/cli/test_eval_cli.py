"""`orion-fsm eval FILE` and `orion-fsm models compare A B --eval FILE` through the real entry
point, on tiny models with checks whose verdict is known in advance (any text / no text)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from orion_fsm.cli import main
from tests.conftest import agent, read_trace_lines

WriteRegistry = Callable[[dict[str, Any]], Path]


def answer_set(path: Path, rows: list[tuple[str, str, str]]) -> Path:
    """(id, category, regex) rows, all labelled for the conversation agent."""
    path.write_text("".join(json.dumps({
        "id": qid, "question": f"Question {qid}?", "category": category,
        "agent": "conversation", "check": {"regex": regex}}) + "\n"
        for qid, category, regex in rows), encoding="utf-8")
    return path


@pytest.fixture
def answers(tmp_path: Path) -> Path:
    return answer_set(tmp_path / "answers.jsonl",
                      [("q1", "easy", ""), ("q2", "easy", ""), ("q3", "hard", "(?!)")])


@pytest.fixture
def cli(registry_doc: dict[str, Any], write_registry: WriteRegistry,
        tmp_path: Path) -> Callable[..., int]:
    registry = write_registry(registry_doc)

    def run(*argv: str) -> int:
        return main(["--registry", str(registry), "--cache-dir", str(tmp_path / "c"), *argv,
                     "--trace-file", str(tmp_path / "trace.jsonl")])

    return run


def test_eval_prints_accuracy_per_agent_temperature_and_category(
        cli: Callable[..., int], answers: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    assert cli("eval", str(answers), "--temperatures", "0,0.5", "--samples", "2") == 0
    out = capsys.readouterr().out
    assert "3 questions, 9 answers" in out
    assert "conversation @ temperature 0: " in out and "2/3" in out
    assert "conversation @ temperature 0.5: " in out and "4/6" in out
    assert "    hard" in out
    assert len(read_trace_lines(tmp_path / "trace.jsonl")) == 9


def test_eval_scores_a_virtual_agent_at_its_members_defaults(
        registry_doc: dict[str, Any], write_registry: WriteRegistry, answers: Path,
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    registry = write_registry({**registry_doc, "virtual_agents": [{
        "id": "duo", "description": "two members",
        "members": [{"agent": "conversation", "role": "solution", "weight": 0.6},
                    {"agent": "code", "role": "explanation", "weight": 0.4}],
        "early_stop": {"policy": "none"}}]})
    assert main(["--registry", str(registry), "--cache-dir", str(tmp_path / "c"), "eval",
                 str(answers), "--agents", "duo,conversation",
                 "--trace-file", str(tmp_path / "trace.jsonl")]) == 0
    out = capsys.readouterr().out
    assert "duo @ its members' default temperatures: " in out
    assert "conversation @ temperature 0: " in out


def test_eval_json_holds_every_score_and_answer(cli: Callable[..., int], answers: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    assert cli("eval", str(answers), "--agents", "code,conversation", "--categories", "easy",
               "--json") == 0
    report = json.loads(capsys.readouterr().out)
    assert [(s["agent"], s["overall"]["correct"], s["overall"]["total"])
            for s in report["scores"]] == [("code", 2, 2), ("conversation", 2, 2)]
    assert len(report["answers"]) == 4 and report["file"].endswith("answers.jsonl")


@pytest.mark.parametrize(("argv", "message"), [
    (["--agents", "nobody"], "unknown agent(s) nobody; the registry has conversation"),
    (["--temperatures", "0,hot"], "--temperatures expects numbers separated by commas"),
    (["--categories", "poetry"], "no question of category poetry"),
    (["--samples", "0"], "samples must be at least 1"),
])
def test_eval_errors_are_one_line(cli: Callable[..., int], answers: Path, argv: list[str],
                                  message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli("eval", str(answers), *argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_eval_of_a_missing_or_malformed_file_is_one_line(
        cli: Callable[..., int], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli("eval", str(tmp_path / "nope.jsonl")) == 2
    assert "cannot read the answer set" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "x", "question": "?"}\n', encoding="utf-8")
    assert cli("eval", str(bad)) == 2
    err = capsys.readouterr().err
    assert "bad.jsonl:1: missing category, agent, check" in err and err.count("\n") == 1


def test_compare_of_two_agents_of_one_registry(cli: Callable[..., int], answers: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    assert cli("models", "compare", "conversation", "code", "--eval", str(answers)) == 0
    out = capsys.readouterr().out
    assert "A conversation" in out and "B code" in out
    assert "B - A: +0.0 points" in out
    assert out.rstrip().endswith("verdict: no significant difference")


def test_compare_with_b_from_another_registry_says_b_is_worse(
        cli: Callable[..., int], tmp_path: Path, tiny_models: dict[str, Path],
        capsys: pytest.CaptureFixture[str]) -> None:
    # B's model file is missing: every answer fails, A answers all 20 (any text passes).
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"version": 1, "default_agent": "conversation", "agents": [
        agent("conversation", tmp_path / "missing.gguf")]}), encoding="utf-8")
    answers = answer_set(tmp_path / "twenty.jsonl", [(f"q{i}", "easy", "") for i in range(20)])
    assert cli("models", "compare", "conversation", "conversation", "--eval", str(answers),
               "--b-registry", str(other), "--json") == 0
    result = json.loads(capsys.readouterr().out)
    assert result["a"]["overall"]["correct"] == 20
    assert (result["b"]["overall"]["correct"], result["b"]["overall"]["failed"]) == (0, 20)
    assert result["difference"] == -1.0 and result["ci95"][1] < 0
    assert result["verdict"] == "worse"


@pytest.mark.parametrize(("argv", "message"), [
    (["conversation", "conversation"], "A and B are the same agent 'conversation'"),
    (["conversation", "nobody"], "unknown agent 'nobody'"),
])
def test_compare_errors_are_one_line(cli: Callable[..., int], answers: Path, argv: list[str],
                                     message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli("models", "compare", *argv, "--eval", str(answers)) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
