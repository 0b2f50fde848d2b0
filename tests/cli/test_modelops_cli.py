"""`orion-fsm models quantize|merge|shard`: results, registration, and one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from orion_fsm import Registry
from orion_fsm.cli import main
from orion_fsm.modelops import read_manifest
from orion_fsm.testing import make_tiny_llama_gguf
from tests.conftest import agent


@pytest.fixture
def models(tmp_path: Path) -> dict[str, Path]:
    found = {name: make_tiny_llama_gguf(tmp_path / name / f"{name}.gguf", n_embd=32, seed=seed)
             for name, seed in (("a", 1), ("b", 2))}
    found["other"] = make_tiny_llama_gguf(tmp_path / "other" / "other.gguf", n_embd=64)
    registry = tmp_path / "models.json"
    registry.write_text(json.dumps({"version": 1, "default_agent": "chat", "agents": [
        agent("chat", found["a"])]}))
    found["registry"] = registry
    return found


def run(capsys: pytest.CaptureFixture[str], tmp_path: Path, *argv: str) -> tuple[int, str, str]:
    code = main(["--cache-dir", str(tmp_path / "cache"), *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_quantize_an_agent_and_register_the_result(models: dict[str, Path], tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    registry = str(models["registry"])
    code, out, err = run(capsys, tmp_path, "--registry", registry, "models", "quantize", "chat",
                         "--type", "q8_0", "--register", "chat", "q8_0")
    assert code == 0, err
    made = tmp_path / "cache" / "models" / "a.q8_0.gguf"
    assert made.is_file() and str(made) in out and "quantize q8_0 of a.gguf" in out
    variants = Registry.load(registry).get("chat").quantization
    # The agent's own model stays one of its variants, as "default".
    assert [(v.name, v.bits, v.source.path) for v in variants] == [
        ("default", 32, models["a"]), ("q8_0", 8, made)]


def test_merge_from_options_and_from_a_recipe(models: dict[str, Path], tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    out_path = tmp_path / "merged.gguf"
    code, out, err = run(capsys, tmp_path, "models", "merge", "--method", "slerp", "--models",
                         str(models["a"]), str(models["b"]), "--t", "0.25",
                         "--output", str(out_path))
    assert code == 0 and out_path.is_file() and "merge slerp of a.gguf, b.gguf" in out, err
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("models:\n  - model: a/a.gguf\n  - model: b/b.gguf\n"
                      "merge_method: ties\nbase_model: a/a.gguf\nparameters:\n  density: 0.5\n")
    code, out, err = run(capsys, tmp_path, "models", "merge", "--recipe", str(recipe),
                         "--output", str(tmp_path / "ties.gguf"))
    assert code == 0 and (tmp_path / "ties.gguf").is_file(), err


def test_shard_writes_a_manifest(models: dict[str, Path], tmp_path: Path,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, tmp_path, "models", "shard", str(models["a"]), "--shards", "4",
                         "--output", str(tmp_path / "parts"))
    assert code == 0, err
    assert len(read_manifest(tmp_path / "parts" / "manifest.json").shards) == 4
    assert "4 parts" in out


@pytest.mark.parametrize(("argv", "message"), [
    (["models", "quantize", "{a}", "--type", "q2_k", "--output", "{tmp}/x.gguf"],
     "unknown quantization type 'q2_k'"),
    (["models", "quantize", "{tmp}/missing.gguf", "--type", "q8_0"], "does not exist"),
    (["--registry", "{registry}", "models", "quantize", "nobody", "--type", "q8_0"],
     "'nobody' is neither a model file nor an agent id"),
    (["models", "merge", "--method", "linear", "--models", "{a}", "{other}",
      "--output", "{tmp}/x.gguf"], "cannot merge a.gguf with other.gguf"),
    (["models", "merge", "--method", "linear", "--models", "{a}", "{b}", "--weights", "1",
      "--output", "{tmp}/x.gguf"], "--weights gives 1 values for 2 models"),
    (["models", "merge", "--method", "linear", "--models", "{a}", "{b}", "--output", "{a}"],
     "is one of the inputs"),
    (["models", "shard", "{a}", "--shards", "40", "--output", "{tmp}/parts"],
     "--shards must be between 1 and 16"),
    (["models", "quantize", "{corrupt}", "--type", "q8_0", "--output", "{tmp}/x.gguf"],
     "is truncated"),
])
def test_bad_input_is_one_line_and_writes_nothing(
        models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str],
        argv: list[str], message: str) -> None:
    corrupt = tmp_path / "corrupt.gguf"
    corrupt.write_bytes(models["a"].read_bytes()[:-1000])
    names = {"a": models["a"], "b": models["b"], "other": models["other"], "tmp": tmp_path,
             "registry": models["registry"], "corrupt": corrupt}
    before = sorted(p.name for p in tmp_path.iterdir())
    code = main([a.format(**names) for a in argv])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == before
