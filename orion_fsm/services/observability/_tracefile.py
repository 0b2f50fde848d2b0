"""Trace files: one JSON line per request, appended by a background writer, rotated by size,
and read back. A record holds what is needed to understand and replay a run (README, "Trace
files"); records of older versions are read in the current shape (`upgrade_record`).
"""

from __future__ import annotations

import errno
import json
import logging
import math
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
from anyio.abc import TaskStatus
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from orion_fsm._config import DEFAULT_TRACE_KEEP, DEFAULT_TRACE_MAX_BYTES, default_trace_path
from orion_fsm._exceptions import OrionError
from orion_fsm._files import make_private_dirs
from orion_fsm.services.observability._sanitize import sanitize, warm_up

if TYPE_CHECKING:
    from opentelemetry.metrics import CallbackOptions, Meter, Observation

_log = logging.getLogger("orion_fsm.trace")
TRACE_FORMAT = "orion-fsm.trace"
# 2 adds what decided the path from outside the machine: `streaming`, `registry_source`,
# `clock`, `breakers`, `cache.enabled` and the router's per-agent `result.routing.scores`.
# 3 keys `breakers` by the model instance each breaker guards, with the `agents` it serves
# (older records are keyed by agent: each reads as a breaker serving that one agent), adds
# `result.retry_after_s` and the `fallback --retry_same--> loading_agent` transition.
TRACE_VERSION = 3
_BATCH = 256
_MAX_ROTATED = 1000  # how far a reader looks for rotated files
# A record deeper than this is not ours: its fallback form stops there (a "..." marker).
_MAX_DEPTH = 32
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
    worker thread, in batches. Records submitted before `aclose` are always written, or
    counted in `dropped`: a record that cannot be written (a full disk, a path that became a
    directory, a field no JSON can hold) is logged once per kind of failure and dropped; the
    writer never raises into the engine's task group, so a failing sink never stops serving.
    A file that would grow past `max_bytes` is rotated first, keeping `keep` rotated files.
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
        self.dropped = 0  # records lost to a failing sink (also the trace.dropped metric)
        self.repaired = 0  # records written in their safe form (bytes, objects, surrogates)
        self._failures_seen: set[str] = set()

    def submit(self, record: dict[str, Any]) -> None:
        if self.path is None:
            return
        try:
            self._send.send_nowait(record)
        except (anyio.ClosedResourceError, anyio.BrokenResourceError):
            # A request that ends as the Engine closes: its record comes too late to write.
            self._drop(1, "closed", "the trace writer was already closed")

    def stats(self) -> dict[str, int]:
        return {"written": self.written, "dropped": self.dropped, "repaired": self.repaired}

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
                try:
                    await anyio.to_thread.run_sync(self._write, batch)
                except Exception as exc:  # _write catches what it expects; this is a bug
                    self._drop(len(batch), f"bug:{type(exc).__name__}", repr(exc))

    def close(self) -> None:
        """No more records; `run` returns once the queued ones are written."""
        self._send.close()

    def _prepare(self) -> None:
        assert self.path is not None
        warm_up()  # detect-secrets' import, here in a worker thread, not at the first secret
        try:
            make_private_dirs(self.path.parent)
        except OSError as exc:
            raise OrionError(
                f"cannot create the trace directory {self.path.parent}: {exc.strerror}; "
                "pass another trace_path (or --trace-file) or fix its permissions"
            ) from exc
        if self.path.is_dir():
            raise OrionError(f"the trace file {self.path} is a directory; "
                             "pass a file path as trace_path (or --trace-file)")

    def _write(self, batch: list[dict[str, Any]]) -> None:
        assert self.path is not None
        lines: list[bytes] = []
        for record in batch:
            line = self._line(record)
            if line is not None:
                lines.append(line)
        if not lines:
            return
        # One write of whole lines in append mode: concurrent writers never interleave a line.
        data = memoryview(b"".join(lines))
        try:
            rotate_if_full(self.path, len(data), max_bytes=self.max_bytes, keep=self.keep)
        except OSError as exc:  # keep appending to the full file rather than lose records
            _log.warning("trace file not rotated", extra={"trace_path": str(self.path),
                                                          "error": str(exc)})
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        except OSError as exc:
            self._drop(len(lines), _failure_kind(exc), f"cannot open {self.path}: {exc}")
            return
        try:
            while data:
                data = data[os.write(fd, data):]
        except OSError as exc:
            # Part of the batch may be on disk; the torn line is skipped by the reader.
            self._drop(len(lines), _failure_kind(exc), f"cannot write {self.path}: {exc}")
            return
        finally:
            os.close(fd)
        self.written += len(lines)

    def _line(self, record: dict[str, Any]) -> bytes | None:
        """One JSON line: sanitised (secrets never reach the file), then serialised; a record
        JSON cannot hold as it is (bytes, objects, lone surrogates, NaN) in its safe form."""
        try:
            text = json.dumps(_at_rest(record), ensure_ascii=False, separators=(",", ":"),
                              allow_nan=False)
            return text.encode("utf-8") + b"\n"
        except (TypeError, ValueError, RecursionError, UnicodeError):
            pass
        try:
            text = json.dumps(_at_rest(json_safe(record)), ensure_ascii=False,
                              separators=(",", ":"), allow_nan=False)
            data = text.encode("utf-8") + b"\n"
        except Exception as exc:  # json_safe gives plain data: only a bug lands here
            self._drop(1, f"serialise:{type(exc).__name__}", repr(exc))
            return None
        self.repaired += 1
        return data

    def _drop(self, count: int, kind: str, message: str) -> None:
        self.dropped += count
        if kind not in self._failures_seen:  # once per kind: a full disk must not flood logs
            self._failures_seen.add(kind)
            _log.error("trace records dropped", extra={
                "failure": kind, "error": message, "trace_path": str(self.path),
                "dropped": self.dropped})


