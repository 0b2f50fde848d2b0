"""The request statechart: loaded once, checked against the phases, and reused safely."""

from __future__ import annotations

from typing import Any

import pytest

from orion_fsm import OrionError
from orion_fsm._machine import MachinePool, request_chart

# Every path the chart allows, as events from `start` on.
PATHS = [
    ("start", "valid", "routed", "loaded", "completed"),
    ("start", "valid", "cache_hit"),
    ("start", "invalid"),
    ("start", "valid", "routed", "load_failed", "retry", "loaded", "inference_failed",
     "exhausted"),
    ("rejected",),
    ("start", "valid", "routed", "loaded", "abort"),
]


class Heard:
    def __init__(self) -> None:
        self.entries: list[tuple[str, str]] = []

    def on_enter_state(self, event: Any, target: Any) -> None:
        self.entries.append((str(event), target.id))


def walk(machine: Any, events: tuple[str, ...]) -> str:
    for event in events:
        machine.send(event)
    assert machine.is_terminated
    return str(next(iter(machine.configuration_values)))


@pytest.mark.parametrize("events", PATHS)
def test_a_reused_machine_walks_and_is_heard_exactly_as_a_new_one(
        events: tuple[str, ...]) -> None:
    chart = request_chart()
    fresh = Heard()
    expected_final = walk(chart(listeners=[fresh]), events)
    pool = MachinePool(chart)
    for other in PATHS:  # a machine that ended another way before
        with pool.machine([]) as machine:
            walk(machine, other)
    heard = Heard()
    with pool.machine([heard]) as machine:
        assert walk(machine, events) == expected_final
    assert heard.entries == fresh.entries  # the initial entry included
    assert heard.entries[0][1] == "idle"


def test_a_machine_left_mid_way_is_not_reused() -> None:
    pool = MachinePool(request_chart())
    with pytest.raises(RuntimeError), pool.machine([]) as machine:
        machine.send("start")
        raise RuntimeError("a crash mid-request")
    with pool.machine([]) as again:
        assert again is not machine
        assert list(again.configuration_values) == ["idle"]


def test_a_chart_whose_states_differ_from_the_phases_is_refused(tmp_path: Any) -> None:
    chart = tmp_path / "other.scxml"
    chart.write_text(
        '<scxml xmlns="http://www.w3.org/2005/07/scxml" version="1.0" initial="idle">'
        '<state id="idle"><transition event="start" target="thinking"/></state>'
        '<state id="thinking"><transition event="done" target="success"/></state>'
        '<final id="success"/><final id="error"/></scxml>')
    with pytest.raises(OrionError, match="thinking"):
        request_chart(chart)
