"""Hostile files and arguments through the real entry point: `trace show` and `replay` on
broken, binary, huge or tampered traces, and a bounded fuzz of CLI arguments. Every path
ends in an exit code and, on error, one line naming the problem; never a traceback."""

from __future__ import annotations

import copy
import json
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import hypothesis.strategies as st
import pytest
from hypothesis import HealthCheck, example, given, settings

from orion_fsm.cli import main

SHIPPED = Path(__file__).parents[2] / "traces"
RECORDS = [json.loads(line) for name in ("success", "cache-hit", "fallback", "invalid")
           for line in (SHIPPED / f"{name}.jsonl").read_text(encoding="utf-8").splitlines()]
ENTRY = "import sys; from orion_fsm.cli import main; sys.exit(main())"


def _bad_files(root: Path) -> dict[str, Path]:
    good = (SHIPPED / "invalid.jsonl").read_bytes()
    files = {
        "empty": b"",
        "blank lines": b"\n\n  \n",
        "torn only line": (SHIPPED / "success.jsonl").read_bytes()[:300],
        "binary": Path(sys.executable).read_bytes()[:2000],
        "latin-1": "café\n".encode("latin-1"),
        "not json": b"hello world\n",
        "a json list": b"[1, 2, 3]\n",
        "NaN fields": good.replace(b'"ms":', b'"ms":NaN,"x":', 1),
    }
    paths = {}
    for name, data in files.items():
        paths[name] = root / f"{name.replace(' ', '-')}.jsonl"
        paths[name].write_bytes(data)
    (root / "a-directory").mkdir()
    paths["a directory"] = root / "a-directory"
    paths["missing"] = root / "missing.jsonl"
    return paths


@pytest.mark.parametrize("command", [["trace", "show"], ["trace", "show", "--summary"],
                                     ["replay"]])
@pytest.mark.parametrize("name", ["empty", "blank lines", "torn only line", "binary", "latin-1",
                                  "not json", "a json list", "a directory", "missing"])
def test_unusable_trace_files_are_one_line_errors(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], command: list[str],
        name: str) -> None:
    path = _bad_files(tmp_path)[name]
    assert main([*command, str(path)]) != 0
    err = [line for line in capsys.readouterr().err.splitlines()
           if line.startswith("orion-fsm:")]
    assert len(err) == 1 and str(path.name) in err[0], err


def test_a_torn_last_line_is_skipped_and_the_rest_is_read(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "t.jsonl"
    data = (SHIPPED / "invalid.jsonl").read_bytes()
    path.write_bytes(data + (SHIPPED / "success.jsonl").read_bytes()[:200])
    assert main(["trace", "show", str(path), "--summary"]) == 0
    assert "total" in capsys.readouterr().out
    assert main(["replay", str(path)]) == 0


def test_terminal_escapes_in_a_trace_never_reach_the_terminal(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    record = copy.deepcopy(RECORDS[0])
    record["result"]["agent"] = "\x1b]0;pwned\x07\x1b[2J"
    record["request_id"] = "\x1b[31mred"
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps(record) + "\n", encoding="utf-8")
    assert main(["trace", "show", str(path)]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\x07" not in out and "\\x1b" in out


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.text(max_size=6)
    | st.floats(allow_nan=False, allow_infinity=False),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner,
                                                                max_size=3),
    max_leaves=6)
_FIELDS = ["request_id", "trace_id", "request", "result", "phases", "transitions", "spans",
           "prompt_token_ids", "cache", "model", "sampling", "breakers", "clock", "streaming",
           "started_at", "registry_digest", "redacted", "virtual"]
_NESTED = [("result", "state"), ("result", "total_ms"), ("result", "phases"),
           ("result", "token_ids"), ("result", "routing"), ("result", "tokens"),
           ("request", "messages"), ("request", "params"), ("cache", "l1_key"),
           ("phases", 0), ("transitions", 0), ("spans", 0)]


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(base=st.sampled_from(RECORDS), field=st.sampled_from(_FIELDS + _NESTED), value=_JSON,
       drop=st.booleans())
@example(base=RECORDS[0], field="redacted", value=True, drop=False)  # found by the fuzz
def test_tampered_records_never_give_a_traceback_in_trace_show_or_replay(
        tmp_path: Path, base: dict[str, Any], field: Any, value: Any, drop: bool) -> None:
    record = copy.deepcopy(base)
    if isinstance(field, tuple):
        holder = record.get(field[0])
        if isinstance(holder, dict):
            holder[field[1]] = value
        elif isinstance(holder, list) and holder:
            holder[0] = value
    elif drop:
        record.pop(field, None)
    else:
        record[field] = value
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps(record) + "\n", encoding="utf-8")
    # Either read (0) or refused with a one-line error (2); replay may also FAIL (1).
    assert main(["trace", "show", str(path), "--width", "30"]) in (0, 2)
    assert main(["replay", str(path)]) in (0, 1, 2)


