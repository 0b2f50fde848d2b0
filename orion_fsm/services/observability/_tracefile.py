"""Trace files: one JSON line per request, appended by a background writer, and read back.

A record holds what is needed to understand and replay a run (README, "Trace files"); records
of older versions are read in the current shape (`upgrade_record`).
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

from orion_fsm._exceptions import OrionError
from orion_fsm.services.observability._sanitize import sanitize

TRACE_FORMAT = "orion-fsm.trace"
# 2 adds what decided the path from outside the machine: `streaming`, `registry_source`,
# `clock`, `breakers`, `cache.enabled` and the router's per-agent `result.routing.scores`.
# 3 keys `breakers` by the model instance each breaker guards, with the `agents` it serves
# (older records are keyed by agent: each reads as a breaker serving that one agent), adds
# `result.retry_after_s` and the `fallback --retry_same--> loading_agent` transition.
TRACE_VERSION = 3
_BATCH = 256
# Version 2 fields, as a version 1 record (or a writer that predates a field) leaves them:
# None means "not recorded", which replay treats as "unknown", never as false.
_V2_DEFAULTS: dict[str, Any] = {
    "streaming": None,
    "registry_source": None,
    "clock": None,
    "breakers": None,
}


class TraceWriter:
    """Appends trace records to `path` from a task of the engine's task group.

    `submit` never blocks the request: records are queued, serialised and written in a
    worker thread, in batches. Records submitted before `aclose` are always written.
    """

    def __init__(self, path: Path | None) -> None:
        self.path = path
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
        # One write of whole lines in append mode: concurrent writers never interleave a line.
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            data = memoryview(lines.encode("utf-8"))
            while data:
                data = data[os.write(fd, data):]
        finally:
            os.close(fd)
        self.written += len(batch)


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
            result = upgraded["result"] = {**result, "routing": {**routing, "scores": {}}}
    if isinstance(result, dict) and "retry_after_s" not in result:
        upgraded["result"] = {**result, "retry_after_s": None}
    breakers = upgraded.get("breakers")
    if isinstance(breakers, dict):
        # Before version 3 each agent had its own breaker: the key was the agent.
        upgraded["breakers"] = {key: {**b, "agents": b.get("agents", [key])}
                                if isinstance(b, dict) else b for key, b in breakers.items()}
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


def find_traces(path: Path, request_id: str | None = None) -> list[dict[str, Any]]:
    """The records of a trace file, or those whose request (or trace) id starts with
    `request_id`; an OrionError naming the file if none does."""
    records = list(read_traces(path))
    if request_id is None:
        return records
    chosen = [r for r in records if str(r.get("request_id", "")).startswith(request_id)
              or str(r.get("trace_id", "")).startswith(request_id)]
    if not chosen:
        raise OrionError(f"no request {request_id!r} in {path} ({len(records)} records); "
                         "`orion-fsm trace show` lists their ids")
    return chosen
