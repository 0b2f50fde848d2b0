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
    "API_KEY_ENV",
    "CACHE_DIR_ENV",
    "DEFAULT_BATCH_WINDOW_MS",
    "DEFAULT_CONTEXT_TOP_K",
    "DEFAULT_FEEDBACK_RECENT",
    "DEFAULT_HTTP_HOST",
    "DEFAULT_HTTP_PORT",
    "DEFAULT_MAX_BODY_BYTES",
    "DEFAULT_MAX_IN_FLIGHT",
    "DEFAULT_MAX_QUEUE",
    "DEFAULT_MEMORY_INTERVAL_S",
    "DEFAULT_SHUTDOWN_GRACE_S",
    "DEFAULT_STREAM_INTERVAL_MS",
    "DEFAULT_TIMEOUT_S",
    "DEFAULT_TRACE_KEEP",
    "DEFAULT_TRACE_MAX_BYTES",
    "DEFAULT_TRACE_PATH",
    "FEEDBACK_FILE_ENV",
    "MAX_CONTEXT_TOP_K",
    "PRIORITY_RANGE",
    "SERVER_ENV",
    "TRACE_FILE_ENV",
    "caches_dir",
    "contexts_dir",
    "default_cache_dir",
    "default_feedback_path",
    "default_state_dir",
    "default_trace_path",
    "models_dir",
    "repl_history_path",
    "resolve_cache_dir",
    "tuned_models_dir",
    "user_registry_path",
]

# --- files ----------------------------------------------------------------------------------

CACHE_DIR_ENV: Final = "ORION_FSM_CACHE"
TRACE_FILE_ENV: Final = "ORION_FSM_TRACE_FILE"
# The trace file under the state folder (`default_trace_path()`); never the working directory.
DEFAULT_TRACE_PATH: Final = Path("traces") / "orion-fsm.jsonl"
# A trace file past this size is rotated (orion-fsm.jsonl -> orion-fsm.1.jsonl -> ...), and
# this many rotated files are kept: the traces of a busy engine stay bounded.
DEFAULT_TRACE_MAX_BYTES: Final = 32 * 1024 * 1024
DEFAULT_TRACE_KEEP: Final = 4


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


def models_dir(cache_dir: Path) -> Path:
    """Models made by `orion-fsm models quantize|merge|shard` when no --output is given."""
    return cache_dir / "models"


def contexts_dir(cache_dir: Path) -> Path:
    """The context stores, one folder per store name under it."""
    return cache_dir / "contexts"


def repl_history_path(cache_dir: Path) -> Path:
    """The `orion-fsm repl` prompt history, kept across sessions."""
    return cache_dir / "repl-history"


def default_state_dir() -> Path:
    """Where orion_fsm keeps what it records: the XDG state folder ($XDG_STATE_HOME, else
    ~/.local/state) / orion-fsm."""
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(Path.home(), ".local", "state")
    return Path(base) / "orion-fsm"


def default_trace_path() -> Path:
    """The trace file of the engine and the CLI: $ORION_FSM_TRACE_FILE, else
    `DEFAULT_TRACE_PATH` under `default_state_dir()`."""
    env = os.environ.get(TRACE_FILE_ENV)
    return Path(env) if env else default_state_dir() / DEFAULT_TRACE_PATH


FEEDBACK_FILE_ENV: Final = "ORION_FSM_FEEDBACK_FILE"
# Answers a rating can name (engine.feedback, /good, POST /v1/feedback): the most recent ones.
DEFAULT_FEEDBACK_RECENT: Final = 1024


def default_feedback_path() -> Path:
    """The feedback store: $ORION_FSM_FEEDBACK_FILE, else feedback.sqlite3 under
    `default_state_dir()`."""
    env = os.environ.get(FEEDBACK_FILE_ENV)
    return Path(env) if env else default_state_dir() / "feedback.sqlite3"


def tuned_models_dir(cache_dir: Path) -> Path:
    """Models `orion-fsm models tune` wrote, one folder per tuned model under it."""
    return cache_dir / "tuned"


def user_registry_path(cache_dir: Path) -> Path:
    """The registry tuned variants are added to unless another is named: next to the cache,
    never the packaged models.json."""
    return cache_dir / "models.user.json"


# --- limits ---------------------------------------------------------------------------------

DEFAULT_TIMEOUT_S: Final = 60.0  # per request, queueing excluded
DEFAULT_MAX_IN_FLIGHT: Final = 64  # requests running at once
DEFAULT_MAX_QUEUE: Final = 1024  # requests waiting for a slot; past it: Overloaded
# Routing embeddings of a burst wait up to this for one another (a lone request never waits).
DEFAULT_BATCH_WINDOW_MS: Final = 50.0
# A stream hands out text at most this often after its first token (what was made meanwhile
# comes as one chunk): each chunk costs the event loop a wake-up and a worker-thread hop, CPU
# ggml's threads need on a 2-core machine (README, llama_cpp figures). 0: every token at once.
DEFAULT_STREAM_INTERVAL_MS: Final = 20.0
PRIORITY_RANGE: Final = (-1000, 1000)  # infer/stream `priority=`, lower served first
DEFAULT_MEMORY_INTERVAL_S: Final = 30.0  # between two samples of the memory monitor


# --- the HTTP server (orion-fsm serve) and its clients ----------------------------------------

DEFAULT_HTTP_HOST: Final = "127.0.0.1"  # loopback: another address needs an API key
DEFAULT_HTTP_PORT: Final = 8088
DEFAULT_MAX_BODY_BYTES: Final = 1 << 20
DEFAULT_SHUTDOWN_GRACE_S: Final = 30  # on SIGTERM, before in-flight requests are cancelled
API_KEY_ENV: Final = "ORION_FSM_API_KEY"
SERVER_ENV: Final = "ORION_FSM_SERVER"  # the CLI's --server

# A generation yielding no token for this long is abandoned as stalled (at least; an agent's
# default is 20 x its measured time per token). Its prompt gets this much per 64-token chunk.
DEFAULT_STALL_FLOOR_S: Final = 5.0
STALL_TOKENS_FACTOR: Final = 20

DEFAULT_CONTEXT_TOP_K: Final = 8  # chunks retrieved per request; as many as fit go in
MAX_CONTEXT_TOP_K: Final = 64  # a request's context_top_k: beyond, no window holds them
