"""The request statechart, loaded once from `machines/request.scxml` and bound to the phases.

The document owns states and transitions; this module only checks that every phase it names
has a callback (and every callback a state), so a renamed state fails at start-up, not mid-request.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from statemachine import StateChart
from statemachine.io import load

from ._exceptions import OrionError
from ._phases import PHASES, STREAMING_PHASES
from ._resources import data_file

INITIAL_STATE = "idle"
FINAL_STATES = frozenset({"success", "error"})


@functools.cache
def request_chart(path: Path | None = None) -> type[StateChart[Any]]:
    """The request machine class. Built once: instances are what each request pays for."""
    source = path or data_file("machines", "request.scxml")
    chart = load(source)
    states = {s.id for s in chart.states}
    bound = set(PHASES) | set(STREAMING_PHASES)
    missing = states - FINAL_STATES - {INITIAL_STATE} - bound
    unknown = bound - states
    if missing or unknown or not states >= FINAL_STATES:
        raise OrionError(
            f"statechart {source} does not match the engine's phases: states without a phase "
            f"callback {sorted(missing)}, callbacks without a state {sorted(unknown)}, "
            f"final states must include {sorted(FINAL_STATES)}"
        )
    return chart
