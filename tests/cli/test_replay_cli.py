"""`orion-fsm replay` through the real entry point: PASS, or the first divergence and exit 1."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest

from orion_fsm import Engine
from orion_fsm._resources import data_file
from orion_fsm.cli import main

SHIPPED = Path(__file__).parents[2] / "traces"


def test_recorded_requests_replay_and_pass(tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["--cache-dir", str(tmp_path), "replay", str(SHIPPED / "cache-hit.jsonl")])
    out = capsys.readouterr().out.splitlines()
    assert code == 0
    assert out[0].startswith("PASS ") and "validating → routing → loading_agent" in out[0]
    assert "validating → routing → success" in out[-3]  # the L1 hit
    assert out[-1] == "2 of 2 requests replayed identically"


def test_a_changed_statechart_fails_with_the_divergence(tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    chart = tmp_path / "request.scxml"
    text = data_file("machines", "request.scxml").read_text(encoding="utf-8")
    chart.write_text(re.sub(r'(event="retry[^"]*") target="loading_agent"', r'\1 target="error"',
                            text), encoding="utf-8")
    code = main(["--cache-dir", str(tmp_path), "replay", str(SHIPPED / "fallback.jsonl"),
                 "--machine", str(chart)])
    assert code == 1
    (line,) = capsys.readouterr().out.splitlines()
    assert line.endswith("at fallback: transition 5: recorded fallback --retry--> "
                         "loading_agent, replayed fallback --retry--> error")


def test_thresholds_and_json_output(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["--cache-dir", str(tmp_path), "replay", str(SHIPPED / "success.jsonl"),
                 "--threshold", "code=0.99", "--json"])
    assert code == 1
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is False and report["mode"] == "recorded"
    assert report["divergences"] == [{"state": "routing", "field": "orion.agent",
                                      "recorded": "code", "replayed": "conversation"}]


def test_a_malformed_threshold_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["replay", str(SHIPPED / "success.jsonl"), "--threshold", "code"])
    assert exit_.value.code == 2
    assert "expected AGENT=SCORE" in capsys.readouterr().err


def test_live_replay_regenerates_with_the_real_model(
    make_engine: Callable[..., Engine], registry_doc: dict[str, Any],
    write_registry: Callable[[dict[str, Any]], Path], tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    async def record() -> None:
        async with make_engine() as engine:
            await engine.infer("hello", temperature=0, max_tokens=6)

    anyio.run(record)
    registry = write_registry(registry_doc)
    code = main(["--registry", str(registry), "--cache-dir", str(tmp_path / "cache"), "replay",
                 str(tmp_path / "traces" / "test.jsonl"), "--live"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert out.startswith("PASS ") and out.count("\n") == 1
