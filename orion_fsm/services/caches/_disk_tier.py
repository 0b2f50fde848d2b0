"""The disk tier of a cache level: a diskcache (SQLite) directory that survives restarts.

Every method here blocks: callers run them in a worker thread. A corrupt directory is moved
aside and rebuilt empty; a location that cannot hold a cache leaves the level memory-only.
Records are data, never pickles (`_records`): a crafted database cannot run code, and an
entry that does not decode is a miss, evicted and counted (`rejected`).
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from orion_fsm._files import make_private_dirs
from orion_fsm.services.caches._records import BadRecord, decode_record, encode_record

if TYPE_CHECKING:
    import diskcache

logger = logging.getLogger("orion_fsm.cache")

DiskState = Literal["ok", "rebuilt", "unavailable", "none"]

# A reader never waits long on another process's write lock: a slow disk tier is a miss.
_SQLITE_TIMEOUT_S = 2.0
_MISSING = object()


@dataclass(frozen=True, slots=True)
class DiskHit:
    value: Any
    expires_at: float | None  # unix time from the cache's Clock, None for no TTL


@dataclass(frozen=True, slots=True)
class DiskOpening:
    """What opening a directory gave: a tier (or None) and what to report about it."""

    tier: DiskTier | None
    state: DiskState
    problem: str | None


class DiskTier:
    """One diskcache directory. Records are `(expires_at, value)`: expiry is judged by the
    injectable clock, not by diskcache's own wall-clock expiry (kept only for housekeeping)."""

    def __init__(self, cache: diskcache.Cache, *, max_entries: int | None) -> None:
        self._cache = cache
        self.directory = Path(cache.directory)
        self.max_entries = max_entries
        self.rejected = 0  # records that did not decode: evicted, served as misses
        # Last observed figures, refreshed by writes so stats() never touches the disk.
        self.entries = 0
        self.nbytes = 0
        self.refresh()

    @classmethod
    def open(cls, directory: Path, *, level: str, size_limit: int, max_entries: int | None,
             now_unix: float) -> DiskOpening:
        """Open `directory`; rebuild it empty if its database is corrupt; give up (memory-only)
        if the location cannot hold a cache. Never raises."""
        try:
            return DiskOpening(cls(_open_cache(directory, size_limit), max_entries=max_entries),
                               "ok", None)
        except Exception as exc:
            error = exc
        import sqlite3  # only to classify the failure; diskcache has loaded it by now

        # Only a database SQLite calls corrupt is moved aside: a locked or unopenable one
        # (OperationalError, OSError) may be healthy and someone else's to fix.
        corrupt = (isinstance(error, sqlite3.DatabaseError)
                   and not isinstance(error, sqlite3.OperationalError) and directory.is_dir())
        if not corrupt:
            return _unavailable(level, directory, f"cannot open {directory}: {error!r}")
        try:
            moved_to = _move_aside(directory, now_unix)
        except OSError as exc:
            return _unavailable(level, directory,
                                f"corrupt ({error!r}) and cannot be moved aside: {exc!r}")
        problem = f"corrupt ({error!r}): moved to {moved_to} and rebuilt empty"
        logger.warning("cache disk tier corrupt, rebuilt empty", extra={
            "cache_level": level, "cache_dir": str(directory), "moved_to": str(moved_to),
            "error": repr(error)})
        try:
            tier = cls(_open_cache(directory, size_limit), max_entries=max_entries)
        except Exception as exc:
            return _unavailable(level, directory, f"{problem}; reopening failed: {exc!r}")
        return DiskOpening(tier, "rebuilt", problem)

    def get(self, key: str, now_unix: float) -> tuple[DiskHit | None, bool]:
        """`(hit or None, expired)`. An expired record is deleted on the way, and so is a
        record that is not ours (a pickle, another format, a hand edit): a miss, counted."""
        try:
            stored = self._cache.get(key, default=_MISSING)
            if stored is _MISSING:
                return None, False
            expires_at, value = decode_record(stored)
        except BadRecord as exc:
            self.rejected += 1
            # Once per tier at WARN: a cache written by an older version rejects every record
            # it holds, and one line says so; the rest go to DEBUG (all are counted).
            level = logging.WARNING if self.rejected == 1 else logging.DEBUG
            logger.log(level, "cache disk record rejected, evicted", extra={
                "cache_dir": str(self.directory), "cache_key": key, "error": str(exc),
                "rejected_so_far": self.rejected})
            self._cache.delete(key)
            self.refresh()
            return None, False
        if expires_at is not None and now_unix >= expires_at:
            self._cache.delete(key)
            self.refresh()
            return None, True
        return DiskHit(value, expires_at), False

    def set(self, key: str, value: Any, expires_at: float | None, ttl_s: float | None) -> int:
        """Write one record (one SQLite transaction); returns how many old entries were
        dropped to stay within `max_entries`."""
        self._cache.set(key, encode_record(expires_at, value), expire=ttl_s)
        dropped = 0
        if self.max_entries is not None:
            excess = len(self._cache) - self.max_entries
            if excess > 0:
                # Iteration order is rowid order: the oldest stored records go first.
                try:
                    for old in list(itertools.islice(iter(self._cache), excess)):
                        dropped += int(self._cache.delete(old))
                except BadRecord:
                    # A key that is not text was not written by us: start again empty.
                    dropped += len(self._cache)
                    self._cache.clear()
        self.refresh()
        return dropped

    def clear(self) -> None:
        self._cache.clear()
        self.refresh()

    def refresh(self) -> None:
        self.entries = len(self._cache)
        self.nbytes = int(self._cache.volume())

    def close(self) -> None:
        self._cache.close()


def _open_cache(directory: Path, size_limit: int) -> diskcache.Cache:
    # When a disk tier opens (in a worker thread), not at `import orion_fsm`.
    from orion_fsm.services.caches._records import open_data_cache

    # Cached prompts and answers are the user's: the directory and its database are private.
    make_private_dirs(directory)
    directory.chmod(0o700)
    cache = open_data_cache(directory, size_limit=size_limit, timeout=_SQLITE_TIMEOUT_S)
    for name in os.listdir(directory):
        if name.startswith("cache.db"):
            (directory / name).chmod(0o600)
    return cache


def _move_aside(directory: Path, now_unix: float) -> Path:
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now_unix))
    target = directory.with_name(f"{directory.name}.corrupt-{stamp}")
    for n in itertools.count(1):
        if not target.exists():
            break
        target = directory.with_name(f"{directory.name}.corrupt-{stamp}-{n}")
    directory.rename(target)
    return target


def _unavailable(level: str, directory: Path, problem: str) -> DiskOpening:
    logger.warning("cache disk tier unavailable, level is memory-only", extra={
        "cache_level": level, "cache_dir": str(directory), "error": problem})
    return DiskOpening(None, "unavailable", problem)
