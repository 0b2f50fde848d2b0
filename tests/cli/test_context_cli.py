"""`orion-fsm context …` and `orion-fsm run --context` through the real entry point, on tiny
models and BM25 (no embedding model)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from orion_fsm.cli import main

WriteRegistry = Callable[[dict[str, Any]], Path]

DOCS = {
    "keepers.rst": "Keepers\n=======\n\nThe keeper climbs the tower at dusk and lights the "
                   "lamp.\n",
    "fuel.md": "# Fuel\n\nThe lamp burns paraffin; a full tank lasts eleven hours.\n",
}


@pytest.fixture
def cli(registry_doc: dict[str, Any], write_registry: WriteRegistry,
        tmp_path: Path) -> Callable[..., int]:
    registry = write_registry(registry_doc)

    def run(*argv: str) -> int:
        return main(["--registry", str(registry), "--cache-dir", str(tmp_path / "c"), *argv])

    return run


@pytest.fixture
def docs(tmp_path: Path) -> Path:
    folder = tmp_path / "docs"
    folder.mkdir()
    for name, text in DOCS.items():
        (folder / name).write_text(text, encoding="utf-8")
    return folder


def out_json(capsys: pytest.CaptureFixture[str]) -> Any:
    return json.loads(capsys.readouterr().out)


def test_add_search_stats_rm_and_summary(cli: Callable[..., int], docs: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    assert cli("context", "add", str(docs), "--store", "lh", "--lexical-only") == 0
    assert "2 documents added" in capsys.readouterr().out
    assert cli("context", "search", "how long does a tank of paraffin last", "--store", "lh",
               "--lexical-only", "--json") == 0
    hits = out_json(capsys)
    assert hits[0]["document"] == "docs/fuel.md" and "eleven hours" in hits[0]["text"]
    assert "BM25 #1" in hits[0]["why"]
    assert cli("context", "stats", "--store", "lh", "--lexical-only", "--json") == 0
    stats = out_json(capsys)
    assert (stats["documents"], stats["chunks"]) == (2, 2) and stats["embeddings"] == "off"
    assert cli("context", "summary", "--store", "lh", "--lexical-only") == 0
    assert "docs/keepers.rst" in capsys.readouterr().out
    assert cli("context", "rm", "docs/fuel.md", "--store", "lh", "--lexical-only") == 0
    assert cli("context", "rm", "docs/fuel.md", "--store", "lh", "--lexical-only") == 1
    capsys.readouterr()
    assert cli("context", "search", "paraffin", "--store", "lh", "--lexical-only",
               "--json") == 0
    assert out_json(capsys) == []


def test_eval_prints_recall_and_the_misses(cli: Callable[..., int], docs: Path, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    questions = tmp_path / "q.jsonl"
    questions.write_text(
        json.dumps({"query": "who lights the lamp", "answer": "the keeper"}) + "\n"
        + json.dumps({"query": "what colour is the door", "answer": "green door"}) + "\n",
        encoding="utf-8")
    assert cli("context", "add", str(docs), "--lexical-only") == 0
    capsys.readouterr()
    assert cli("context", "eval", str(questions), "--lexical-only", "--top-k", "1") == 0
    out = capsys.readouterr().out
    assert "recall@1 (fused): 0.500 (1/2)" in out
    assert "miss: 'what colour is the door'" in out


def test_an_unknown_store_is_a_one_line_error(cli: Callable[..., int],
                                              capsys: pytest.CaptureFixture[str]) -> None:
    assert cli("context", "search", "x", "--store", "nope", "--lexical-only") == 2
    err = capsys.readouterr().err
    assert "no context store named 'nope'" in err and "context add" in err


def test_run_with_context_prints_the_citations(cli: Callable[..., int], docs: Path,
                                               tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    assert cli("context", "add", str(docs), "--store", "lh", "--lexical-only") == 0
    capsys.readouterr()
    assert cli("run", "How long does the paraffin last?", "--context", "lh", "--agent", "long",
               "--router", "rules", "--max-tokens", "4", "--json",
               "--trace-file", str(tmp_path / "t.jsonl")) == 0
    result = out_json(capsys)
    assert [p["state"] for p in result["phases"]][2] == "retrieving"
    assert result["citations"][0]["document"] == "docs/fuel.md"


def test_run_context_top_k_bounds_the_citations(cli: Callable[..., int], docs: Path,
                                                tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    assert cli("context", "add", str(docs), "--store", "lh", "--lexical-only") == 0
    capsys.readouterr()
    assert cli("run", "How long does the paraffin last?", "--context", "lh", "--agent", "long",
               "--router", "rules", "--max-tokens", "4", "--json", "--context-top-k", "1",
               "--trace-file", str(tmp_path / "t.jsonl")) == 0
    result = out_json(capsys)
    assert [c["document"] for c in result["citations"]] == ["docs/fuel.md"]


def test_search_and_eval_rerank_with_gemma(cli: Callable[..., int], docs: Path, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    assert cli("context", "add", str(docs), "--store", "lh", "--lexical-only") == 0
    capsys.readouterr()
    assert cli("context", "search", "How long does the paraffin last?", "--store", "lh",
               "--lexical-only", "--rerank", "--json") == 0
    hits = out_json(capsys)
    assert hits and all(h["rerank_rank"] >= 1 and h["likelihood"] < 0 for h in hits)
    questions = tmp_path / "q.jsonl"
    questions.write_text('{"query": "How long does the paraffin last?", "answer": "eleven"}\n')
    assert cli("context", "eval", str(questions), "--store", "lh", "--lexical-only",
               "--rerank") == 0
    assert "recall@5 (fused+rerank): 1.000 (1/1)" in capsys.readouterr().out
