"""OpenTelemetry for requests: one parent span per request, one child span per machine phase
(and under a parallel state's phase, one span per region and per state of that region).

`PhaseRecorder` is a listener attached to each request's state machine: it opens and closes
the spans on state entry, and keeps the timeline (transitions, phase timings, span records)
that the trace file stores. Phases never touch spans; they leave their results in `notes`;
the driver ends the request span with `finish(attributes)` once the machine is final.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, Tracer

from orion_fsm._clock import Clock

INSTRUMENTATION_NAME = "orion_fsm"
_FINAL_STATES = frozenset({"success", "error"})
AttributeValue = str | bool | int | float | list[str] | list[int] | list[float]


def resolve_tracer(provider: trace.TracerProvider | None = None) -> Tracer:
    """The application's tracer provider if it set one; otherwise one of the engine's own.

    The engine never replaces a global provider: an app that configured OpenTelemetry keeps
    its exporters; an app that did not still gets valid span and trace ids.
    """
    if provider is None:
        current = trace.get_tracer_provider()
        if isinstance(current, trace.ProxyTracerProvider):
            # The SDK only for this fallback: an app with its own provider never loads it.
            from opentelemetry.sdk.resources import Resource
            from opentelemetry.sdk.trace import TracerProvider

            service = os.environ.get("OTEL_SERVICE_NAME", "orion-fsm")
            provider = TracerProvider(resource=Resource.create({"service.name": service}))
        else:
            provider = current
    return provider.get_tracer(INSTRUMENTATION_NAME)


@dataclass(frozen=True, slots=True)
class Transition:
    event: str
    source: str
    target: str
    at_ms: float
    region: str | None = None  # a region of a parallel state, moving on its own

    def as_dict(self) -> dict[str, Any]:
        return {"event": self.event, "source": self.source, "target": self.target,
                "at_ms": round(self.at_ms, 3),
                **({} if self.region is None else {"region": self.region})}


@dataclass(frozen=True, slots=True)
class PhaseRecord:
    state: str
    start_ms: float
    ms: float
    attributes: Mapping[str, Any]

    def as_dict(self) -> dict[str, Any]:
        return {"state": self.state, "start_ms": round(self.start_ms, 3), "ms": round(self.ms, 3),
                "attributes": dict(self.attributes)}


@dataclass(eq=False, slots=True)
class _OpenRegion:
    """A region of the parallel state the request is in: its span, its current state's."""

    span: Span
    start_ms: float
    state: str | None = None
    state_span: Span | None = None
    state_start: float = 0.0


def _clean(value: Any) -> AttributeValue:
    """OpenTelemetry attributes take scalars and homogeneous lists only."""
    if isinstance(value, str | bool | int | float):
        return value
    if isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
        return [str(v) for v in value]
    return str(value)


