"""Single-flight: concurrent callers asking for the same key share one computation."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Hashable
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
    inherit its cancellation: one of them runs `fn` again.
    """

    def __init__(self) -> None:
        self._flights: dict[Hashable, _Flight[T]] = {}

    def in_flight(self, key: Hashable) -> bool:
        return key in self._flights

    async def run(self, key: Hashable, fn: Callable[[], Awaitable[T]]) -> T:
        while True:
            flight = self._flights.get(key)
            if flight is None:
                break
            await flight.done.wait()
            if flight.error is None:
                return flight.value  # type: ignore[return-value]
            if not isinstance(flight.error, anyio.get_cancelled_exc_class()):
                raise flight.error
        flight = _Flight[T]()
        self._flights[key] = flight
        try:
            flight.value = await fn()
            return flight.value
        except BaseException as exc:
            flight.error = exc
            raise
        finally:
            del self._flights[key]
            flight.done.set()
