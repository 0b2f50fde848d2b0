"""`orion-fsm replay` through the real entry point: PASS, or the first divergence and exit 1."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest

from orion_fsm import Engine, RequestFailed
from orion_fsm._resources import data_file
from orion_fsm.cli import main
from orion_fsm.testing.faults import faulty_loader

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


@pytest.mark.parametrize("name", ["success", "cache-hit", "fallback", "invalid", "aborts"])
def test_every_shipped_trace_steps_phase_by_phase(name: str, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["--cache-dir", str(tmp_path), "replay", str(SHIPPED / f"{name}.jsonl"),
                 "--step"])
    out = capsys.readouterr().out
    assert code == 0, out
    requests = re.split(r"^request ", out, flags=re.MULTILINE)[1:]
    assert requests and all("[1] " in r and "\nPASS " in r for r in requests)
    assert all("replayed: same decisions" in r for r in requests)
    assert "replayed: left by" not in out and "not reached" not in out


def test_stepping_shows_what_routing_and_loading_decided_until_a_state(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["--cache-dir", str(tmp_path), "replay", str(SHIPPED / "fallback.jsonl"),
                 "--step", "--until", "loading_agent"])
    out = capsys.readouterr().out
    assert code == 0
    steps = re.findall(r"^\[(\d)\] (\w+)", out, flags=re.MULTILINE)
    assert steps == [("1", "validating"), ("2", "routing"), ("3", "loading_agent")]
    assert "decided:  agent code by rules" in out and "fallback chain code -> conversation" in out
    assert "received: agent code, attempt 0, breaker closed" in out
    scores = main(["--cache-dir", str(tmp_path), "replay", str(SHIPPED / "success.jsonl"),
                   "--step", "--until", "routing"])
    assert scores == 0
    assert re.search(r"decided:  scores code 0\.\d+, logic", capsys.readouterr().out)


def test_stepping_a_timed_out_request_shows_where_the_timeout_arrived(
    make_engine: Callable[..., Engine], registry_doc: dict[str, Any],
    write_registry: Callable[[dict[str, Any]], Path], tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    async def record() -> None:
        async with make_engine(load_model=faulty_loader(1.0, ("hang",), after_tokens=1),
                               timeout_s=0.5) as engine:
            with pytest.raises(RequestFailed, match="timeout"):
                await engine.infer("hello", max_tokens=6)

    anyio.run(record)
    code = main(["--registry", str(write_registry(registry_doc)), "--cache-dir",
                 str(tmp_path / "cache"), "replay", str(tmp_path / "traces" / "test.jsonl"),
                 "--step"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "[4] inferencing" in out and "--abort--> error" in out
    assert ("aborted here: timeout while awaiting generate, after 1 generated token(s), "
            "timeout 0.5 s") in out
    assert out.splitlines()[-1].startswith("PASS ")


def test_until_without_step_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["replay", str(SHIPPED / "success.jsonl"), "--until", "routing"]) == 2
    assert "--until needs --step" in capsys.readouterr().err
