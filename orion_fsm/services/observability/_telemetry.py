"""OpenTelemetry for requests: one parent span per request, one child span per machine phase.

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

    def as_dict(self) -> dict[str, Any]:
        return {"event": self.event, "source": self.source, "target": self.target,
                "at_ms": round(self.at_ms, 3)}


@dataclass(frozen=True, slots=True)
class PhaseRecord:
    state: str
    start_ms: float
    ms: float
    attributes: Mapping[str, Any]

    def as_dict(self) -> dict[str, Any]:
        return {"state": self.state, "start_ms": round(self.start_ms, 3), "ms": round(self.ms, 3),
                "attributes": dict(self.attributes)}


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

    def elapsed_ms(self) -> float:
        return (self._clock.monotonic() - self.origin) * 1e3

    def _unix_ns(self, ms: float) -> int:
        return self._unix_origin_ns + int(ms * 1e6)

    # python-statemachine listener hook: called once per entered state, in order.
    def on_enter_state(self, event: Any, target: Any) -> None:
        now = self.elapsed_ms()
        state = target.id
        if self._state is not None:
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