def _at_rest(record: dict[str, Any]) -> dict[str, Any]:
    """`record` as it may be written: secrets redacted (API keys, e-mails, cards...), and the
    token ids of a redacted text dropped, since they would decode back to the secret. The
    record names what it dropped in `redacted`; replay does not compare those ids."""
    clean: dict[str, Any] = sanitize(record)
    if clean is record:
        return record
    dropped = []
    if clean.get("request") is not record.get("request") and record.get("prompt_token_ids"):
        clean["prompt_token_ids"] = []
        dropped.append("prompt_token_ids")
    result, original = clean.get("result"), record.get("result")
    if (isinstance(result, dict) and isinstance(original, dict) and result.get("token_ids")
            and result.get("text") != original.get("text")):
        clean["result"] = {**result, "token_ids": []}
        dropped.append("result.token_ids")
    if dropped:
        clean["redacted"] = dropped
    return clean


def json_safe(value: object, depth: int = 0) -> Any:
    """`value` as plain JSON data: str keys, finite numbers, valid Unicode; bytes and other
    objects as their repr. Used for records the fast path could not serialise."""
    if depth > _MAX_DEPTH:
        return "..."
    if value is None or isinstance(value, bool | int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else repr(value)
    if isinstance(value, str):
        return _valid_unicode(value)
    if isinstance(value, dict):
        return {_valid_unicode(k if isinstance(k, str) else repr(k)): json_safe(v, depth + 1)
                for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v, depth + 1) for v in value]
    return _valid_unicode(repr(value))


def _valid_unicode(text: str) -> str:
    # Lone surrogates (what non-UTF-8 argv or file names decode to) become U+FFFD.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogatepass").decode("utf-8", "replace")
    return text


def _failure_kind(exc: OSError) -> str:
    name = errno.errorcode.get(exc.errno or 0, "")
    return f"{type(exc).__name__}:{name}" if name else type(exc).__name__


