"""The L1/L2/L3 caches: per level a bounded memory tier in front of a persistent disk tier,
with single-flight misses, per-level statistics and their OpenTelemetry metrics.

L1 holds full results, L2 embeddings, L3 intermediate results (routing, prompt token ids).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import anyio

from orion_fsm._clock import Clock, SystemClock
from orion_fsm._exceptions import CacheError, ConfigurationError
from orion_fsm._singleflight import SingleFlight
from orion_fsm.services.caches._disk_tier import DiskState, DiskTier
from orion_fsm.services.caches._memory_tier import MemoryTier

if TYPE_CHECKING:
    from numpy.typing import NDArray
    from opentelemetry.metrics import CallbackOptions, Meter, Observation

__all__ = [
    "LEVELS",
    "CacheConfig",
    "CacheSet",
    "CacheStats",
    "TieredCache",
    "cache_key",
    "register_cache_metrics",
]

logger = logging.getLogger("orion_fsm.cache")

V = TypeVar("V")
LEVELS = ("l1", "l2", "l3")
_MIB = 1024 * 1024
# A disk tier failing this many times in a row is dropped for the rest of the run: each
# failure costs a thread hop and a log line, and the memory tier still serves.
_MAX_CONSECUTIVE_DISK_ERRORS = 5
# SQLite serialises writers anyway; a few threads per level keep reads parallel without
# draining the shared worker pool that generation also needs.
_DISK_THREADS_PER_LEVEL = 4


@dataclass(frozen=True, slots=True)
class CacheConfig:
    """Sizes and lifetime of one cache level. `disk_dir=None` makes the level memory-only."""

    memory_entries: int
    ttl_s: float | None
    disk_size_bytes: int = 256 * _MIB
    disk_dir: Path | None = None
    disk_entries: int | None = None  # None: bounded by disk_size_bytes alone

    def __post_init__(self) -> None:
        for name, value, expected, ok in (
            ("memory_entries", self.memory_entries, "at least 1", self.memory_entries >= 1),
            ("ttl_s", self.ttl_s, "a positive number of seconds, or None for no expiry",
             self.ttl_s is None or self.ttl_s > 0),
            ("disk_size_bytes", self.disk_size_bytes, "positive", self.disk_size_bytes > 0),
            ("disk_entries", self.disk_entries, "at least 1, or None",
             self.disk_entries is None or self.disk_entries >= 1),
        ):
            if not ok:
                raise ConfigurationError(f"CacheConfig.{name}", value, expected)

    @classmethod
    def default(cls, level: str, root: str | os.PathLike[str] | None = None) -> CacheConfig:
        """The defaults of `level` ("l1", "l2", "l3"), on disk under `root/<level>` if given."""
        try:
            config = _DEFAULTS[level.lower()]
        except KeyError:
            raise CacheError(f"unknown cache level {level!r}: use one of "
                             f"{', '.join(LEVELS)}") from None
        return replace(config, disk_dir=None if root is None else Path(root) / level.lower())


_DEFAULTS = {
    "l1": CacheConfig(memory_entries=50, ttl_s=30 * 60, disk_size_bytes=256 * _MIB,
                      disk_entries=5_000),
    "l2": CacheConfig(memory_entries=200, ttl_s=None, disk_size_bytes=64 * _MIB,
                      disk_entries=20_000),
    "l3": CacheConfig(memory_entries=100, ttl_s=60 * 60, disk_size_bytes=64 * _MIB,
                      disk_entries=10_000),
}


@dataclass(frozen=True, slots=True)
class CacheStats:
    """One level's figures. Every lookup is one of: a memory hit, a disk hit, a miss, or
    `coalesced` (a `get_or_compute` miss that waited for another caller's computation).

    `memory_bytes` is an estimate: `nbytes` for numpy arrays, else `sys.getsizeof` summed
    over the value and what it contains (six levels deep). `disk_bytes` is diskcache's
    `volume()` and `disk_entries` its count, as of the last disk write.
    """

    level: str
    memory_hits: int
    disk_hits: int
    misses: int
    coalesced: int
    evictions: int  # memory entries dropped to make room (lowest scores first)
    disk_evictions: int  # disk records dropped to stay within disk_entries
    expirations: int  # entries found past their TTL, on either tier
    memory_entries: int
    memory_capacity: int
    memory_bytes: int
    ttl_s: float | None
    disk_entries: int
    disk_bytes: int
    disk_errors: int
    disk_rejected: int  # disk records that did not decode (not ours): evicted, misses
    disk_state: DiskState  # ok | rebuilt | unavailable (memory-only after a problem) | none
    disk_problem: str | None
    disk_dir: str | None

    @property
    def hits(self) -> int:
        return self.memory_hits + self.disk_hits

    @property
    def hit_rate(self) -> float:
        lookups = self.hits + self.misses
        return self.hits / lookups if lookups else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "hits": self.hits, "hit_rate": round(self.hit_rate, 4)}


class TieredCache(Generic[V]):
    """One cache level. `get_memory` is the cheap sync path; `get` falls back to the disk
    tier in a worker thread and promotes what it finds; `set` writes both tiers.

    `None` means "not cached" and cannot be stored. The disk tier opens on first use (or
    `await cache.open()`); any disk failure is counted, logged and served as a miss.
    """

    def __init__(self, level: str, config: CacheConfig, *, clock: Clock | None = None) -> None:
        self.level = level
        self.config = config
        self._clock: Clock = clock or SystemClock()
        self._memory: MemoryTier[V] = MemoryTier(config.memory_entries, config.ttl_s,
                                                 self._clock)
        self._flights: SingleFlight[V] = SingleFlight()
        self._limiter = anyio.CapacityLimiter(_DISK_THREADS_PER_LEVEL)
        self._open_lock = anyio.Lock()
        self._opened = False
        self._disk: DiskTier | None = None
        self._disk_state: DiskState = "none"
        self._disk_problem: str | None = None
        self._memory_hits = self._disk_hits = self._misses = self._coalesced = 0
        self._disk_evictions = self._disk_expirations = 0
        self._disk_errors = self._consecutive_disk_errors = 0

    # -- lookups -----------------------------------------------------------------------------

    def get_memory(self, key: str) -> V | None:
        """The memory tier only: a dict lookup on the caller's thread, never a thread hop.
        Counts hits; a miss is counted by the `get`/`get_or_compute` that follows it."""
        value = self._memory.get(key)
        if value is not None:
            self._memory_hits += 1
        return value

    async def get(self, key: str) -> V | None:
        """Memory, else the disk tier in a worker thread (a hit is promoted into memory).
        A memory hit returns without yielding to the event loop."""
        value = self.get_memory(key)
        if value is not None:
            return value
        value = await self._get_disk(key)
        if value is None:
            self._misses += 1
        return value

    async def get_or_compute(self, key: str, fn: Callable[[], Awaitable[V]]) -> V:
        """The cached value, else `await fn()` stored under `key`. Concurrent misses of one
        key run `fn` once; the others wait for it (and get its error, if it fails)."""
        value = self.get_memory(key)
        if value is not None:
            return value
        led = False

        async def lead() -> V:
            nonlocal led
            led = True
            found = await self._get_disk(key)
            if found is not None:
                return found
            self._misses += 1
            computed = await fn()
            if computed is not None:
                await self.set(key, computed)
            return computed

        value = await self._flights.run(key, lead)
        if not led:
            self._coalesced += 1
        return value

    def put_memory(self, key: str, value: V) -> None:
        """The memory tier only, synchronously: visible to the next lookup at once. Follow it
        with `set` (e.g. in a background task) to persist the value."""
        if value is None:
            raise CacheError(f"cannot cache None under {key!r}: None means 'not cached'")
        self._memory.put(key, value)

    async def set(self, key: str, value: V) -> None:
        """Memory at once, then the disk tier in a worker thread (awaited: once this returns,
        a restart sees the value). A disk failure leaves the value in memory only."""
        if value is None:
            raise CacheError(f"cannot cache None under {key!r}: None means 'not cached'")
        self._memory.put(key, value)
        disk = await self._disk_tier()
        if disk is None:
            return
        ttl = self.config.ttl_s
        expires_at = None if ttl is None else self._clock.time() + ttl
        try:
            dropped = await anyio.to_thread.run_sync(disk.set, key, value, expires_at, ttl,
                                                     limiter=self._limiter)
        except Exception as exc:
            self._disk_failed("set", key, exc)
            return
        self._consecutive_disk_errors = 0
        self._disk_evictions += dropped

    async def _get_disk(self, key: str) -> V | None:
        disk = await self._disk_tier()
        if disk is None:
            return None
        now = self._clock.time()
        try:
            hit, expired = await anyio.to_thread.run_sync(disk.get, key, now,
                                                          limiter=self._limiter)
        except Exception as exc:
            self._disk_failed("get", key, exc)
            return None
        self._consecutive_disk_errors = 0
        if expired:
            self._disk_expirations += 1
        if hit is None:
            return None
        self._disk_hits += 1
        value: V = hit.value
        # A set() that ran while we were in the thread holds a newer value: keep it.
        if key not in self._memory:
            remaining = None if hit.expires_at is None else hit.expires_at - now
            self._memory.put(key, value, ttl_s=remaining)
        return value

    # -- lifetime ----------------------------------------------------------------------------

    async def open(self) -> None:
        """Open the disk tier (in a worker thread). Idempotent; `get`/`set` call it."""
        if self._opened:
            return
        async with self._open_lock:
            if self._opened:
                return
            directory = self.config.disk_dir
            if directory is not None:
                opening = await anyio.to_thread.run_sync(partial(
                    DiskTier.open, Path(directory), level=self.level,
                    size_limit=self.config.disk_size_bytes,
                    max_entries=self.config.disk_entries, now_unix=self._clock.time()))
                self._disk, self._disk_state = opening.tier, opening.state
                self._disk_problem = opening.problem
            self._opened = True

    async def clear(self) -> None:
        """Empty both tiers. Counters keep counting (they are monotonic for metrics)."""
        self._memory.clear()
        disk = await self._disk_tier()
        if disk is not None:
            try:
                await anyio.to_thread.run_sync(disk.clear, limiter=self._limiter)
            except Exception as exc:
                self._disk_failed("clear", None, exc)

    async def aclose(self) -> None:
        disk, self._disk, self._opened = self._disk, None, True
        if disk is not None:
            await anyio.to_thread.run_sync(disk.close, limiter=self._limiter)

    def close(self) -> None:
        """Sync close, for sync callers (closing checkpoints SQLite's log: disk I/O)."""
        disk, self._disk, self._opened = self._disk, None, True
        if disk is not None:
            disk.close()

    async def __aenter__(self) -> TieredCache[V]:
        await self.open()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.aclose()

    async def _disk_tier(self) -> DiskTier | None:
        if not self._opened:
            await self.open()
        return self._disk

    def _disk_failed(self, operation: str, key: str | None, exc: Exception) -> None:
        self._disk_errors += 1
        self._consecutive_disk_errors += 1
        extra = {"cache_level": self.level, "cache_operation": operation, "cache_key": key,
                 "cache_dir": str(self.config.disk_dir), "error": repr(exc)}
        logger.warning("cache disk tier error, served as a miss", extra=extra)
        if (self._consecutive_disk_errors >= _MAX_CONSECUTIVE_DISK_ERRORS
                and self._disk is not None):
            # Dropping the reference closes its SQLite connections when collected.
            self._disk, self._disk_state = None, "unavailable"
            self._disk_problem = (f"disabled after {self._consecutive_disk_errors} "
                                  f"consecutive errors, last: {exc!r}")
            logger.warning("cache disk tier disabled, level is memory-only", extra=extra)

    # -- figures -----------------------------------------------------------------------------

    def stats(self) -> CacheStats:
        """In-memory figures only: safe to call from the event loop or a metrics thread."""
        disk = self._disk
        return CacheStats(
            level=self.level, memory_hits=self._memory_hits, disk_hits=self._disk_hits,
            misses=self._misses, coalesced=self._coalesced, evictions=self._memory.evictions,
            disk_evictions=self._disk_evictions,
            expirations=self._memory.expirations + self._disk_expirations,
            memory_entries=len(self._memory), memory_capacity=self._memory.capacity,
            memory_bytes=self._memory.nbytes, ttl_s=self.config.ttl_s,
            disk_entries=disk.entries if disk else 0, disk_bytes=disk.nbytes if disk else 0,
            disk_errors=self._disk_errors, disk_rejected=disk.rejected if disk else 0,
            disk_state=self._disk_state,
            disk_problem=self._disk_problem,
            disk_dir=None if self.config.disk_dir is None else str(self.config.disk_dir))


class CacheSet:
    """L1 (full results), L2 (embeddings), L3 (intermediate results) under one root:
    `root/l1`, `root/l2`, `root/l3`. `root=None` keeps every level memory-only; a config
    passed for a level is used as given (its `disk_dir` decides)."""

    def __init__(self, root: str | os.PathLike[str] | None = None, *,
                 l1: CacheConfig | None = None, l2: CacheConfig | None = None,
                 l3: CacheConfig | None = None, clock: Clock | None = None) -> None:
        self.root = None if root is None else Path(root)
        clock = clock or SystemClock()
        self.l1: TieredCache[dict[str, Any]] = TieredCache(
            "l1", l1 or CacheConfig.default("l1", root), clock=clock)
        self.l2: TieredCache[NDArray[Any]] = TieredCache(
            "l2", l2 or CacheConfig.default("l2", root), clock=clock)
        self.l3: TieredCache[Any] = TieredCache(
            "l3", l3 or CacheConfig.default("l3", root), clock=clock)

    def __iter__(self) -> Iterator[TieredCache[Any]]:
        return iter((self.l1, self.l2, self.l3))

    def level(self, name: str) -> TieredCache[Any]:
        for cache in self:
            if cache.level == name.lower():
                return cache
        raise CacheError(f"unknown cache level {name!r}: use one of {', '.join(LEVELS)}")

    def stats(self) -> dict[str, CacheStats]:
        return {cache.level: cache.stats() for cache in self}

    async def clear(self, level: str | None = None) -> None:
        for cache in [self.level(level)] if level else list(self):
            await cache.clear()

    async def open(self) -> None:
        async with anyio.create_task_group() as tg:
            for cache in self:
                tg.start_soon(cache.open)

    async def aclose(self) -> None:
        for cache in self:
            await cache.aclose()

    def close(self) -> None:
        for cache in self:
            cache.close()

    async def __aenter__(self) -> CacheSet:
        await self.open()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.aclose()


def cache_key(*parts: object) -> str:
    """SHA-256 of the canonical JSON of `parts` (sorted keys, no spaces): equal parts give
    equal keys across processes. Parts must be JSON values (str, numbers, lists, dicts...)."""
    canonical = json.dumps(parts, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                           allow_nan=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def register_cache_metrics(meter: Meter, caches: Iterable[TieredCache[Any]]) -> None:
    """Observable instruments over `caches` (a CacheSet works), attribute `cache.level`;
    hits, evictions, entries and bytes also carry `cache.tier` (memory or disk)."""
    # Imported when metrics are wired, not with the module: OpenTelemetry's metrics API
    # costs ~7 ms of `import orion_fsm`.
    from opentelemetry.metrics import Observation

    levels = tuple(caches)

    def observe(*figures: tuple[str | None, str]) -> Callable[[CallbackOptions],
                                                              Iterable[Observation]]:
        def callback(options: CallbackOptions) -> Iterable[Observation]:
            for cache in levels:
                stats = cache.stats()
                for tier, field in figures:
                    attributes = {"cache.level": cache.level}
                    if tier is not None:
                        attributes["cache.tier"] = tier
                    yield Observation(getattr(stats, field), attributes)
        return callback

    meter.create_observable_counter(
        "orion.cache.hits", [observe(("memory", "memory_hits"), ("disk", "disk_hits"))],
        unit="{hit}", description="Cache lookups served, by level and tier")
    meter.create_observable_counter(
        "orion.cache.misses", [observe((None, "misses"))], unit="{miss}",
        description="Cache lookups that found nothing on either tier")
    meter.create_observable_counter(
        "orion.cache.evictions", [observe(("memory", "evictions"), ("disk", "disk_evictions"))],
        unit="{entry}", description="Entries dropped to make room")
    meter.create_observable_counter(
        "orion.cache.disk_errors", [observe((None, "disk_errors"))], unit="{error}",
        description="Disk-tier failures served as misses")
    meter.create_observable_counter(
        "orion.cache.disk_rejected", [observe((None, "disk_rejected"))], unit="{entry}",
        description="Disk records that were not ours (a pickle, a hand edit): evicted, misses")
    meter.create_observable_gauge(
        "orion.cache.entries", [observe(("memory", "memory_entries"), ("disk", "disk_entries"))],
        unit="{entry}", description="Entries held, by level and tier")
    meter.create_observable_gauge(
        "orion.cache.bytes", [observe(("memory", "memory_bytes"), ("disk", "disk_bytes"))],
        unit="By", description="Bytes held (memory: estimate), by level and tier")
