"""Benchmarks of the request spine: import time, generation through the engine vs direct
ctransformers, and the engine's own overhead per request outside generation."""

from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import anyio

from bench._common import check, percentile, tiny_registry_doc

PROMPT = "Write a long, detailed story about a dragon who learns to read."



def import_time(quick: bool = False) -> dict[str, Any]:
    """`import orion_fsm` in a fresh interpreter, median of runs (interpreter start excluded)."""
    code = "import time; t=time.perf_counter(); import orion_fsm; print(time.perf_counter()-t)"
    runs = [float(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                                 text=True).stdout) for _ in range(3 if quick else 7)]
    probe = ("import sys, orion_fsm; print(','.join(m for m in ('torch', 'sentence_transformers',"
             " 'transformers', 'ctransformers') if m in sys.modules))")
    heavy = subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True,
                           text=True).stdout.strip()
    median = statistics.median(runs)
    return {"runs_s": [round(r, 4) for r in runs], "median_s": round(median, 4),
            "heavy_modules_imported": heavy or "none",
            "checks": [check("import orion_fsm (s, median)", median, "<= 0.3", median <= 0.3)]}



def generation_throughput(quick: bool = False) -> dict[str, Any]:
    """Tokens/s of SmolLM2 greedy generation: through Engine.infer vs ctransformers directly.

    Same converted file, same prompt ids, same settings, same process, runs interleaved.
    """
    from ctransformers import AutoModelForCausalLM

    from orion_fsm import Engine

    max_tokens, runs = 64, (3 if quick else 9)
    engine_tps: list[float] = []
    direct_tps: list[float] = []

    async def main() -> dict[str, Any]:
        async with Engine(trace_path=False, embeddings=False) as engine:
            spec = engine.registry.get("conversation")
            warm = await engine.infer(PROMPT, agent="conversation", max_tokens=4, temperature=0)
            prepared = await engine.loader.prepare(spec)
            llm = AutoModelForCausalLM.from_pretrained(
                str(prepared.files.model_path), model_type="llama",
                context_length=spec.context_length, threads=engine.loader.threads)
            eos = {prepared.tokenizer.token_id(t) for t in ("<|im_end|>", "<|endoftext|>")}
            prompt_ids = _prompt_ids(spec, prepared)

            def direct() -> int:
                n = 0
                for token in llm.generate(prompt_ids, top_k=1, top_p=1.0, temperature=1.0,
                                          repetition_penalty=1.1, last_n_tokens=64,
                                          reset=True, threads=engine.loader.threads):
                    if token in eos:
                        break
                    n += 1
                    if n == max_tokens:
                        break
                return n

            async def through_engine() -> None:
                result = await engine.infer(PROMPT, agent="conversation", temperature=0,
                                            cache=False, max_tokens=max_tokens,
                                            repetition_penalty=1.1)
                ms = next(p.ms for p in result.phases if p.state == "inferencing")
                engine_tps.append(result.tokens.output / (ms / 1e3))
                counts.append(result.tokens.output)

            async def directly() -> None:
                t = time.perf_counter()
                n = await anyio.to_thread.run_sync(direct)
                direct_tps.append(n / (time.perf_counter() - t))

            await anyio.to_thread.run_sync(direct)  # both paths warm before measuring
            counts: list[int] = []
            for i in range(runs):
                # Alternate who goes first: a CPU that idled runs the next call slower.
                for measure in ((through_engine, directly) if i % 2 else
                                (directly, through_engine)):
                    await measure()
            return {"warmup_tokens": warm.tokens.output, "output_tokens": counts}

    extra = anyio.run(main)
    engine_median, direct_median = statistics.median(engine_tps), statistics.median(direct_tps)
    ratio = engine_median / direct_median
    return {**extra, "runs": runs, "max_tokens": max_tokens,
            "engine_tok_s": [round(x, 1) for x in engine_tps],
            "direct_tok_s": [round(x, 1) for x in direct_tps],
            "engine_median_tok_s": round(engine_median, 1),
            "direct_median_tok_s": round(direct_median, 1),
            "checks": [check("through-engine / direct tokens/s (median)", ratio, ">= 0.97",
                              ratio >= 0.97)]}


