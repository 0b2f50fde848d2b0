"""The request statechart, loaded once from `machines/request.scxml` and bound to the phases.

The document owns states and transitions; this module checks that every phase it names has a
callback (and every callback a state), so a renamed state fails at start-up, not mid-request,
and keeps finished machines for reuse (`MachinePool`).
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Protocol

from ._exceptions import OrionError
from ._phases import PHASES, STREAMING_PHASES
from ._resources import data_file

if TYPE_CHECKING:
    from statemachine import StateChart

INITIAL_STATE = "idle"
FINAL_STATES = frozenset({"success", "error"})
# Enough for the requests running at once on this kind of machine; more are built, not kept.
_POOL_SIZE: Final = 256


@functools.cache
def request_chart(path: Path | None = None) -> type[StateChart[Any]]:
    """The request machine class. Built once: instances are what each request pays for."""
    # Imported on first use: python-statemachine costs ~45 ms of `import orion_fsm`.
    from statemachine.io import load

    source = path or data_file("machines", "request.scxml")
    try:
        chart: type[StateChart[Any]] = load(source)
    except OSError as exc:
        raise OrionError(f"cannot read the statechart {source}: {exc.strerror}; pass the path "
                         "of an SCXML file") from None
    except Exception as exc:  # the XML parser, SCXML reader and chart builder each have theirs
        why = " ".join(f"{type(exc).__name__}: {exc}".split())[:300]
        raise OrionError(f"statechart {source} is not a usable SCXML chart ({why}); start "
                         "from machines/request.scxml") from None
    states = {s.id for s in chart.states}
    bound = set(PHASES) | set(STREAMING_PHASES)
    missing = states - FINAL_STATES - {INITIAL_STATE} - bound
    unknown = bound - states
    finals = {s.id for s in chart.states if s.final}
    if missing or unknown or not finals >= FINAL_STATES:
        raise OrionError(
            f"statechart {source} does not match the engine's phases: states without a phase "
            f"callback {sorted(missing)}, callbacks without a state {sorted(unknown)}, "
            f"final states must include {sorted(FINAL_STATES)}"
        )
    return chart


class StateListener(Protocol):
    """What a request's listeners (telemetry, logs) hear from its machine."""

    def on_enter_state(self, event: Any, target: Any) -> None: ...


class _Relay:
    """The one listener a pooled machine is built with: forwards to this request's listeners."""

    __slots__ = ("listeners",)

    def __init__(self) -> None:
        self.listeners: Sequence[StateListener] = ()

    def on_enter_state(self, event: Any, target: Any) -> None:
        for listener in self.listeners:
            listener.on_enter_state(event, target)


class MachinePool:
    """Request machines for reuse. A python-statemachine instance costs ~0.2 ms to build (its
    callbacks are resolved per instance) and caches resolved callback signatures per instance:
    a machine that reached a final state is reset and serves the next request.

    Reset uses the documented low-level `current_state_value` setter and
    `activate_initial_state()`, plus one internal, the engine's `running` flag (cleared on
    reaching a final state); pyproject pins python-statemachine to 3.2.x and
    tests/test_machine.py checks that a reused machine walks exactly as a new one.
    """

    __slots__ = ("_chart", "_free")

    def __init__(self, chart: type[StateChart[Any]]) -> None:
        self._chart = chart
        self._free: list[tuple[StateChart[Any], _Relay]] = []

    @contextmanager
    def machine(self, listeners: Sequence[StateListener]) -> Iterator[StateChart[Any]]:
        """A machine in its initial state, whose entries `listeners` hear (the initial one
        included); kept for reuse after the block if it ended in a final state."""
        if self._free:
            machine, relay = self._free.pop()
            relay.listeners = listeners
            machine._engine.running = True  # the one internal a reset needs (see above)
            machine.current_state_value = None
            machine.activate_initial_state()
        else:
            relay = _Relay()
            relay.listeners = listeners
            machine = self._chart(listeners=[relay])
        try:
            yield machine
        finally:
            relay.listeners = ()
            # A machine left mid-way (a bug, a crash in a listener) is dropped, not reset.
            if machine.is_terminated and len(self._free) < _POOL_SIZE:
                self._free.append((machine, relay))
