"""`orion-fsm mem`: one snapshot or a live view of memory and each registry model's cost."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from orion_fsm.cli import _mem
from orion_fsm.services.models._tiers import estimate_model_memory
from orion_fsm.testing import make_tiny_llama_gguf
from tests.conftest import agent


def mem(argv: list[str]) -> int:
    # The global options as `orion-fsm` defines them; the command is registered by the CLI.
    parser = argparse.ArgumentParser(prog="orion-fsm")
    parser.add_argument("--registry")
    parser.add_argument("--cache-dir")
    sub = parser.add_subparsers(dest="command", required=True)
    _mem.add_parser(sub)
    args = parser.parse_args(argv)
    code: int = args.handler(args)
    return code


@pytest.fixture
def registry_file(tmp_path: Path) -> Path:
    small = make_tiny_llama_gguf(tmp_path / "small" / "tiny-small.gguf", n_layers=2, n_embd=32)
    big = make_tiny_llama_gguf(tmp_path / "big" / "tiny-big.gguf", n_layers=4, n_embd=128)
    doc = {"version": 1, "default_agent": "chat", "agents": [
        agent("chat", small, context_length=128), agent("echo", small, context_length=128),
        agent("big", big, context_length=512, fallback="chat"),
        agent("gone", tmp_path / "missing.gguf"),
    ]}
    path = tmp_path / "models.json"
    path.write_text(json.dumps(doc), encoding="utf-8")
    return path


def base(registry_file: Path) -> list[str]:
    return ["--registry", str(registry_file), "--cache-dir", str(registry_file.parent / "cache")]


def test_once_json_shows_the_machine_and_each_models_estimate(
    registry_file: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    assert mem([*base(registry_file), "mem", "--once", "--json", "--budget-mb", "100"]) == 0
    view = json.loads(capsys.readouterr().out)
    assert view["level"] in ("low", "medium", "high", "critical")
    assert view["process_rss_mb"] > 0 and view["system_total_mb"] >= view["system_available_mb"]
    assert view["budget_mb"] == 100
    rows = {",".join(r["agents"]): r for r in view["registry_models"]}
    assert set(rows) == {"chat,echo", "big", "gone"}  # agents sharing a model share a row
    big = estimate_model_memory(registry_file.parent / "big" / "tiny-big.gguf", 512,
                                overhead_bytes=16 << 20)
    assert rows["big"]["estimate_mb"] == round(big.total_mb, 1)
    assert rows["big"]["status"] == "ready" and rows["big"]["fits_budget"]
    assert rows["gone"]["status"] == "missing" and "not found" in rows["gone"]["error"]


def test_once_prints_a_table_with_a_bar_per_model(
    registry_file: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    assert mem([*base(registry_file), "mem", "--once"]) == 0
    out = capsys.readouterr().out
    assert "pressure" in out and "budget" in out
    line = next(x for x in out.splitlines() if x.startswith("big "))
    assert "ready" in line and ("█" in line or "░" in line)


def test_load_measures_the_real_rss_cost_of_a_model(
    registry_file: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    assert mem([*base(registry_file), "mem", "--once", "--json", "--load", "big"]) == 0
    load = json.loads(capsys.readouterr().out)["load"]
    assert load["agent"] == "big" and load["rss_loaded_mb"] > load["rss_before_mb"]
    assert load["returned_mb"] > 0


def test_the_live_view_refreshes_until_its_count(
    registry_file: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    assert mem([*base(registry_file), "mem", "--json", "--interval", "0.01", "--count", "3"]) == 0
    frames = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(frames) == 3 and frames[0]["at"] <= frames[-1]["at"]
