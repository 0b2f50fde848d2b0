"""The memory tier of a cache level: a bounded dict with hybrid LFU+LRU eviction and TTLs.

Only the event-loop thread touches it, so it takes no locks; every read is a plain sync call.
"""

from __future__ import annotations

import heapq
import sys
from typing import Any, Generic, TypeVar

from orion_fsm._clock import Clock
from orion_fsm._exceptions import ConfigurationError

V = TypeVar("V")

# Score = accesses / age. An entry touched this very instant has age 0: this floor keeps the
# score finite while still ranking it above any entry that has been idle for a measurable time.
_MIN_AGE_S = 1e-6
EVICT_FRACTION = 0.2


class _Entry(Generic[V]):
    __slots__ = ("accesses", "expires_at", "last_access", "nbytes", "value")

    def __init__(self, value: V, now: float, expires_at: float | None, nbytes: int) -> None:
        self.value = value
        self.accesses = 1
        self.last_access = now
        self.expires_at = expires_at
        self.nbytes = nbytes


_FLAT = frozenset({int, float, str, bool, type(None)})


def estimate_bytes(value: object, _depth: int = 0, _seen: set[int] | None = None) -> int:
    """Approximate memory held by `value`: numpy arrays by `nbytes` plus their header,
    containers by `sys.getsizeof` of the container and, recursively, of what they hold."""
    size = sys.getsizeof(value)
    nbytes = getattr(value, "nbytes", None)
    if isinstance(nbytes, int):  # a numpy array: duck-typed so numpy is not imported here
        # getsizeof already counts the buffer of an array that owns it, not of a view.
        owns = getattr(value, "base", None) is None and size >= nbytes
        return size if owns else size + nbytes
    # Deep enough for results, token-id tuples and routing dicts; cycles counted once.
    if _depth >= 6 or not isinstance(value, dict | list | tuple | set | frozenset):
        return size
    if isinstance(value, tuple | list) and all(type(item) in _FLAT for item in value):
        # Token ids: 40,000 of them cost 60 ms one recursive call each, on the event loop;
        # at C speed through map, about 1 ms.
        return size + sum(map(sys.getsizeof, value))
    seen = _seen if _seen is not None else set()
    if id(value) in seen:
        return 0
    seen.add(id(value))
    items: Any = value.items() if isinstance(value, dict) else ((item,) for item in value)
    for pair in items:
        for item in pair:
            size += estimate_bytes(item, _depth + 1, seen)
    return size


class MemoryTier(Generic[V]):
    """At most `capacity` entries. When full, expired entries go first; if none did, the
    lowest-scoring fifth (score = accesses / seconds since last access) goes in one go."""

    def __init__(self, capacity: int, ttl_s: float | None, clock: Clock) -> None:
        if capacity < 1:
            raise ConfigurationError("memory_entries", capacity, "at least 1")
        self.capacity = capacity
        self.ttl_s = ttl_s
        self._clock = clock
        self._entries: dict[str, _Entry[V]] = {}
        self.nbytes = 0
        self.evictions = 0
        self.expirations = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def get(self, key: str) -> V | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        now = self._clock.monotonic()
        if entry.expires_at is not None and now >= entry.expires_at:
            self._drop(key)
            self.expirations += 1
            return None
        entry.accesses += 1
        entry.last_access = now
        return entry.value

    def put(self, key: str, value: V, *, ttl_s: float | None = None) -> None:
        """Store `value`; `ttl_s` overrides the tier's TTL (a disk entry's remaining life)."""
        now = self._clock.monotonic()
        ttl = self.ttl_s if ttl_s is None else ttl_s
        expires_at = None if ttl is None else now + ttl
        old = self._entries.get(key)
        if old is None and len(self._entries) >= self.capacity:
            self._make_room(now)
        entry = _Entry(value, now, expires_at, estimate_bytes(key) + estimate_bytes(value))
        if old is not None:
            entry.accesses = old.accesses + 1
            self.nbytes -= old.nbytes
        self._entries[key] = entry
        self.nbytes += entry.nbytes

    def clear(self) -> None:
        self._entries.clear()
        self.nbytes = 0

    def _drop(self, key: str) -> None:
        self.nbytes -= self._entries.pop(key).nbytes

    def _make_room(self, now: float) -> None:
        expired = [k for k, e in self._entries.items()
                   if e.expires_at is not None and now >= e.expires_at]
        for key in expired:
            self._drop(key)
        self.expirations += len(expired)
        if len(self._entries) < self.capacity:
            return
        count = max(1, int(self.capacity * EVICT_FRACTION))

        def score(item: tuple[str, _Entry[V]]) -> tuple[float, float]:
            entry = item[1]
            # Ties (same score) go least recently used first; then insertion order.
            return entry.accesses / max(now - entry.last_access, _MIN_AGE_S), entry.last_access

        for key, _ in heapq.nsmallest(count, self._entries.items(), key=score):
            self._drop(key)
        self.evictions += count
