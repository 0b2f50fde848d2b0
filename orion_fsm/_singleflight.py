"""Single-flight: concurrent callers asking for the same key share one computation.

The one implementation in the package: model conversion and loads, cache fills and the
request path's L1 leadership all go through it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Hashable, Iterator
from contextlib import contextmanager
from typing import Generic, TypeVar

import anyio

T = TypeVar("T")


class _Flight(Generic[T]):
    __slots__ = ("done", "error", "value")

    def __init__(self) -> None:
        self.done = anyio.Event()
        self.value: T | None = None
        self.error: BaseException | None = None


class SingleFlight(Generic[T]):
    """`await flights.run(key, fn)`: the first caller runs `fn`, the others await its outcome.

    A failure reaches every waiter. If the first caller is cancelled, the waiters do not
    inherit its cancellation: one of them runs `fn` again. `lead(key)` and `wait(key)` are the
    same protocol for a leader whose work spans more than one call (a request's L1 miss is
    led from routing until the request ends).
    """

    def __init__(self) -> None:
        self._flights: dict[Hashable, _Flight[T]] = {}

    def in_flight(self, key: Hashable) -> bool:
        return key in self._flights

    async def wait(self, key: Hashable) -> bool:
        """Wait for the flight of `key` to land; False when none was in flight."""
        flight = self._flights.get(key)
        if flight is None:
            return False
        await flight.done.wait()
        return True

    @contextmanager
    def lead(self, key: Hashable) -> Iterator[None]:
        """Lead the flight of `key` for the block; waiters wake when it is left, however."""
        if key in self._flights:
            raise RuntimeError(f"a flight for {key!r} is already led: wait for it instead")
        flight = _Flight[T]()
        self._flights[key] = flight
        try:
            yield
        except BaseException as exc:
            flight.error = exc
            raise
        finally:
            del self._flights[key]
            flight.done.set()

    async def run(self, key: Hashable, fn: Callable[[], Awaitable[T]]) -> T:
        while (flight := self._flights.get(key)) is not None:
            await flight.done.wait()
            if flight.error is None:
                return flight.value  # type: ignore[return-value]
            if not isinstance(flight.error, anyio.get_cancelled_exc_class()):
                raise flight.error
        with self.lead(key):
            value = await fn()
            self._flights[key].value = value
            return value
