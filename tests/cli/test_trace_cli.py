"""`orion-fsm trace show` through the real entry point: waterfalls to scale and the summary."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from orion_fsm.cli import main
from tests.conftest import read_trace_lines

SHIPPED = Path(__file__).parents[2] / "traces"


def lines_of(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def test_each_request_is_a_waterfall_of_its_phases_with_the_events_that_left_them(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["trace", "show", str(SHIPPED / "fallback.jsonl"), "--width", "40"]) == 0
    out = capsys.readouterr().out
    header, *rows = lines_of(out.split("\n\n")[0])
    assert "· success · conversation (fallback from code) ·" in header
    assert [row.split()[0] for row in rows] == [
        "validating", "routing", "loading_agent", "inferencing", "fallback", "loading_agent",
        "inferencing"]
    assert [row.split()[-1] for row in rows] == [
        "valid", "routed", "loaded", "inference_failed", "retry", "loaded", "completed"]
    bars = [row[row.index("|") + 1:row.rindex("|")] for row in rows]
    assert {len(bar) for bar in bars} == {40}  # every bar on one scale
    assert all(bar.strip() for bar in bars)  # even a phase shorter than a column shows


def test_bars_are_placed_and_sized_to_scale(tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    record = json.loads((SHIPPED / "success.jsonl").read_text(encoding="utf-8").splitlines()[0])
    record["phases"] = [{"state": "validating", "start_ms": 0.0, "ms": 25.0, "attributes": {}},
                        {"state": "routing", "start_ms": 25.0, "ms": 75.0, "attributes": {}}]
    record["result"]["total_ms"] = 100.0
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps(record) + "\n", encoding="utf-8")
    assert main(["trace", "show", str(path), "--width", "20"]) == 0
    rows = lines_of(capsys.readouterr().out)[1:3]
    assert rows[0].endswith("|█████               | valid")
    assert rows[1].endswith("|     ███████████████| routed")


def test_the_summary_counts_final_states_and_gives_phase_percentiles(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["trace", "show", str(SHIPPED / "invalid.jsonl"), "--summary"]) == 0
    out = lines_of(capsys.readouterr().out)
    assert out[0] == "4 requests: 4 error (4 invalid)"
    assert out[1].split() == ["phase", "count", "p50", "ms", "p99", "ms"]
    counts = {row.split()[0]: int(row.split()[1]) for row in out[2:]}
    assert counts == {"validating": 4, "routing": 1, "loading_agent": 1, "total": 4}


def test_one_request_is_chosen_by_the_start_of_its_id(capsys: pytest.CaptureFixture[str]) -> None:
    path = SHIPPED / "cache-hit.jsonl"
    second = json.loads(path.read_text(encoding="utf-8").splitlines()[1])["request_id"]
    assert main(["trace", "show", str(path), "--request", second[:6]]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"request {second} · success · conversation · L1 ·")
    assert "1 request: 1 success · 1 served from cache" in out


def test_an_unknown_request_is_a_one_line_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["trace", "show", str(SHIPPED / "success.jsonl"), "--request", "nope"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("orion-fsm: no request 'nope' in ") and err.count("\n") == 1


def test_run_traces_into_the_state_folder_and_the_readers_find_it_there(
    registry_doc: dict[str, Any], write_registry: Callable[[dict[str, Any]], Path],
    tmp_path: Path, state_dir: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    registry = write_registry(registry_doc)
    workdir = tmp_path / "work"
    workdir.mkdir()
    monkeypatch.chdir(workdir)
    code = main(["--registry", str(registry), "--cache-dir", str(tmp_path / "c"), "run", "hello",
                 "--router", "rules", "--max-tokens", "4", "--json"])
    assert code == 0
    request_id = json.loads(capsys.readouterr().out)["trace_id"]
    assert list(workdir.iterdir()) == []  # nothing written where the command ran
    (record,) = read_trace_lines(state_dir / "orion-fsm" / "traces" / "orion-fsm.jsonl")
    assert record["trace_id"] == request_id
    assert main(["trace", "show", "--summary"]) == 0  # no FILE: the default one
    assert capsys.readouterr().out.startswith("1 request: 1 success")
    assert main(["--registry", str(registry), "--cache-dir", str(tmp_path / "c"), "replay",
                 "--request", request_id[:8]]) == 0
    assert capsys.readouterr().out.startswith("PASS ")
    assert list(workdir.iterdir()) == []