def _cli(args: list[str | bytes], cwd: Path) -> subprocess.CompletedProcess[bytes]:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2]),
           "ORION_FSM_CACHE": str(cwd / "cache")}
    return subprocess.run([sys.executable, "-c", ENTRY, *args], cwd=cwd, env=env,
                          capture_output=True, timeout=120, check=False)


def test_a_bounded_fuzz_of_arguments_never_gives_a_traceback(tmp_path: Path) -> None:
    files = _bad_files(tmp_path)
    rng = random.Random(15)
    junk: list[str | bytes] = [b"caf\xe9", b"\xff\xfe", "--", "-1", "1e999", "nan", "", "\x00x",
                               str(files["binary"]), str(files["a directory"]),
                               str(files["missing"]), "/dev/zero", "💥" * 10]
    commands: list[list[str | bytes]] = [
        ["trace", "show"], ["trace", "show", "--last"], ["trace", "show", "--width"],
        ["trace", "show", "--request"], ["replay"], ["replay", "--request"],
        ["run", "--trace-file"], ["run", "--max-tokens"], ["run", "--agent"],
        ["route", "eval"], ["route", "--rules"], ["diagram", "--output"],
        ["replay", str(SHIPPED / "success.jsonl"), "--machine"], ["--registry"],
        ["models", "show"]]
    cases = [[*rng.choice(commands), rng.choice(junk)] for _ in range(24)]
    for args in cases:
        done = _cli(args, tmp_path)
        err = done.stderr.decode("utf-8", "replace")
        assert "Traceback" not in err, (args, err)
        if done.returncode != 0:
            last = [line for line in err.splitlines() if line.strip()]
            assert last and (last[-1].startswith(("orion-fsm:", "usage:"))
                             or "error:" in last[-1]), (args, err)


