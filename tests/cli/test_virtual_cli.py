"""`orion-fsm run --agent <virtual>` and `trace show`: a virtual agent's regions drawn side
by side in time, under the parallel state's bar."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from orion_fsm.cli import main

WriteRegistry = Callable[[dict[str, Any]], Path]


def _lanes(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.lstrip().startswith(("├", "└"))]


def _duo(registry_doc: dict[str, Any], write_registry: WriteRegistry,
         early_stop: dict[str, Any]) -> Path:
    """A registry with `duo`: conversation writes the solution, code the explanation."""
    return write_registry({**registry_doc, "virtual_agents": [{
        "id": "duo", "description": "two members",
        "members": [{"agent": "conversation", "role": "solution", "weight": 0.7},
                    {"agent": "code", "role": "explanation", "weight": 0.3}],
        "early_stop": early_stop}]})


def test_run_and_trace_show_draw_each_region_as_a_lane(
    registry_doc: dict[str, Any], write_registry: WriteRegistry, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    registry = _duo(registry_doc, write_registry, {"policy": "none"})
    trace = tmp_path / "t.jsonl"
    assert main(["--registry", str(registry), "--cache-dir", str(tmp_path / "c"), "run",
                 "hello", "--agent", "duo", "--router", "rules", "--max-tokens", "4",
                 "--trace-file", str(trace)]) == 0
    run = capsys.readouterr().out
    solution, explanation = _lanes(run)
    assert "solution" in solution and "done · conversation · 4 tokens · weight 0.70" in solution
    assert "explanation" in explanation and "done · code" in explanation
    # Each lane on the timeline's scale, its bar under the parallel state's.
    parallel = next(line for line in run.splitlines() if "serving_virtual" in line)
    assert solution.index("|") == parallel.index("|") == explanation.index("|")
    assert {"░", "█"} <= set(solution[solution.index("|"):])

    assert main(["trace", "show", str(trace), "--width", "30"]) == 0
    shown = capsys.readouterr().out
    rows = shown.split("\n\n")[0].splitlines()
    assert [r.split()[0] for r in rows[1:]] == ["validating", "routing", "serving_virtual",
                                                "├", "└", "fusing"]
    assert rows[4].index("|") == rows[5].index("|") == rows[3].index("|")
    assert rows[3].split()[-1] == "members_done" and rows[-1].split()[-1] == "fused"


def test_a_follower_waiting_for_its_leader_is_drawn_waiting(
    registry_doc: dict[str, Any], write_registry: WriteRegistry, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # leader_first, and no answer is sure enough: the explanation starts once the solution
    # has finished.
    registry = _duo(registry_doc, write_registry, {"policy": "leader_first", "threshold": 1.0})
    trace = tmp_path / "t.jsonl"
    assert main(["--registry", str(registry), "--cache-dir", str(tmp_path / "c"), "run",
                 "hello", "--agent", "duo", "--router", "rules", "--max-tokens", "8",
                 "--trace-file", str(trace)]) == 0
    solution, explanation = _lanes(capsys.readouterr().out)
    assert "·" not in solution.split("|")[1]
    bar = explanation.split("|")[1]
    # Waited (its first cell may show the loading state it waits in), then generated.
    assert "·" in bar and "█" in bar
    assert bar.rindex("·") < bar.index("█")
    assert main(["trace", "show", str(trace), "--width", "30"]) == 0
    shown = _lanes(capsys.readouterr().out)
    assert "·" in shown[1].split("|")[1]


def test_the_early_stop_verdict_is_drawn_where_it_was_taken(
    registry_doc: dict[str, Any], write_registry: WriteRegistry, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # leader_first, the leader cut at 6 tokens before the follower started: the verdict
    # ends the request, drawn on the leader's lane and explained below it.
    registry = _duo(registry_doc, write_registry,
                    {"policy": "leader_first", "threshold": 0.0, "code_within": 32})
    trace = tmp_path / "t.jsonl"
    assert main(["--registry", str(registry), "--cache-dir", str(tmp_path / "c"), "run",
                 "hello", "--agent", "duo", "--router", "rules", "--max-tokens", "6",
                 "--trace-file", str(trace)]) == 0
    run = capsys.readouterr().out
    verdict = [line.strip() for line in run.splitlines() if "◆ early stop" in line]
    assert len(verdict) == 1 and verdict[0].startswith("◆ early stop at ")
    assert verdict[0].endswith("6 tokens: taken: confidence "
                               + verdict[0].split("taken: confidence ")[1])
    assert "cut at 6 tokens before any follower started" in verdict[0]
    assert main(["trace", "show", str(trace), "--width", "30"]) == 0
    shown = capsys.readouterr().out
    assert [line.strip() for line in shown.splitlines() if "◆ early stop" in line] == verdict
