"""Cores for the work that computes: each runtime call of a generation (one token, one prompt
chunk) and each embedding batch takes cores from one pool, so the threads at work never
exceed the usable cores, whatever runs at once; other processes' load shrinks the pool.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Final

__all__ = ["CpuAllotter", "CpuSnapshot", "cpu_flags", "usable_cores"]

_SAMPLE_S: Final = 0.5  # a load reading is reused this long: /proc/stat costs ~50 µs
_WAIT_POLL_S: Final = 0.05  # a waiter looks again this often (the pool shrinks on its own)
_STALE_GAP: Final = 4  # a reading over more than this many sample_s averages a quiet gap...
_STALE_RECHECK_S: Final = 0.1  # ...and is checked again this soon (100 Hz jiffies: ±0.05 core)


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity), not the machine's count."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # no affinity on macOS / Windows
        return max(1, os.cpu_count() or 1)


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (`avx2`, `avx512_bf16` …) from /proc/cpuinfo; empty where
    there is none (not Linux): callers then keep their portable choice."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            line = next((x for x in f if x.startswith("flags")), "")
    except OSError:
        return frozenset()
    return frozenset(line.partition(":")[2].split())


@dataclass(frozen=True, slots=True)
class CpuSnapshot:
    """The pool as `Engine.stats()` reports it."""

    cores: int  # usable cores
    external_busy: float  # cores other processes kept busy at the last reading
    capacity: int  # cores the pool hands out now
    in_use: int  # cores held by runtime calls right now
    consumers: int  # generations and embedding batches sharing the pool


class _ExternalLoad:
    """Cores other processes keep busy: the machine's busy time minus this process's, over
    the time between two readings (psutil), read at most every `sample_s`.

    A reading taken after a long quiet gap averages the whole gap (another process's burst
    that has ended weighs in it as much as the present): it is capped by the threads other
    processes have runnable at that instant (`running`), and checked again soon
    (`_STALE_RECHECK_S`) instead of standing for a whole `sample_s`. A request arriving just
    after another process's burst ran its first half second on one core, then its first
    0.1 s."""

    def __init__(self, sample_s: float, read: Callable[[], tuple[float, float]] | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 running: Callable[[], int | None] | None = None) -> None:
        self._sample_s = sample_s
        self._read = read or _psutil_reader()
        # A reader given without `running` (tests of the average alone): no instant reading.
        self._running = running or (_others_running if read is None else lambda: None)
        self._clock = clock
        self._lock = threading.Lock()
        self._previous = (clock(), *self._read())
        self._due = self._previous[0] + sample_s
        # Until two readings are 0.5 s apart, the 1-minute load average stands in: nothing of
        # ours runs yet, and a first chunk on every core of a busy machine would crawl.
        try:
            self.busy = os.getloadavg()[0]
        except (AttributeError, OSError):
            self.busy = 0.0

    def cores(self) -> float:
        with self._lock:
            at = self._clock()
            if at < self._due:
                return self.busy
            now = (at, *self._read())
            before, busy, own = self._previous
            wall = at - before
            stale = wall > _STALE_GAP * self._sample_s
            if wall > 0:
                self.busy = max(0.0, ((now[1] - busy) - (now[2] - own)) / wall)
                others = self._running() if stale else None
                if others is not None:
                    self.busy = min(self.busy, float(others))
            self._previous = now
            self._due = at + (_STALE_RECHECK_S if stale else self._sample_s)
            return self.busy


def _psutil_reader() -> Callable[[], tuple[float, float]]:
    """(machine busy CPU-s, this process's CPU-s), from psutil."""
    import psutil  # here, not at module level: keeps `import orion_fsm` cheap

    process = psutil.Process()

    def read() -> tuple[float, float]:
        machine = psutil.cpu_times()
        own = process.cpu_times()
        return (sum(machine) - machine.idle - getattr(machine, "iowait", 0.0),
                own.user + own.system)

    return read


def _others_running() -> int | None:
    """Threads of other processes runnable at this instant: the kernel's running count minus
    this process's threads in state R (Linux; None elsewhere). Read only after a quiet gap:
    it lists every thread of ours (~0.2 ms)."""
    try:
        with open("/proc/stat", "rb") as f:
            running = next(int(line.split()[1]) for line in f
                           if line.startswith(b"procs_running"))
        own = 0
        for task in os.listdir("/proc/self/task"):
            with contextlib.suppress(OSError), open(f"/proc/self/task/{task}/stat", "rb") as f:
                # The state follows the command name, which may itself hold ") ".
                own += f.read().rpartition(b") ")[2][:1] == b"R"
    except (OSError, StopIteration, ValueError):
        return None
    return max(0, running - own)


class _Consumer:
    """One generation's (or embedding batch's) access to the pool: a `CoreGate`."""

    __slots__ = ("_pool",)

    def __init__(self, pool: CpuAllotter) -> None:
        self._pool = pool

    def acquire(self, share: int = 1) -> int:
        return self._pool._acquire(share)

    def release(self, granted: int) -> None:
        self._pool._release(granted)


class CpuAllotter:
    """Hands cores to runtime calls, first come first served, a fair share each.

    A call gets `capacity // consumers` cores (at least 1) of those free, waiting while none
    is: one lone generation uses every core; four share two cores one each, two at a time,
    taking turns token by token (ggml's spinning barrier collapses when threads outnumber
    cores, so waiting a turn beats oversubscribing). `capacity` is the usable cores minus
    those other processes keep busy (psutil, `busy=` in tests).
    """

    def __init__(self, *, cores: int | None = None, sample_s: float = _SAMPLE_S,
                 busy: Callable[[], float] | None = None) -> None:
        self.cores = cores or usable_cores()
        self._busy = busy or _ExternalLoad(sample_s).cores
        self._cond = threading.Condition()
        self._queue: deque[object] = deque()
        self._in_use = 0
        self._consumers = 0
        self.peak_in_use = 0  # most cores held at once (tests and the bench check it)
        self.grants = 0
        self.grant_sizes: Counter[int] = Counter()  # calls per cores granted (the bench)

    def capacity(self) -> int:
        return max(1, self.cores - round(self._busy()))

    @contextmanager
    def consumer(self) -> Iterator[_Consumer]:
        """Count one generation (or batch) in the fair share while the block runs."""
        with self._cond:
            self._consumers += 1
        try:
            yield _Consumer(self)
        finally:
            with self._cond:
                self._consumers -= 1
                self._cond.notify_all()

    def snapshot(self) -> CpuSnapshot:
        return CpuSnapshot(self.cores, round(self._busy(), 2), self.capacity(), self._in_use,
                           self._consumers)

    def _acquire(self, share: int = 1) -> int:
        ticket = object()
        with self._cond:
            self._queue.append(ticket)
            try:
                while True:
                    capacity = self.capacity()
                    free = capacity - self._in_use
                    if self._queue[0] is ticket and free >= 1:
                        break
                    self._cond.wait(_WAIT_POLL_S)
            finally:
                self._queue.remove(ticket)
                self._cond.notify_all()
            # A batched call computes for `share` consumers at once: their shares together.
            granted = min(free, max(1, capacity * share // max(1, self._consumers)))
            self._in_use += granted
            self.peak_in_use = max(self.peak_in_use, self._in_use)
            self.grants += 1
            self.grant_sizes[granted] += 1
            return granted

    def _release(self, granted: int) -> None:
        with self._cond:
            self._in_use -= granted
            self._cond.notify_all()