def _prompt_ids(spec: Any, prepared: Any) -> list[int]:
    prompt = spec.chat_template.render([("system", spec.system_prompt), ("user", PROMPT)])
    ids: list[int] = prepared.tokenizer.encode(prompt)
    return ids


def engine_overhead(quick: bool = False) -> dict[str, Any]:
    """Per-request time outside generation, tracing on, statechart included (tiny model).

    overhead = p50(Engine.infer, 1 token) - p50(the same 1-token generation called directly
    on the loaded model). Also measured alone: the statechart with the telemetry listener.
    """
    from orion_fsm import Engine, Registry
    from orion_fsm._clock import SystemClock
    from orion_fsm._machine import request_chart
    from orion_fsm.backends import SamplingParams
    from orion_fsm.services.observability._telemetry import PhaseRecorder, resolve_tracer
    from orion_fsm.testing import make_tiny_llama_gguf

    n = 200 if quick else 1000
    with tempfile.TemporaryDirectory() as tmp:
        model = make_tiny_llama_gguf(Path(tmp) / "tiny.gguf", n_layers=1, n_embd=32, seed=3)
        registry = Registry.from_dict(tiny_registry_doc(model, max_tokens=1))
        engine_ms: list[float] = []
        untraced_ms: list[float] = []
        direct_ms: list[float] = []

        async def timed(trace_path: Path | Literal[False], into: list[float]) -> None:
            async with Engine(registry=registry, cache_dir=Path(tmp) / "cache", threads=1,
                              embeddings=False,
                              trace_path=trace_path) as engine:
                await engine.infer("hi", cache=False)
                for _ in range(n):
                    t = time.perf_counter()
                    await engine.infer("hi", cache=False)
                    into.append((time.perf_counter() - t) * 1e3)

        async def main() -> None:
            await timed(Path(tmp) / "trace.jsonl", engine_ms)
            await timed(False, untraced_ms)
            async with Engine(registry=registry, cache_dir=Path(tmp) / "cache", threads=1,
                              embeddings=False,
                              trace_path=False) as engine:
                lease = await engine.loader.acquire(registry.get("a"))
                prompt_ids = lease.prepared.tokenizer.encode(
                    registry.get("a").chat_template.render([("user", "hi")]))
                params = SamplingParams(max_tokens=1, temperature=0)
                for _ in range(n):
                    t = time.perf_counter()
                    lease.model.generate(prompt_ids, params, on_event=lambda e: None,
                                         should_stop=lambda: False)
                    direct_ms.append((time.perf_counter() - t) * 1e3)
                lease.release()

        anyio.run(main)

    chart = request_chart()
    tracer = resolve_tracer()
    clock = SystemClock()

    def machine_only() -> None:
        recorder = PhaseRecorder(tracer, clock, "bench", {})
        sm = chart(listeners=[recorder])
        for event in ("start", "valid", "routed", "loaded", "completed"):
            sm.send(event)

    def bare_machine() -> None:
        sm = chart()
        for event in ("start", "valid", "routed", "loaded", "completed"):
            sm.send(event)

    component = {"statechart_bare_ms": _time(bare_machine, n),
                 "statechart_with_telemetry_listener_and_spans_ms": _time(machine_only, n),
                 "engine_without_trace_file_ms": round(statistics.median(untraced_ms), 4)}
    overhead = statistics.median(engine_ms) - statistics.median(direct_ms)
    return {"requests": n,
            "engine_p50_ms": round(statistics.median(engine_ms), 4),
            "engine_p99_ms": round(percentile(engine_ms, 0.99), 4),
            "direct_generation_p50_ms": round(statistics.median(direct_ms), 4),
            "components_p50": component,
            "checks": [check("engine overhead outside generation (ms, p50)", overhead, "<= 1.0",
                              overhead <= 1.0)]}


def _time(fn: Callable[[], None], n: int) -> float:
    samples = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t) * 1e3)
    return round(statistics.median(samples), 4)


BENCHMARKS: dict[str, Callable[..., dict[str, Any]]] = {
    "import_time": import_time,
    "engine_overhead": engine_overhead,
    "generation_throughput": generation_throughput,
}
