"""The requests running in their callers' tasks, so that leaving `async with Engine` can end
them: each caller's await of a request runs in a cancel scope registered here."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Final

import anyio

# How long the Engine's exit waits for cancelled requests to reach their final state and
# submit their trace line; a generation stuck in native code is abandoned by its own watchdog.
SHUTDOWN_WAIT_S: Final = 10.0


class InFlight:
    """Cancel scopes of the requests being awaited; `close()` cancels them and waits."""

    __slots__ = ("_drained", "_scopes", "closing")

    def __init__(self) -> None:
        self._scopes: set[anyio.CancelScope] = set()
        self._drained: anyio.Event | None = None
        self.closing = False  # set once the Engine is leaving: a cancellation is a shutdown

    def __len__(self) -> int:
        return len(self._scopes)

    @contextmanager
    def scope(self) -> Iterator[anyio.CancelScope]:
        """Run one await of a request; once the Engine is closing it is cancelled at once,
        so a stream resumed after the exit ends (with its trace line) instead of running."""
        scope = anyio.CancelScope()
        if self.closing:
            scope.cancel()
        self._scopes.add(scope)
        try:
            with scope:
                yield scope
        finally:
            self._scopes.discard(scope)
            if not self._scopes and self._drained is not None:
                self._drained.set()

    async def close(self, wait_s: float = SHUTDOWN_WAIT_S) -> None:
        """Cancel every request in flight and wait (shielded, bounded) until each has left."""
        self.closing = True
        if not self._scopes:
            return
        self._drained = anyio.Event()
        for scope in list(self._scopes):
            scope.cancel()
        with anyio.move_on_after(wait_s, shield=True):
            await self._drained.wait()
