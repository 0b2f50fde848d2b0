"""Trace files: one JSON line per request, appended by a background writer, rotated by size,
and read back. A record holds what is needed to understand and replay a run (README, "Trace
files"); records of older versions are read in the current shape (`upgrade_record`).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
from anyio.abc import TaskStatus
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from orion_fsm._config import DEFAULT_TRACE_KEEP, DEFAULT_TRACE_MAX_BYTES, default_trace_path
from orion_fsm._exceptions import OrionError
from orion_fsm.services.observability._sanitize import sanitize

TRACE_FORMAT = "orion-fsm.trace"
# 2 adds what decided the path from outside the machine: `streaming`, `registry_source`,
# `clock`, `breakers`, `cache.enabled` and the router's per-agent `result.routing.scores`.
TRACE_VERSION = 2
_BATCH = 256
_MAX_ROTATED = 1000  # how far a reader looks for rotated files
# Version 2 fields, as a version 1 record (or a writer that predates a field) leaves them:
# None means "not recorded", which replay treats as "unknown", never as false.
_V2_DEFAULTS: dict[str, Any] = {
    "streaming": None,
    "registry_source": None,
    "clock": None,
    "breakers": None,
    # Where an abort arrived (README, "Trace files"); added within version 2.
    "abort": None,
}


class TraceWriter:
    """Appends trace records to `path` from a task of the engine's task group.

    `submit` never blocks the request: records are queued, serialised and written in a
    worker thread, in batches. Records submitted before `aclose` are always written. A file
    that would grow past `max_bytes` is rotated first, keeping `keep` rotated files.
    """

    def __init__(self, path: Path | None, *, max_bytes: int = DEFAULT_TRACE_MAX_BYTES,
                 keep: int = DEFAULT_TRACE_KEEP) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.keep = keep
        self._send: MemoryObjectSendStream[dict[str, Any]]
        self._receive: MemoryObjectReceiveStream[dict[str, Any]]
        self._send, self._receive = anyio.create_memory_object_stream[dict[str, Any]](math.inf)
        self.written = 0

    def submit(self, record: dict[str, Any]) -> None:
        if self.path is None:
            return
        self._send.send_nowait(record)

    async def prepare(self) -> None:
        """Create the trace directory; a clear OrionError if that is impossible."""
        if self.path is not None:
            await anyio.to_thread.run_sync(self._prepare)

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Write queued records until `close()`; call `prepare()` first."""
        task_status.started()
        async with self._receive:
            async for first in self._receive:
                batch = [first]
                while len(batch) < _BATCH:
                    try:
                        batch.append(self._receive.receive_nowait())
                    except (anyio.WouldBlock, anyio.EndOfStream):
                        break
                await anyio.to_thread.run_sync(self._write, batch)

    def close(self) -> None:
        """No more records; `run` returns once the queued ones are written."""
        self._send.close()

    def _prepare(self) -> None:
        assert self.path is not None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OrionError(
                f"cannot create the trace directory {self.path.parent}: {exc.strerror}; "
                "pass another trace_path (or --trace-file) or fix its permissions"
            ) from exc

    def _write(self, batch: list[dict[str, Any]]) -> None:
        assert self.path is not None
        # Secrets and personal data never reach the file (API keys, e-mails, card numbers...).
        lines = "".join(json.dumps(sanitize(r), ensure_ascii=False, separators=(",", ":"))
                        + "\n" for r in batch)
        rotate_if_full(self.path, len(lines), max_bytes=self.max_bytes, keep=self.keep)
        # One write of whole lines in append mode: concurrent writers never interleave a line.
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            data = memoryview(lines.encode("utf-8"))
            while data:
                data = data[os.write(fd, data):]
        finally:
            os.close(fd)
        self.written += len(batch)


def rotated_files(path: Path, keep: int) -> list[Path]:
    """Where `path`'s rotated files go, newest first: orion-fsm.1.jsonl, ...,
    orion-fsm.{keep}.jsonl."""
    return [path.with_name(f"{path.stem}.{n}{path.suffix}") for n in range(1, keep + 1)]


