"""Defaults in one place: where orion_fsm keeps its files, and the limits a request runs under.

The engine, the services and the CLI read their defaults here (httpx's `_config.py` does the
same), so a path or a limit changes in one line. Paths that depend on the environment are
functions, read at each call: the CLI and the tests set those variables at run time.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Final

__all__ = [
    "CACHE_DIR_ENV",
    "DEFAULT_CONTEXT_TOP_K",
    "DEFAULT_MAX_IN_FLIGHT",
    "DEFAULT_MAX_QUEUE",
    "DEFAULT_MEMORY_INTERVAL_S",
    "DEFAULT_TIMEOUT_S",
    "DEFAULT_TRACE_PATH",
    "TRACE_FILE_ENV",
    "caches_dir",
    "contexts_dir",
    "default_cache_dir",
    "default_trace_path",
    "repl_history_path",
    "resolve_cache_dir",
]

# --- files ----------------------------------------------------------------------------------

CACHE_DIR_ENV: Final = "ORION_FSM_CACHE"
TRACE_FILE_ENV: Final = "ORION_FSM_TRACE_FILE"
# The engine's trace file unless told otherwise; relative, so each project keeps its own.
DEFAULT_TRACE_PATH: Final = Path("traces") / "orion-fsm.jsonl"


def default_cache_dir() -> Path:
    """Where converted models and caches live: $ORION_FSM_CACHE, else the XDG cache folder
    ($XDG_CACHE_HOME, else ~/.cache) / orion-fsm."""
    env = os.environ.get(CACHE_DIR_ENV)
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return Path(base) / "orion-fsm"


def resolve_cache_dir(given: str | os.PathLike[str] | None) -> Path:
    """The cache folder a caller passed (e.g. --cache-dir), else `default_cache_dir()`."""
    return Path(given) if given else default_cache_dir()


def caches_dir(cache_dir: Path) -> Path:
    """The L1/L2/L3 result caches, one folder per level under it."""
    return cache_dir / "caches"


def contexts_dir(cache_dir: Path) -> Path:
    """The context stores, one folder per store name under it."""
    return cache_dir / "contexts"


def repl_history_path(cache_dir: Path) -> Path:
    """The `orion-fsm repl` prompt history, kept across sessions."""
    return cache_dir / "repl-history"


def default_trace_path() -> Path:
    """The CLI's trace file: $ORION_FSM_TRACE_FILE, else `DEFAULT_TRACE_PATH`."""
    return Path(os.environ.get(TRACE_FILE_ENV) or DEFAULT_TRACE_PATH)


# --- limits ---------------------------------------------------------------------------------

DEFAULT_TIMEOUT_S: Final = 60.0  # per request, queueing excluded
DEFAULT_MAX_IN_FLIGHT: Final = 64  # requests running at once
DEFAULT_MAX_QUEUE: Final = 1024  # requests waiting for a slot; past it: Overloaded
DEFAULT_MEMORY_INTERVAL_S: Final = 30.0  # between two samples of the memory monitor
DEFAULT_CONTEXT_TOP_K: Final = 8  # chunks retrieved per request; as many as fit go in
