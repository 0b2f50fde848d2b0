"""The trace file: one JSON line per record, readers refuse formats they do not know."""

from __future__ import annotations

import json
from pathlib import Path

import anyio
import pytest

from orion_fsm import OrionError, find_traces
from orion_fsm.services.observability._tracefile import (
    TRACE_FORMAT,
    TRACE_VERSION,
    TraceWriter,
    read_traces,
    trace_files,
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


async def write(path: Path, ids: range, **options: int) -> None:
    """Each record by a writer of its own: rotation is decided per batch written."""
    for i in ids:
        writer = TraceWriter(path, **options)
        async with anyio.create_task_group() as tg:
            await writer.prepare()
            await tg.start(writer.run)
            writer.submit(record(i))
            writer.close()


async def test_a_full_trace_file_is_rotated_and_only_so_many_are_kept(tmp_path: Path) -> None:
    path = tmp_path / "orion-fsm.jsonl"
    line = len(json.dumps(record(0)))  # records 0, 3, 6...: the shortest lines
    await write(path, range(0, 60, 3), max_bytes=4 * line, keep=2)
    files = trace_files(path)
    assert [f.name for f in files] == ["orion-fsm.jsonl", "orion-fsm.1.jsonl",
                                       "orion-fsm.2.jsonl"]
    assert all(f.stat().st_size <= 4 * (line + 1) for f in files)
    kept = [r["request_id"] for f in reversed(files) for r in read_traces(f)]
    assert kept == [f"r{i}" for i in range(60 - 3 * len(kept), 60, 3)]  # the newest, in order


async def test_readers_find_the_latest_records_and_a_request_in_any_rotated_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    monkeypatch.delenv("ORION_FSM_TRACE_FILE", raising=False)
    with pytest.raises(OrionError, match=r"no trace file at .*state/orion-fsm/traces"):
        find_traces()
    path = tmp_path / "state" / "orion-fsm" / "traces" / "orion-fsm.jsonl"
    line = len(json.dumps(record(0)))
    await write(path, range(0, 18, 3), max_bytes=2 * line, keep=3)
    assert [r["request_id"] for r in find_traces()] == ["r12", "r15"]  # the current file
    assert [r["request_id"] for r in find_traces(request_id="r3")] == ["r3"]  # rotated
    with pytest.raises(OrionError, match=r"no request 'r99' in .* \(and 2 rotated\)"):
        find_traces(request_id="r99")
    with pytest.raises(OrionError, match=r"no trace file .*nope\.jsonl"):
        find_traces(tmp_path / "nope.jsonl")


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
    path.write_text("not json\n")
    with pytest.raises(OrionError, match=":1: not a JSON trace line"):
        list(read_traces(path))
    # A line that starts like a record but is cut (a writer killed mid-line) is skipped.
    path.write_text('{"format": "orion-fsm.trace", "vers\n')
    assert list(read_traces(path)) == []


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
                                  "breakers": None, "abort": None,
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


class _Opaque:
    def __repr__(self) -> str:
        return "<opaque>"


@pytest.mark.parametrize("field", [
    "caf\udce9",  # what non-UTF-8 argv decodes to
    b"\xff\xfe raw",
    _Opaque(),
    float("nan"),
    {("tuple", "key"): 1},
    ["nested", {"deep": [b"x", {1.5: float("-inf")}]}],
])
async def test_every_record_is_written_in_a_safe_form(tmp_path: Path, field: object) -> None:
    writer = TraceWriter(tmp_path / "t.jsonl")
    async with anyio.create_task_group() as tg:
        await writer.prepare()
        await tg.start(writer.run)
        writer.submit({**record(0), "field": field})
        writer.submit(record(1))
        writer.close()
    records = list(read_traces(tmp_path / "t.jsonl"))
    assert [r["request_id"] for r in records] == ["r0", "r1"]
    assert writer.stats() == {"written": 2, "dropped": 0, "repaired": 1}
    # What was written is valid UTF-8 and strict JSON throughout (no lone surrogate, no NaN).
    for line in (tmp_path / "t.jsonl").read_bytes().decode("utf-8").splitlines():
        json.loads(line, parse_constant=lambda name: pytest.fail(f"{name} in a trace line"))


async def test_a_self_referencing_record_is_written_cut_at_a_depth(tmp_path: Path) -> None:
    loop: dict[str, object] = {}
    loop["self"] = loop
    writer = TraceWriter(tmp_path / "t.jsonl")
    async with anyio.create_task_group() as tg:
        await writer.prepare()
        await tg.start(writer.run)
        writer.submit({**record(0), "loop": loop})
        writer.close()
    assert [r["request_id"] for r in read_traces(tmp_path / "t.jsonl")] == ["r0"]


async def test_a_full_disk_drops_and_counts_records_and_logs_once(
        caplog: pytest.LogCaptureFixture) -> None:
    writer = TraceWriter(Path("/dev/full"))
    async with anyio.create_task_group() as tg:
        await writer.prepare()
        await tg.start(writer.run)
        for i in range(50):
            writer.submit(record(i))
            if i % 10 == 0:
                await anyio.sleep(0.01)  # several batches, several failures
        writer.close()
    assert writer.dropped == 50 and writer.written == 0
    failures = [r for r in caplog.records if r.name == "orion_fsm.trace"]
    assert len(failures) == 1 and "ENOSPC" in str(failures[0].__dict__["failure"])


async def test_a_trace_path_that_becomes_a_directory_degrades(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    writer = TraceWriter(path)
    async with anyio.create_task_group() as tg:
        await writer.prepare()
        await tg.start(writer.run)
        writer.submit(record(0))
        await anyio.sleep(0.05)
        path.unlink()
        path.mkdir()
        writer.submit(record(1))
        writer.close()
    assert writer.stats()["dropped"] == 1 and writer.written == 1


async def test_a_trace_path_that_is_a_directory_is_refused_at_start(tmp_path: Path) -> None:
    with pytest.raises(OrionError, match="is a directory"):
        await TraceWriter(tmp_path).prepare()


async def test_records_after_close_are_counted_not_raised(tmp_path: Path) -> None:
    writer = TraceWriter(tmp_path / "t.jsonl")
    writer.close()
    writer.submit(record(0))
    assert writer.dropped == 1


async def test_trace_files_and_the_directories_made_for_them_are_private(
        tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "t.jsonl"
    writer = TraceWriter(path)
    async with anyio.create_task_group() as tg:
        await writer.prepare()
        await tg.start(writer.run)
        writer.submit(record(0))
        writer.close()
    assert path.stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "a").stat().st_mode & 0o777 == 0o700
    assert (tmp_path / "a" / "b").stat().st_mode & 0o777 == 0o700
