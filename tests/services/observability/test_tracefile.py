"""The trace file: one JSON line per record, readers refuse formats they do not know."""

from __future__ import annotations

import json
from pathlib import Path

import anyio
import pytest

from orion_fsm import OrionError
from orion_fsm.services.observability._tracefile import (
    TRACE_FORMAT,
    TRACE_VERSION,
    TraceWriter,
    read_traces,
    upgrade_record,
)

pytestmark = pytest.mark.anyio


def record(i: int) -> dict[str, object]:
    return {"format": TRACE_FORMAT, "version": TRACE_VERSION, "request_id": f"r{i}",
            "text": "é\n" * (i % 3)}


async def test_every_submitted_record_is_written_before_close(tmp_path: Path) -> None:
    writer = TraceWriter(tmp_path / "nested" / "t.jsonl")
    async with anyio.create_task_group() as tg:
        await writer.prepare()
        await tg.start(writer.run)
        for i in range(500):
            writer.submit(record(i))
        writer.close()
    assert [r["request_id"] for r in read_traces(tmp_path / "nested" / "t.jsonl")] == [
        f"r{i}" for i in range(500)]


async def test_an_unusable_trace_directory_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a directory")
    writer = TraceWriter(tmp_path / "file" / "t.jsonl")
    with pytest.raises(OrionError, match="trace directory"):
        await writer.prepare()


def test_readers_refuse_newer_versions_and_other_formats(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps({"format": TRACE_FORMAT, "version": TRACE_VERSION + 1}) + "\n")
    with pytest.raises(OrionError, match="version"):
        list(read_traces(path))
    path.write_text("{not json\n")
    with pytest.raises(OrionError, match=":1: not a JSON trace line"):
        list(read_traces(path))


def test_version_1_records_are_read_with_the_newer_fields_unknown(tmp_path: Path) -> None:
    v1 = {"format": TRACE_FORMAT, "version": 1, "request_id": "r1",
          "cache": {"level": "L1", "l1_key": "k"},
          "result": {"state": "success", "routing": {"agent": "code", "source": "rules"}}}
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps(v1) + "\n")
    (read,) = read_traces(path)
    assert read["version"] == 1  # the version it was written with
    assert read["streaming"] is None and read["clock"] is None and read["breakers"] is None
    assert read["cache"] == {"enabled": None, "level": "L1", "l1_key": "k"}
    assert read["result"]["routing"]["scores"] == {}


def test_upgrading_keeps_what_a_record_has() -> None:
    v2 = {"format": TRACE_FORMAT, "version": TRACE_VERSION, "streaming": True,
          "cache": {"enabled": True, "level": None, "l1_key": None},
          "result": {"routing": {"agent": "a", "scores": {"a": 0.5}}}}
    assert upgrade_record(v2) == {**v2, "registry_source": None, "clock": None,
                                  "breakers": None,
                                  "result": {**v2["result"], "retry_after_s": None}}


def test_version_2_breakers_keyed_by_agent_read_as_one_breaker_per_agent() -> None:
    v2 = {"format": TRACE_FORMAT, "version": 2,
          "breakers": {"code": {"state": "open", "consecutive_failures": 3}}}
    upgraded = upgrade_record(v2)
    assert upgraded["breakers"] == {"code": {"state": "open", "consecutive_failures": 3,
                                             "agents": ["code"]}}


def test_readers_refuse_a_line_without_a_version(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps({"format": TRACE_FORMAT}) + "\n")
    with pytest.raises(OrionError, match="version 1 to"):
        list(read_traces(path))