def test_models_validate_reports_every_missing_model_file_and_fails(
        registry_doc: dict[str, Any], write_registry: Any, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    registry_doc["agents"][1]["model"] = {"package": "no_such_model_package", "file": "m.gguf"}
    registry_doc["agents"][3]["quantization"] = [
        {"name": "q8", "bits": 8, "source": {"path": str(tmp_path / "gone-q8.gguf")}}]
    registry = write_registry(registry_doc)
    assert main(["--registry", str(registry), "models", "validate"]) == 2
    captured = capsys.readouterr()
    assert "ok" not in captured.out
    lines = captured.err.strip().splitlines()
    assert len(lines) == 3 and all(line.startswith("orion-fsm: agent ") for line in lines)
    assert "'code'" in lines[0] and "no_such_model_package" in lines[0]
    assert "'broken'" in lines[1] and "missing.gguf" in lines[1]
    assert "'short' quantization variant 'q8'" in lines[2]


def test_models_validate_says_ok_when_every_model_file_is_there(
        registry_doc: dict[str, Any], write_registry: Any,
        capsys: pytest.CaptureFixture[str]) -> None:
    registry_doc["agents"] = [a for a in registry_doc["agents"] if a["id"] != "broken"]
    assert main(["--registry", str(write_registry(registry_doc)), "models", "validate"]) == 0
    assert capsys.readouterr().out.startswith("ok: ")


def _labelled_files(root: Path) -> dict[str, Path]:
    files = {
        "not-json": b"not json\n",
        "wrong-types": b'{"text": 5, "agent": "code"}\n',
        "null-text": b'{"text": null, "agent": "code"}\n',
        "list-row": b'["hi", "code"]\n',
        "unknown-agent": b'{"text": "hi", "agent": "nope"}\n',
        "binary": Path(sys.executable).read_bytes()[:2000],
        "latin-1": '{"text": "café", "agent": "code"}\n'.encode("latin-1"),
        "empty": b"",
        "deep": b"[" * 100_000 + b"]" * 100_000 + b"\n",
    }
    paths = {}
    for name, data in files.items():
        paths[name] = root / f"{name}.jsonl"
        paths[name].write_bytes(data)
    (root / "a-dir").mkdir()
    paths["a-dir"] = root / "a-dir"
    paths["missing"] = root / "missing.jsonl"
    return paths


def _one_line_error(code: int, err: str) -> None:
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("orion-fsm: "), err
    assert "Traceback" not in err


@pytest.mark.parametrize("name", ["not-json", "wrong-types", "null-text", "list-row",
                                  "unknown-agent", "binary", "latin-1", "empty", "deep",
                                  "a-dir", "missing"])
def test_route_eval_on_a_bad_labelled_file_is_a_one_line_error(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str) -> None:
    path = _labelled_files(tmp_path)[name]
    code = main(["route", "eval", str(path), "--rules"])
    _one_line_error(code, capsys.readouterr().err)


def _chart_files(root: Path) -> dict[str, Path]:
    scxml = (Path(__file__).parents[2] / "machines" / "request.scxml").read_text(encoding="utf-8")
    files = {
        "not-xml": "hello",
        "torn": scxml[: len(scxml) // 2],
        "empty-chart": '<scxml xmlns="http://www.w3.org/2005/07/scxml" version="1.0"></scxml>',
        "renamed-state": scxml.replace('id="routing"', 'id="routeing"'),
        "ghost-target": scxml.replace('target="routing"', 'target="ghost"', 1),
        "no-final": scxml.replace("<final", "<state").replace("</final>", "</state>"),
        "binary": "\x00\x01\x02" * 10,
    }
    paths = {}
    for name, text in files.items():
        paths[name] = root / f"{name}.scxml"
        paths[name].write_text(text, encoding="utf-8")
    (root / "chart-dir").mkdir()
    paths["a-dir"] = root / "chart-dir"
    paths["missing"] = root / "missing.scxml"
    return paths


@pytest.mark.parametrize("name", ["not-xml", "torn", "empty-chart", "renamed-state",
                                  "ghost-target", "no-final", "binary", "a-dir", "missing"])
def test_replay_with_a_bad_chart_is_a_one_line_error(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str) -> None:
    path = _chart_files(tmp_path)[name]
    code = main(["replay", "--machine", str(path), str(SHIPPED / "success.jsonl")])
    _one_line_error(code, capsys.readouterr().err)


@pytest.mark.parametrize("where", ["missing-folder/out.mmd", "a-dir", "a-file/out.mmd"])
def test_diagram_into_a_place_it_cannot_write_is_a_one_line_error(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], where: str) -> None:
    (tmp_path / "a-dir").mkdir()
    (tmp_path / "a-file").write_text("x", encoding="utf-8")
    code = main(["diagram", "--output", str(tmp_path / where)])
    _one_line_error(code, capsys.readouterr().err)


@pytest.mark.parametrize("where", ["a-dir", "a-file/t.jsonl"])
def test_run_with_an_unusable_trace_file_is_a_one_line_error(
        registry_doc: dict[str, Any], write_registry: Any, tmp_path: Path,
        capsys: pytest.CaptureFixture[str], where: str) -> None:
    (tmp_path / "a-dir").mkdir()
    (tmp_path / "a-file").write_text("x", encoding="utf-8")
    code = main(["--registry", str(write_registry(registry_doc)), "--cache-dir",
                 str(tmp_path / "cache"), "run", "hello", "--router", "rules",
                 "--max-tokens", "2", "--trace-file", str(tmp_path / where)])
    assert code != 0
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("orion-fsm: ")


def test_route_explain_with_rules_prints_the_decision(
        capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["route", "hello there", "--rules"]) == 0
    assert capsys.readouterr().out.startswith("agent     conversation  (rules)")


def test_route_tune_errors_are_not_wrapped_in_an_exception_group(tmp_path: Path) -> None:
    files = _labelled_files(tmp_path)
    for name in ("a-dir", "binary", "wrong-types"):
        done = _cli(["route", "tune", str(files[name])], tmp_path)
        err = done.stderr.decode("utf-8", "replace")
        assert done.returncode == 2, err
        assert "Traceback" not in err and "ExceptionGroup" not in err
        assert err.strip().splitlines()[-1].startswith("orion-fsm: ")


def test_non_utf8_arguments_to_every_touched_command_never_give_a_traceback(
        tmp_path: Path) -> None:
    bad = b"caf\xe9"
    (tmp_path / "a-dir").mkdir()
    cases: list[list[str | bytes]] = [
        ["route", bad, "--rules"], ["route", "eval", bad, "--rules"], ["models", "show", bad],
        ["diagram", "--output", str(tmp_path / "a-dir").encode() + b"/x\xff/y.mmd"],
        ["replay", "--machine", bad, str(SHIPPED / "success.jsonl")], ["trace", "show", bad],
        ["--registry", bad, "models", "validate"], ["run", "hi", "--agent", bad],
        ["route", "explain", b"\xff\xfe\xfd", "--rules"],
    ]
    for args in cases:
        done = _cli(args, tmp_path)
        err = done.stderr.decode("utf-8", "replace")
        assert "Traceback" not in err, (args, err)
        if done.returncode != 0:
            assert err.strip().splitlines()[-1].startswith("orion-fsm: "), (args, err)
