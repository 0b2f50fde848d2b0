"""Request metrics: one recording per finished request (final state and reason, time to first
token, phase durations, tokens) and the admission queue's depth, as OpenTelemetry instruments
on the application's MeterProvider. No reader configured: the API's no-op instruments, no cost.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from . import _attributes as attr

if TYPE_CHECKING:
    from opentelemetry.metrics import CallbackOptions, Meter, Observation

    from ..._types import Result
    from ..resilience._admission import AdmissionController

# Seconds, as the GenAI semantic conventions measure durations; buckets from 1 ms (an L1 hit)
# to a minute (the default deadline).
_DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                     10.0, 30.0, 60.0)


class RequestMetrics:
    """`record(result)` once per request, where the driver finishes it."""

    def __init__(self, meter: Meter, admission: AdmissionController) -> None:
        # Imported when metrics are wired, not with the module (as register_breaker_metrics).
        from opentelemetry.metrics import Observation

        self._requests = meter.create_counter(
            "orion.requests", unit="{request}",
            description="finished requests by final state, error reason, agent and cache level")
        self._duration = meter.create_histogram(
            "gen_ai.server.request.duration", unit="s",
            description="time from the request's start to its final state",
            explicit_bucket_boundaries_advisory=_DURATION_BUCKETS)
        self._ttft = meter.create_histogram(
            attr.GEN_AI_SERVER_TIME_TO_FIRST_TOKEN, unit="s",
            description="time from the request's start to its first generated token",
            explicit_bucket_boundaries_advisory=_DURATION_BUCKETS)
        self._phases = meter.create_histogram(
            "orion.phase.duration", unit="s", description="time spent in each state",
            explicit_bucket_boundaries_advisory=_DURATION_BUCKETS)
        self._tokens = meter.create_counter(
            "orion.tokens", unit="{token}",
            description="prompt (input) and generated (output) tokens by agent")

        def in_flight(_: CallbackOptions) -> Iterable[Observation]:
            return [Observation(admission.in_flight)]

        def queued(_: CallbackOptions) -> Iterable[Observation]:
            return [Observation(admission.queued)]

        def rejected(_: CallbackOptions) -> Iterable[Observation]:
            return [Observation(admission.rejected)]

        meter.create_observable_gauge("orion.admission.in_flight", [in_flight],
                                      unit="{request}", description="requests holding a slot")
        meter.create_observable_gauge("orion.admission.queued", [queued], unit="{request}",
                                      description="requests waiting for a slot (queue depth)")
        meter.create_observable_counter("orion.admission.rejected", [rejected],
                                        unit="{request}",
                                        description="requests refused at once: queue full")

    def record(self, result: Result) -> None:
        agent = result.agent or ""
        self._requests.add(1, {attr.FINAL_STATE: result.state,
                               attr.ERROR_REASON: result.error_reason or "",
                               attr.AGENT: agent, attr.CACHE_LEVEL: result.cache or ""})
        labels = {attr.FINAL_STATE: result.state, attr.AGENT: agent}
        self._duration.record(result.total_ms / 1e3, labels)
        if result.ttft_ms is not None:
            self._ttft.record(result.ttft_ms / 1e3, {attr.AGENT: agent})
        for phase in result.phases:
            self._phases.record(phase.ms / 1e3, {attr.PHASE: phase.state})
        self._tokens.add(result.tokens.input, {attr.AGENT: agent, attr.GEN_AI_TOKEN_TYPE: "input"})
        self._tokens.add(result.tokens.output,
                         {attr.AGENT: agent, attr.GEN_AI_TOKEN_TYPE: "output"})
