"""Admission: a bounded number of requests in flight, a bounded priority queue, and deadlines.

Past the queue limit a request fails at once with `Overloaded`, it never waits unbounded.
`Deadline` is the per-request timeout the engine maps to the machine's `abort` (reason timeout).
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import anyio
from anyio.lowlevel import cancel_shielded_checkpoint, checkpoint_if_cancelled

from orion_fsm._config import DEFAULT_MAX_IN_FLIGHT, DEFAULT_MAX_QUEUE, DEFAULT_TIMEOUT_S
from orion_fsm._exceptions import ConfigurationError, Overloaded, RequestTimeout

# Overloaded and RequestTimeout live in _exceptions; re-exported for the engine's imports.
__all__ = ["AdmissionController", "Deadline", "Overloaded", "RequestTimeout", "TimeoutPolicy"]



@dataclass(order=True)
class _Waiter:
    priority: int
    seq: int
    event: anyio.Event = field(compare=False)
    granted: bool = field(default=False, compare=False)
    abandoned: bool = field(default=False, compare=False)


class AdmissionController:
    """`async with admission.slot(priority=0):` around each request.

    At most `max_in_flight` slots are held; up to `max_queue` requests wait for one, lower
    priority numbers first, first come first served within a priority. A freed slot is handed
    straight to the next waiter, so a newcomer never overtakes the queue.
    """

    def __init__(self, max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
                 max_queue: int = DEFAULT_MAX_QUEUE) -> None:
        if max_in_flight < 1:
            raise ConfigurationError("AdmissionController.max_in_flight", max_in_flight,
                                     "at least 1")
        if max_queue < 0:
            raise ConfigurationError("AdmissionController.max_queue", max_queue, "0 or more")
        self.max_in_flight = max_in_flight
        self.max_queue = max_queue
        self._in_flight = 0
        self._queued = 0
        self._heap: list[_Waiter] = []
        self._seq = itertools.count()
        self.rejected = 0

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def queued(self) -> int:
        return self._queued

    def snapshot(self) -> dict[str, Any]:
        return {"in_flight": self._in_flight, "queued": self._queued,
                "max_in_flight": self.max_in_flight, "max_queue": self.max_queue,
                "rejected": self.rejected}

    @asynccontextmanager
    async def slot(self, priority: int = 0, *,
                   request_id: str | None = None) -> AsyncIterator[None]:
        """Hold one in-flight slot for the block. Raises `Overloaded` at once if the queue is full.

        Cancelled while queued: the waiter leaves the queue and nothing is held.
        """
        await self.acquire(priority, request_id=request_id)
        try:
            yield
        finally:
            self.release()

    async def acquire(self, priority: int = 0, *, request_id: str | None = None) -> None:
        # Checked before anything is counted: a priority the heap cannot order would leave a
        # waiter behind and the counters wrong for every later request.
        if isinstance(priority, bool) or not isinstance(priority, int):
            raise ConfigurationError("priority", priority, "an integer")
        await checkpoint_if_cancelled()
        if self._in_flight < self.max_in_flight and not self._queued:
            self._in_flight += 1
            # anyio's own primitives checkpoint on the fast path too: a caller in a loop still
            # lets other tasks run.
            await cancel_shielded_checkpoint()
            return
        if self._queued >= self.max_queue:
            self.rejected += 1
            raise Overloaded(self._queued, self.max_queue, request_id=request_id)
        waiter = _Waiter(priority, next(self._seq), anyio.Event())
        heapq.heappush(self._heap, waiter)
        self._queued += 1
        try:
            await waiter.event.wait()
        except BaseException:
            if waiter.granted:
                # The slot arrived as we were cancelled: pass it on, or it is lost.
                self.release()
            else:
                waiter.abandoned = True
                self._queued -= 1
                self._compact()
            raise

    def release(self) -> None:
        """Give the slot to the next waiter, or free it."""
        while self._heap:
            waiter = heapq.heappop(self._heap)
            if waiter.abandoned:
                continue
            waiter.granted = True
            self._queued -= 1
            waiter.event.set()
            return
        self._in_flight -= 1

    def _compact(self) -> None:
        # Abandoned waiters are skipped lazily on release; a burst of cancellations (clients
        # giving up under load) must not leave the heap full of them.
        if len(self._heap) > 2 * self._queued + 16:
            self._heap = [w for w in self._heap if not w.abandoned]
            heapq.heapify(self._heap)


@dataclass(frozen=True, slots=True)
class TimeoutPolicy:
    """The per-request timeout. `start()` when the request starts; the deadline is absolute."""

    timeout_s: float = DEFAULT_TIMEOUT_S

    def __post_init__(self) -> None:
        if not isinstance(self.timeout_s, int | float) or not self.timeout_s > 0:
            raise ConfigurationError("timeout_s", self.timeout_s,
                                     "a positive number of seconds (math.inf for none)")

    def start(self) -> Deadline:
        return Deadline(anyio.current_time() + self.timeout_s, self.timeout_s)


@dataclass(frozen=True, slots=True)
class Deadline:
    """An absolute deadline on the event loop's clock (the one cancel scopes use).

    Not the engine's injectable Clock: only the loop's clock can cancel a blocked await.
    Wrap each await in `with deadline.scope() as scope:` and test `scope.cancelled_caught`;
    a cancel scope must never span a `yield` of an async generator (streaming), so the
    streaming phase scopes each chunk's await rather than the whole stream.
    """

    at: float
    timeout_s: float

    def scope(self) -> anyio.CancelScope:
        return anyio.CancelScope(deadline=self.at)

    def remaining(self) -> float:
        return max(0.0, self.at - anyio.current_time()) if math.isfinite(self.at) else math.inf

    @property
    def expired(self) -> bool:
        return anyio.current_time() >= self.at

    def error(self, phase: str | None = None, *, request_id: str | None = None) -> RequestTimeout:
        return RequestTimeout(self.timeout_s, phase, request_id=request_id)
