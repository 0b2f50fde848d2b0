"""Structured logs on the standard `logging` module: JSON lines (or key=value for development),
each carrying the request and trace ids, with secrets and personal data redacted.

`LogListener` logs each transition of a request machine; phases never log transitions themselves.
"""

from __future__ import annotations

import json as _json
import logging
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from typing import IO, Any, Final

from orion_fsm._exceptions import ConfigurationError
from orion_fsm.services.observability._sanitize import sanitize, sanitize_text

__all__ = [
    "JsonFormatter",
    "KeyValueFormatter",
    "LogListener",
    "RequestContextFilter",
    "configure_logging",
    "get_logger",
    "request_context",
]

ROOT_LOGGER: Final = "orion_fsm"
LEVELS: Final[Mapping[str, int]] = {
    "DEBUG": logging.DEBUG, "INFO": logging.INFO, "WARN": logging.WARNING,
    "WARNING": logging.WARNING, "ERROR": logging.ERROR, "CRITICAL": logging.CRITICAL,
}
# Our logs say WARN; the stdlib's level stays WARNING so other libraries' logs are unchanged.
_LEVEL_NAMES: Final[Mapping[int, str]] = {
    logging.DEBUG: "DEBUG", logging.INFO: "INFO", logging.WARNING: "WARN",
    logging.ERROR: "ERROR", logging.CRITICAL: "CRITICAL",
}
# Attributes every LogRecord has: anything else on a record came from `extra=`.
_RECORD_ATTRS: Final = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message", "asctime", "request_id", "trace_id", "taskName"}

_request_id: ContextVar[str | None] = ContextVar("orion_fsm_request_id", default=None)
_trace_id: ContextVar[str | None] = ContextVar("orion_fsm_trace_id", default=None)


@contextmanager
def request_context(request_id: str | None, trace_id: str | None = None) -> Iterator[None]:
    """Every log record made inside the block (in this task) carries these ids."""
    request_token = _request_id.set(request_id)
    trace_token = _trace_id.set(trace_id)
    try:
        yield
    finally:
        _trace_id.reset(trace_token)
        _request_id.reset(request_token)


class RequestContextFilter(logging.Filter):
    """Adds `request_id` and `trace_id` from the task's context unless `extra=` set them.

    Installed on the handler, not a logger: a logger's filters skip records from its children.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "request_id", None) is None:
            record.request_id = _request_id.get()
        if getattr(record, "trace_id", None) is None:
            record.trace_id = _trace_id.get()
        return True


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in record.__dict__.items() if k not in _RECORD_ATTRS}


def _timestamp(created: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created)) + \
        f".{int(created % 1 * 1000):03d}Z"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, event, request_id, trace_id, then extras."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": _timestamp(record.created),
            "level": _LEVEL_NAMES.get(record.levelno, record.levelname),
            "logger": record.name,
            "event": record.getMessage(),
            "request_id": getattr(record, "request_id", None),
            "trace_id": getattr(record, "trace_id", None),
        }
        out.update(_fields(record))
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            out["stack"] = record.stack_info
        return _json.dumps(sanitize(out), ensure_ascii=False, default=str,
                           separators=(",", ":"))


class KeyValueFormatter(logging.Formatter):
    """Readable lines for development: `12:00:01.123 INFO  logger event key=value ...`."""

    def __init__(self, *, location: bool = False) -> None:
        super().__init__()
        self.location = location

    def format(self, record: logging.LogRecord) -> str:
        clock = time.strftime("%H:%M:%S", time.localtime(record.created))
        level = _LEVEL_NAMES.get(record.levelno, record.levelname)
        parts = [f"{clock}.{int(record.created % 1 * 1000):03d}", f"{level:<5}", record.name,
                 sanitize_text(record.getMessage())]
        fields = {"request_id": getattr(record, "request_id", None),
                  "trace_id": getattr(record, "trace_id", None), **_fields(record)}
        for key, value in sanitize(fields).items():
            if value is None:
                continue
            shown = value if isinstance(value, str) and value and " " not in value \
                and '"' not in value else _json.dumps(value, ensure_ascii=False, default=str)
            parts.append(f"{key}={shown}")
        if self.location:
            parts.append(f"at={record.module}:{record.lineno}")
        line = " ".join(parts)
        if record.exc_info:
            line += "\n" + sanitize_text(self.formatException(record.exc_info))
        return line


def get_logger(name: str) -> logging.Logger:
    """A logger under the `orion_fsm` namespace (where `configure_logging` puts its handler)."""
    if name != ROOT_LOGGER and not name.startswith(ROOT_LOGGER + "."):
        name = f"{ROOT_LOGGER}.{name}"
    return logging.getLogger(name)


def configure_logging(level: str | int = "INFO", json: bool = True, verbose: bool = False,
                      stream: IO[str] | None = None) -> logging.Handler:
    """Send orion_fsm's logs to `stream` (default stderr). Call again to reconfigure.

    `json=True`: one JSON object per line. `verbose=True` (development): readable key=value
    lines with the source location (pair it with level="DEBUG"). Only the `orion_fsm` logger
    is touched, never the root logger: the application owns that.
    """
    if isinstance(level, str):
        try:
            levelno = LEVELS[level.upper()]
        except KeyError:
            raise ConfigurationError("log level", level,
                                     "one of DEBUG, INFO, WARN, ERROR, CRITICAL") from None
    else:
        levelno = level
    logger = logging.getLogger(ROOT_LOGGER)
    for old in [h for h in logger.handlers if getattr(h, "_orion_fsm", False)]:
        logger.removeHandler(old)
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler._orion_fsm = True  # type: ignore[attr-defined]
    handler.setFormatter(KeyValueFormatter(location=True) if verbose
                         else JsonFormatter() if json else KeyValueFormatter())
    handler.addFilter(RequestContextFilter())
    logger.addHandler(handler)
    logger.setLevel(levelno)
    # Our handler prints them; propagating would print each record twice under a root handler.
    logger.propagate = False
    return handler


class LogListener:
    """Listener of one request machine: each entered state is an INFO `transition` event.

    Whether INFO is enabled is read once: when it is not, the hook costs one attribute test.
    """

    __slots__ = ("_logger", "_source", "enabled", "request_id", "trace_id")

    def __init__(self, logger: logging.Logger, request_id: str, trace_id: str) -> None:
        self._logger = logger
        self.request_id = request_id
        self.trace_id = trace_id
        self.enabled = logger.isEnabledFor(logging.INFO)
        self._source: str | None = None

    # python-statemachine listener hook: called once per entered state, in order.
    def on_enter_state(self, event: Any, target: Any) -> None:
        if not self.enabled:
            return
        state = target.id
        source, self._source = self._source, state
        if source is None:
            return  # entering the initial state is not a transition
        self._logger.info("transition", extra={
            "request_id": self.request_id, "trace_id": self.trace_id,
            "trigger": str(event), "source": source, "target": state})
