"""`orion-fsm run` and `orion-fsm models` through the real entry point, on tiny models."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

import pytest

from orion_fsm._resources import data_file
from orion_fsm.cli import main
from tests.conftest import read_trace_lines

WriteRegistry = Callable[[dict[str, Any]], Path]


def test_run_json_prints_one_object_with_the_documented_keys(
    registry_doc: dict[str, Any], write_registry: WriteRegistry, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    registry = write_registry(registry_doc)
    trace = tmp_path / "t.jsonl"
    code = main(["--registry", str(registry), "--cache-dir", str(tmp_path / "c"), "run", "hello",
                 "--router", "rules", "--max-tokens", "4", "--json", "--trace-file", str(trace)])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert {"text", "state", "agent", "fallback", "phases", "tokens", "ttft_ms",
            "trace_id"} <= set(out)
    assert out["state"] == "success" and out["agent"] == "conversation"
    assert [p["state"] for p in out["phases"]] == ["validating", "routing", "loading_agent",
                                                   "inferencing"]
    assert all(set(p) >= {"state", "ms"} for p in out["phases"])
    assert set(out["tokens"]) == {"input", "output"}
    assert read_trace_lines(trace)[0]["trace_id"] == out["trace_id"]


def test_run_streams_text_then_the_timeline(
    registry_doc: dict[str, Any], write_registry: WriteRegistry, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    registry = write_registry(registry_doc)
    code = main(["--registry", str(registry), "--cache-dir", str(tmp_path / "c"), "run", "hello",
                 "--router", "rules", "--max-tokens", "4",
                 "--trace-file", str(tmp_path / "t.jsonl")])
    assert code == 0
    out = capsys.readouterr().out
    for state in ("validating", "routing", "loading_agent", "inferencing", "total"):
        assert state in out


def test_a_failed_request_exits_non_zero_with_one_line(
    registry_doc: dict[str, Any], write_registry: WriteRegistry, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    registry = write_registry(registry_doc)
    code = main(["--registry", str(registry), "--cache-dir", str(tmp_path / "c"), "run", "hi",
                 "--router", "rules", "--temperature", "9", "--json",
                 "--trace-file", str(tmp_path / "t.jsonl")])
    assert code == 1
    captured = capsys.readouterr()
    assert json.loads(captured.out)["state"] == "error"
    assert captured.err.strip().count("\n") == 0
    assert "temperature" in captured.err


def test_a_malformed_registry_fails_with_its_json_path(
    registry_doc: dict[str, Any], write_registry: WriteRegistry,
    capsys: pytest.CaptureFixture[str],
) -> None:
    registry_doc["agents"][0]["context_length"] = "big"
    registry = write_registry(registry_doc)
    assert main(["--registry", str(registry), "models", "validate"]) == 2
    err = capsys.readouterr().err
    assert "$.agents[0].context_length" in err and err.strip().count("\n") == 0


def test_models_list_and_show_describe_the_default_registry(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["models", "list", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [a["id"] for a in listed] == ["conversation", "code", "logic", "code+logic"]
    assert [a.get("virtual", False) for a in listed] == [False, False, False, True]
    assert main(["models", "show", "code"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["fallback_chain"] == ["code", "conversation"]
    assert main(["models", "show", "code+logic"]) == 0
    virtual = json.loads(capsys.readouterr().out)
    assert [m["agent"] for m in virtual["members"]] == ["code", "logic"]
    assert virtual["fallback_chain"] == ["code+logic", "code", "conversation"]


def test_console_script_is_installed() -> None:
    script = Path(sys.executable).parent / "orion-fsm"
    done = subprocess.run([str(script), "models", "validate"], capture_output=True, text=True,
                          check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("ok: 3 agents")


_SCXML = "{http://www.w3.org/2005/07/scxml}"


def _chart_from_scxml() -> tuple[set[str], list[str], set[str], Counter[tuple[str, str, str]]]:
    """States (nested ones too), initial states (the chart's and each region's), top-level
    final states and (source, target, events) of request.scxml."""
    root = ElementTree.parse(data_file("machines", "request.scxml")).getroot()
    kinds = (f"{_SCXML}state", f"{_SCXML}parallel", f"{_SCXML}final")
    every = [s for s in root.iter() if s.tag in kinds]
    states = {s.get("id", "") for s in every}
    finals = {s.get("id", "") for s in root if s.tag == f"{_SCXML}final"}
    initial = [root.get("initial", ""), *(s.get("initial", "") for s in every
                                          if s.get("initial"))]
    edges: Counter[tuple[str, str, str]] = Counter()
    for state in every:
        for transition in state.findall(f"{_SCXML}transition"):
            edges[(state.get("id", ""), transition.get("target", ""),
                   transition.get("event", ""))] += 1
    return states, initial, finals, edges


def _label(events: str) -> str:
    """How the Mermaid renderer names a transition: `load_failed breaker_open` is
    `Load failed Breaker open`."""
    return " ".join(event.replace("_", " ").capitalize() for event in events.split())


def test_diagram_draws_exactly_the_statechart_of_request_scxml(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["diagram"]) == 0
    lines = [line.strip() for line in capsys.readouterr().out.splitlines()]
    assert lines[0] == "stateDiagram-v2"
    drawn_states = {m.group(1) for line in lines
                    if (m := re.fullmatch(r'state "[^"]+" as (\w+)(?: \{)?', line))}
    arrows = [m.groups() for line in lines
              if (m := re.fullmatch(r"(\S+) --> (\S+)(?: : (.+))?", line))]
    # The chart's initial state, then each region's (a parallel state's regions).
    initial = [target for source, target, _ in arrows if source == "[*]"]
    finals = {source for source, target, _ in arrows if target == "[*]"}
    drawn = Counter((source, target, label) for source, target, label in arrows
                    if "[*]" not in (source, target))

    states, scxml_initial, scxml_finals, edges = _chart_from_scxml()
    assert drawn_states == states
    assert sorted(initial) == sorted(scxml_initial)
    assert finals == scxml_finals
    assert drawn == Counter({(s, t, _label(e)): n for (s, t, e), n in edges.items()})