class PhaseRecorder:
    """Listener of one request machine: spans, transitions and phase timings.

    `notes` is shared with the phase code: a phase writes what it found (agent chosen, tokens
    counted); on leaving the state the recorder moves it onto the phase's span and record.
    """

    __slots__ = (
        "_clock",
        "_final",
        "_phase_span",
        "_phase_start",
        "_region_notes",
        "_region_phases",
        "_regions",
        "_request_ctx",
        "_request_span",
        "_state",
        "_tracer",
        "_unix_origin_ns",
        "notes",
        "origin",
        "phases",
        "request_id",
        "spans",
        "trace_id",
        "transitions",
    )

    def __init__(self, tracer: Tracer, clock: Clock, request_id: str,
                 attributes: Mapping[str, Any]) -> None:
        self._tracer = tracer
        self._clock = clock
        self.origin = clock.monotonic()
        self._unix_origin_ns = int(clock.time() * 1e9)
        self.request_id = request_id
        self._request_span: Span = tracer.start_span(
            "orion.request", kind=SpanKind.INTERNAL, start_time=self._unix_origin_ns,
            attributes={"orion.request.id": request_id,
                        **{k: _clean(v) for k, v in attributes.items()}},
        )
        span_context = self._request_span.get_span_context()
        # A non-recording provider gives invalid ids; the trace file still needs one.
        self.trace_id = (format(span_context.trace_id, "032x") if span_context.is_valid
                         else secrets.token_hex(16))
        self._request_ctx: Context = trace.set_span_in_context(self._request_span)
        self._state: str | None = None
        self._phase_span: Span | None = None
        self._phase_start = 0.0
        self.notes: dict[str, Any] = {}
        self.transitions: list[Transition] = []
        self.phases: list[PhaseRecord] = []
        self.spans: list[dict[str, Any]] = []
        self._final: tuple[str, float] | None = None  # (state, at_ms) once final
        self._regions: dict[str, _OpenRegion] = {}
        self._region_notes: dict[str, dict[str, Any]] = {}
        self._region_phases: list[tuple[str, PhaseRecord]] = []

    def elapsed_ms(self) -> float:
        return (self._clock.monotonic() - self.origin) * 1e3

    def _unix_ns(self, ms: float) -> int:
        return self._unix_origin_ns + int(ms * 1e6)

    # python-statemachine listener hook: called once per entered state, in order.
    def on_enter_state(self, event: Any, target: Any) -> None:
        now = self.elapsed_ms()
        state = target.id
        if target.parent is not None:
            self._enter_nested(str(event), target, now)
            return
        if self._state is not None:
            self._close_regions(now)
            self._close_phase(now)
            self.transitions.append(Transition(str(event), self._state, state, now))
        self._state = state
        if state == "idle":
            return
        if state in _FINAL_STATES:
            self._final = (state, now)
            return
        self._phase_start = now
        self._phase_span = self._tracer.start_span(
            state, context=self._request_ctx, start_time=self._unix_ns(now),
            attributes={"orion.request.id": self.request_id, "orion.phase": state},
        )

    def region_notes(self, region: str) -> dict[str, Any]:
        """Span attributes of the current state of `region` (a parallel state's region)."""
        return self._region_notes.setdefault(region, {})

    def region_phases(self, region: str) -> list[PhaseRecord]:
        """The states `region` went through, in order."""
        return [p for r, p in self._region_phases if r == region]

    def _enter_nested(self, event: str, target: Any, now: float) -> None:
        parent = target.parent
        if parent.parent is None:  # a region of a top-level parallel state
            context = (trace.set_span_in_context(self._phase_span)
                       if self._phase_span is not None else self._request_ctx)
            self._regions[target.id] = _OpenRegion(self._tracer.start_span(
                target.id, context=context, start_time=self._unix_ns(now),
                attributes={"orion.request.id": self.request_id, "orion.region": target.id}),
                now)
            return
        region = self._regions.get(parent.id)
        if region is None:
            return
        if region.state is not None:
            self._close_region_state(parent.id, region, now)
            self.transitions.append(Transition(event, region.state, target.id, now, parent.id))
        region.state = target.id
        region.state_start = now
        if not target.final and target.transitions:  # an end state (done, failed...) has none
            region.state_span = self._tracer.start_span(
                target.id, context=trace.set_span_in_context(region.span),
                start_time=self._unix_ns(now),
                attributes={"orion.request.id": self.request_id, "orion.region": parent.id,
                            "orion.phase": target.id})

    def _close_region_state(self, name: str, region: _OpenRegion, now: float) -> None:
        notes = self._region_notes.get(name, {})
        attributes = {k: _clean(v) for k, v in notes.items() if v is not None}
        notes.clear()
        span, region.state_span = region.state_span, None
        if span is None or region.state is None:
            return
        self._region_phases.append((name, PhaseRecord(region.state, region.state_start,
                                                      now - region.state_start, attributes)))
        span.set_attributes(attributes)
        if "error.type" in attributes or "orion.error" in attributes:
            span.set_status(Status(StatusCode.ERROR, str(attributes.get("orion.error", ""))))
        span.end(end_time=self._unix_ns(now))
        self.spans.append(_span_record(span, region.state, region.state_start, now, attributes))

    def _close_regions(self, now: float) -> None:
        """Leaving a parallel state: every region's open state, then the region itself."""
        for name, region in self._regions.items():
            self._close_region_state(name, region, now)
            region.span.end(end_time=self._unix_ns(now))
            self.spans.append(_span_record(region.span, name, region.start_ms, now,
                                           {"orion.region.final": region.state or ""}))
        self._regions.clear()

    def _close_phase(self, now: float) -> None:
        state = self._state
        if state is None or state == "idle":
            return
        attributes = {k: _clean(v) for k, v in self.notes.items() if v is not None}
        self.notes.clear()
        self.phases.append(PhaseRecord(state, self._phase_start, now - self._phase_start,
                                       attributes))
        span = self._phase_span
        if span is not None:
            span.set_attributes(attributes)
            if "error.type" in attributes:
                span.set_status(Status(StatusCode.ERROR, str(attributes.get("orion.error", ""))))
            span.end(end_time=self._unix_ns(now))
            self.spans.append(_span_record(span, state, self._phase_start, now, attributes))
            self._phase_span = None

    def finish(self, summary: Mapping[str, Any]) -> None:
        """End the request span, once the machine is final, with what the whole request
        found (agent, usage) on top of the final state's notes."""
        if self._final is None:
            raise RuntimeError("finish() before the request machine reached a final state")
        state, now = self._final
        attributes = {k: _clean(v) for k, v in {**self.notes, **summary}.items()
                      if v is not None}
        self.notes.clear()
        span = self._request_span
        span.set_attribute("orion.final_state", state)
        span.set_attributes(attributes)
        if state == "error":
            span.set_status(Status(StatusCode.ERROR, str(attributes.get("orion.error", ""))))
        span.end(end_time=self._unix_ns(now))
        self.spans.insert(0, _span_record(span, "orion.request", 0.0, now, attributes))


def _span_record(span: Span, name: str, start_ms: float, end_ms: float,
                 attributes: Mapping[str, Any]) -> dict[str, Any]:
    ctx = span.get_span_context()
    from opentelemetry.sdk.trace import ReadableSpan  # not at module level: ~4 ms of import

    parent = span.parent if isinstance(span, ReadableSpan) else None
    return {
        "name": name,
        "span_id": format(ctx.span_id, "016x") if ctx.is_valid else None,
        "parent_span_id": format(parent.span_id, "016x") if parent is not None else None,
        "start_ms": round(start_ms, 3),
        "end_ms": round(end_ms, 3),
        "attributes": dict(attributes),
    }
