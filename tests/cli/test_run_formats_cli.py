"""`orion-fsm run` with an output format (--schema, --regex, --tools) and the REPL's /schema."""

from __future__ import annotations

import argparse
import io
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from orion_fsm import Engine, Registry
from orion_fsm.cli import main
from orion_fsm.cli._repl import Session

WriteRegistry = Callable[[dict[str, Any]], Path]
SCHEMA = {"type": "object", "additionalProperties": False, "required": ["n"],
          "properties": {"n": {"type": "integer", "minimum": 1, "maximum": 9}}}


def run(registry: Path, tmp_path: Path, *extra: str) -> int:
    return main(["--registry", str(registry), "--cache-dir", str(tmp_path / "c"), "run", "hello",
                 "--router", "rules", "--agent", "long", "--max-tokens", "200",
                 "--trace-file", str(tmp_path / "t.jsonl"), *extra])


def test_run_with_a_schema_prints_the_parsed_value(
    registry_doc: dict[str, Any], write_registry: WriteRegistry, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    schema = tmp_path / "answer.json"
    schema.write_text(json.dumps(SCHEMA), encoding="utf-8")
    assert run(write_registry(registry_doc), tmp_path, "--schema", str(schema), "--json") == 0
    out = json.loads(capsys.readouterr().out)
    jsonschema.validate(out["parsed"], SCHEMA)
    assert json.loads(out["text"]) == out["parsed"]


def test_run_with_a_regex_streams_matching_text(
    registry_doc: dict[str, Any], write_registry: WriteRegistry, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert run(write_registry(registry_doc), tmp_path, "--regex", "[a-c]{4}") == 0
    assert re.match(r"[a-c]{4}\n", capsys.readouterr().out)


def test_run_with_tools_prints_the_call(
    registry_doc: dict[str, Any], write_registry: WriteRegistry, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    tools = tmp_path / "tools.json"
    tools.write_text(json.dumps([{"type": "function", "function": {
        "name": "pick", "parameters": SCHEMA}}]), encoding="utf-8")
    assert run(write_registry(registry_doc), tmp_path, "--tools", str(tools),
               "--tool-choice", "pick", "--json") == 0
    (call,) = json.loads(capsys.readouterr().out)["tool_calls"]
    assert call["function"]["name"] == "pick"
    jsonschema.validate(json.loads(call["function"]["arguments"]), SCHEMA)


def test_an_unusable_schema_fails_with_one_line_naming_it(
    registry_doc: dict[str, Any], write_registry: WriteRegistry, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    registry = write_registry(registry_doc)
    assert run(registry, tmp_path, "--schema", str(tmp_path / "missing.json")) == 2
    assert "cannot read the JSON schema" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text('{"type": "strin"}', encoding="utf-8")
    assert run(registry, tmp_path, "--schema", str(bad)) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "error (invalid)" in err and "response_format.json_schema.schema" in err


@pytest.mark.anyio
async def test_repl_schema_command_constrains_the_next_answers(
    registry_doc: dict[str, Any], tmp_path: Path,
) -> None:
    schema = tmp_path / "answer.json"
    schema.write_text(json.dumps(SCHEMA), encoding="utf-8")
    args = argparse.Namespace(agent="long", max_tokens=200, temperature=0.0,
                              cache_dir=str(tmp_path / "c"))
    out = io.StringIO()
    async with Engine(Registry.from_dict(registry_doc), embeddings=False, cache_dir=tmp_path / "c",
                      trace_path=False, threads=1) as engine:
        session = Session(engine, args, out)
        await session.handle(f"/schema {schema}")
        await session.handle("hello")
        await session.handle("/schema off")
        await session.handle("/schema")
    jsonschema.validate(session.results[0].parsed, SCHEMA)
    assert "answers are free text" in out.getvalue()
