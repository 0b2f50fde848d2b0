"""The work of each phase of the request machine (machines/request.scxml).

A phase is an async callback named after its state, `phase(services, state) -> event`: the
engine-wide `Services` are built once, the `RequestState` holds only what this request found.
Resources a request takes (L1 leadership, an attempt's breaker permit and model lease) are
entered on its exit stacks and released by leaving them. `state.notes` are span attributes
only; `inferencing` yields text as it is generated and ends with its `Next` event.
"""

from __future__ import annotations

from collections.abc import Mapping

from ._fallback import fallback
from ._fusing import fusing
from ._generation import inferencing
from ._loading import loading_agent
from ._members import serving_virtual
from ._output import checking_output
from ._retrieving import retrieving
from ._routing import routing
from ._state import Next, PhaseFn, Region, RequestState, Services, StreamingPhaseFn
from ._validating import validating

__all__ = ["PHASES", "STREAMING_PHASES", "Next", "Region", "RequestState", "Services"]

# Bound to the statechart's states by name (see _machine.request_chart).
PHASES: Mapping[str, PhaseFn] = {
    "validating": validating,
    "routing": routing,
    "retrieving": retrieving,
    "loading_agent": loading_agent,
    "checking_output": checking_output,
    "fallback": fallback,
}
STREAMING_PHASES: Mapping[str, StreamingPhaseFn] = {
    "inferencing": inferencing,
    # A parallel state: its regions' events come from the phase as its members progress.
    "serving_virtual": serving_virtual,
    "fusing": fusing,
}