def rotate_if_full(path: Path, adding: int, *, max_bytes: int, keep: int) -> bool:
    """Rotate `path` if `adding` more bytes would take it past `max_bytes` (0: never): each
    rotated file moves one place older, the oldest beyond `keep` is dropped."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return False
    if max_bytes <= 0 or size == 0 or size + adding <= max_bytes:
        return False
    older = rotated_files(path, keep)
    if not older:
        path.unlink(missing_ok=True)
        return True
    for source, target in zip(older[-2::-1], older[:0:-1], strict=True):
        if source.exists():
            os.replace(source, target)  # replaces the oldest kept when all are there
    os.replace(path, older[0])
    return True


def trace_files(path: Path) -> list[Path]:
    """The trace file at `path` and its rotated files that exist, newest first."""
    found = [path] if path.is_file() else []
    for rotated in rotated_files(path, _MAX_ROTATED):
        if not rotated.is_file():
            break  # rotation leaves no gap
        found.append(rotated)
    return found


def upgrade_record(record: dict[str, Any]) -> dict[str, Any]:
    """`record` in the current version's shape: fields an older writer did not record are
    present with None (unknown). `version` keeps the version it was written with."""
    upgraded = {**_V2_DEFAULTS, **record}
    cache = upgraded.get("cache")
    upgraded["cache"] = {"enabled": None, "level": None, "l1_key": None,
                         **(cache if isinstance(cache, dict) else {})}
    result = upgraded.get("result")
    if isinstance(result, dict) and isinstance(result.get("routing"), dict):
        routing = result["routing"]
        if routing and "scores" not in routing:
            upgraded["result"] = {**result, "routing": {**routing, "scores": {}}}
    return upgraded


def read_traces(path: Path) -> Iterator[dict[str, Any]]:
    """The records of a trace file, oldest first, upgraded to the current version's shape
    (`upgrade_record`); refuses formats it does not know and versions newer than it knows."""
    with path.open(encoding="utf-8") as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise OrionError(f"{path}:{number}: not a JSON trace line ({exc.msg})") from exc
            version = record.get("version") if isinstance(record, dict) else None
            if (not isinstance(record, dict) or record.get("format") != TRACE_FORMAT
                    or not isinstance(version, int) or not 1 <= version <= TRACE_VERSION):
                shown = record if not isinstance(record, dict) else {
                    "format": record.get("format"), "version": version}
                raise OrionError(
                    f"{path}:{number}: not an orion-fsm trace of version 1 to {TRACE_VERSION} "
                    f"({shown!r}); a newer orion-fsm may read it"
                )
            yield upgrade_record(record)


def find_traces(path: Path | None = None,
                request_id: str | None = None) -> list[dict[str, Any]]:
    """The records of a trace file, or those whose request (or trace) id starts with
    `request_id`; an OrionError naming the file if none does.

    Without `path`, the default trace file (`default_trace_path()`) and its rotated files:
    the latest records, or the request looked for in any of them.
    """
    if path is not None:
        if not path.is_file():
            raise OrionError(f"no trace file {path}: pass the path of a JSONL trace file")
        files = [path]
    else:
        files = trace_files(default_trace_path())
        if not files:
            raise OrionError(f"no trace file at {default_trace_path()} yet: run a request "
                             "first (orion-fsm run ...), or pass a trace file")
    where = files[0] if len(files) == 1 else f"{files[0]} (and {len(files) - 1} rotated)"
    if request_id is None:
        for file in files:  # the newest with records: a file just rotated may be empty
            records = list(read_traces(file))
            if records:
                return records
        return []
    chosen, total = [], 0
    for file in reversed(files):  # oldest first, as each file is
        records = list(read_traces(file))
        total += len(records)
        chosen += [r for r in records if str(r.get("request_id", "")).startswith(request_id)
                   or str(r.get("trace_id", "")).startswith(request_id)]
    if not chosen:
        raise OrionError(f"no request {request_id!r} in {where} ({total} records); "
                         "`orion-fsm trace show` lists their ids")
    return chosen
