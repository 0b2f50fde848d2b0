"""Tracer resolution: the application's provider wins; otherwise the engine has its own."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider

from orion_fsm._clock import ManualClock
from orion_fsm.services.observability._telemetry import PhaseRecorder, resolve_tracer


def test_without_an_app_provider_the_engine_gets_a_recording_tracer() -> None:
    tracer = resolve_tracer()
    with tracer.start_as_current_span("probe") as span:
        assert span.is_recording()
        assert span.get_span_context().is_valid


def test_a_non_recording_provider_still_gives_the_trace_file_a_trace_id() -> None:
    recorder = PhaseRecorder(trace.NoOpTracerProvider().get_tracer("t"), ManualClock(), "r1", {})
    assert len(recorder.trace_id) == 32 and int(recorder.trace_id, 16) != 0


def test_phase_timings_come_from_the_injected_clock() -> None:
    clock = ManualClock()
    recorder = PhaseRecorder(TracerProvider().get_tracer("t"), clock, "r1", {})

    class State:  # what the recorder reads of a python-statemachine State
        parent = None  # top-level (a parallel state's regions have one)

        def __init__(self, id: str) -> None:
            self.id = id

    recorder.on_enter_state("__initial__", State("idle"))
    recorder.on_enter_state("start", State("validating"))
    clock.advance(0.25)
    recorder.notes["orion.messages"] = 1
    recorder.on_enter_state("invalid", State("error"))
    recorder.finish({})  # the driver ends the request span once the machine is final
    (phase,) = recorder.phases
    assert (phase.state, phase.ms) == ("validating", 250.0)
    assert phase.attributes == {"orion.messages": 1}
    assert [(t.source, t.target) for t in recorder.transitions] == [
        ("idle", "validating"), ("validating", "error")]
    assert [s["name"] for s in recorder.spans] == ["orion.request", "validating"]


def test_the_global_provider_of_the_application_receives_the_spans(
    tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    # A global provider can be set once per process: run the app in its own interpreter.
    script = textwrap.dedent(f"""
        import anyio
        from opentelemetry import trace
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
        from orion_fsm import Engine, Registry

        exporter = InMemorySpanExporter()
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        trace.set_tracer_provider(provider)
        registry = Registry.from_dict({{"version": 1, "default_agent": "a", "agents": [{{
            "id": "a", "role": "a", "description": "d", "capabilities": [],
            "model": {{"path": {str(tiny_models["small"])!r}}}, "format": "gguf",
            "model_type": "llama", "chat_template": "chatml", "system_prompt": "",
            "context_length": 128, "ram_estimate_mb": 1, "fallback": None}}]}})

        async def main():
            async with Engine(registry=registry, trace_path=False, threads=1, embeddings=False,
                              cache_dir={str(tmp_path / "c")!r}) as engine:
                await engine.infer("hi", max_tokens=2)

        anyio.run(main)
        print(sorted(s.name for s in exporter.get_finished_spans()))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          check=False, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(sorted(["orion.request", "validating", "routing",
                                              "loading_agent", "inferencing"]))