def register_trace_metrics(meter: Meter, writer: TraceWriter) -> None:
    """`orion_fsm.trace.records` by outcome (written, dropped, repaired)."""
    from opentelemetry.metrics import Observation

    def observe(options: CallbackOptions) -> Iterable[Observation]:
        for outcome, count in writer.stats().items():
            yield Observation(count, {"outcome": outcome})

    meter.create_observable_counter(
        "orion_fsm.trace.records", callbacks=[observe], unit="{record}",
        description="Trace records written, dropped by a failing sink, or written repaired")


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
    (`upgrade_record`); refuses formats it does not know and versions newer than it knows.

    A line that is torn (a writer killed mid-line), not UTF-8, longer than `_MAX_LINE` bytes
    or with fields of the wrong type is skipped with a warning: one bad line never makes the
    rest of the file unreadable. A file that cannot be read at all is a one-line OrionError.
    """
    try:
        fh = path.open("rb")
    except FileNotFoundError:
        raise OrionError(f"no trace file {path} (yet): run a request first, or pass the "
                         "trace file to read") from None
    except IsADirectoryError:
        raise OrionError(f"{path} is a directory, not a trace file") from None
    except OSError as exc:
        raise OrionError(f"cannot read the trace file {path}: {exc.strerror or exc}") from None
    with fh:
        number = 0
        while True:
            try:
                raw = fh.readline(_MAX_LINE + 1)
            except OSError as exc:
                raise OrionError(f"cannot read the trace file {path}: "
                                 f"{exc.strerror or exc}") from None
            if not raw:
                return
            number += 1
            if len(raw) > _MAX_LINE and not raw.endswith(b"\n"):
                # Not a torn line (those are short): not a trace file, or not one of ours.
                raise OrionError(f"{path}:{number}: a line longer than {_MAX_LINE} bytes; "
                                 "not an orion-fsm trace file")
            if not raw.strip():
                continue
            try:
                record = json.loads(raw.decode("utf-8"), parse_constant=_no_constant)
            except UnicodeDecodeError:
                if number == 1 and b"\x00" in raw:
                    raise OrionError(f"{path} is not a trace file (binary data)") from None
                _skipped(path, number, "not UTF-8")
                continue
            except (ValueError, RecursionError) as exc:
                if number == 1 and not raw.lstrip().startswith(b"{"):
                    raise OrionError(f"{path}:{number}: not a JSON trace line ({exc})") from None
                _skipped(path, number, f"not a JSON trace line ({exc})")
                continue
            version = record.get("version") if isinstance(record, dict) else None
            if (not isinstance(record, dict) or record.get("format") != TRACE_FORMAT
                    or not isinstance(version, int) or not 1 <= version <= TRACE_VERSION):
                shown = record if not isinstance(record, dict) else {
                    "format": record.get("format"), "version": version}
                raise OrionError(
                    f"{path}:{number}: not an orion-fsm trace of version 1 to {TRACE_VERSION} "
                    f"({shown!r:.200}); a newer orion-fsm may read it"
                )
            if (problem := _shape_problem(record)) is not None:
                _skipped(path, number, problem)
                continue
            yield upgrade_record(record)


# A trace line is a few kB; a longer one is not ours (or `trace show /dev/zero`).
_MAX_LINE = 16 * 1024 * 1024
# Phase times beyond this (ms since the request started, ~11 days) are not a request's.
_MAX_MS = 1e9


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def _skipped(path: Path, number: int, why: str) -> None:
    _log.warning("trace line skipped", extra={"trace_path": str(path), "line": number,
                                               "reason": why})


def _number(value: object, low: float = -_MAX_MS, high: float = _MAX_MS) -> bool:
    return (isinstance(value, int | float) and not isinstance(value, bool)
            and math.isfinite(value) and low <= value <= high)


def _shape_problem(record: dict[str, Any]) -> str | None:
    """What makes `record` unusable by the readers (trace show, replay), or None."""
    for name in ("request_id", "trace_id"):
        if not isinstance(record.get(name), str | None):
            return f"{name} is not text"
    for name, kind in (("request", dict), ("result", dict), ("cache", dict | None),
                       ("model", dict | None), ("sampling", dict | None),
                       ("breakers", dict | None), ("clock", dict | None),
                       ("virtual", dict | None)):
        if name in record and not isinstance(record[name], kind):
            return f"{name} is a {type(record[name]).__name__}"
    for name in ("phases", "transitions", "spans", "prompt_token_ids"):
        if not isinstance(record.get(name, []), list):
            return f"{name} is not a list"
    redacted = record.get("redacted", [])
    if not (isinstance(redacted, list) and all(isinstance(n, str) for n in redacted)):
        return "redacted is not a list of field names"
    for i, phase in enumerate(record.get("phases", [])):
        if not (isinstance(phase, dict) and isinstance(phase.get("state"), str)
                and _number(phase.get("start_ms", 0), 0) and _number(phase.get("ms", 0), 0)):
            return f"phases[{i}] is not a phase (state, start_ms, ms)"
    for name in ("transitions", "spans"):
        for i, item in enumerate(record.get(name, [])):
            if not isinstance(item, dict):
                return f"{name}[{i}] is not an object"
    members = (record.get("virtual") or {}).get("members", [])
    if not isinstance(members, list):
        return "virtual.members is not a list"
    for i, member in enumerate(members):
        if not (isinstance(member, dict) and isinstance(member.get("agent"), str)):
            return f"virtual.members[{i}] is not a member (agent, role, state)"
    result = record.get("result", {})
    if not isinstance(result.get("state", ""), str):
        return "result.state is not text"
    for name in ("total_ms", "ttft_ms"):
        if result.get(name) is not None and not _number(result[name], 0):
            return f"result.{name} is not a duration"
    for name in ("phases", "agents_tried", "token_ids"):
        if not isinstance(result.get(name, []), list):
            return f"result.{name} is not a list"
    for name in ("routing", "tokens"):
        if not isinstance(result.get(name, {}), dict):
            return f"result.{name} is not an object"
    ids = [*record.get("prompt_token_ids", []), *result.get("token_ids", [])]
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        return "token ids are not integers"
    return None


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
        raise OrionError(f"{where} holds no trace records: run a request first, or pass the "
                         "trace file to read")
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
