"""Benchmarks of the model loader: a memory budget under a model-switching workload, memory
returned by unloading, the warm start of the default model, and what preloading buys."""

from __future__ import annotations

import inspect
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import anyio
import psutil

from bench._common import check

MB = 1 << 20
# name: (layers, n_embd): f32 weights of ~40, 48, 57 and 71 MB.
SIZES = {"a": (16, 256), "b": (12, 320), "c": (10, 384), "d": (7, 512)}
CONTEXT = 256
ENGINE_OVERHEAD_MB = 150



def _make_models(root: Path) -> dict[str, Path]:
    from orion_fsm.testing import make_tiny_llama_gguf

    return {name: make_tiny_llama_gguf(root / name / f"tiny-{name}.gguf", n_layers=layers,
                                       n_embd=embd, seed=i)
            for i, (name, (layers, embd)) in enumerate(SIZES.items())}


def _registry(models: dict[str, Path]) -> Any:
    from orion_fsm import Registry

    names = list(models)
    agents = [{
        "id": name, "role": name, "description": f"tiny model {name}", "capabilities": ["chat"],
        "model": {"path": str(path)}, "format": "gguf", "model_type": "llama",
        "chat_template": "chatml", "system_prompt": "", "context_length": CONTEXT,
        "generation": {"max_tokens": 8, "temperature": 0, "top_k": 1, "seed": 7},
        "ram_estimate_mb": 80,
        # Each agent falls back to the next smaller one.
        "fallback": names[i - 1] if i else None,
    } for i, (name, path) in enumerate(models.items())]
    return Registry.from_dict({"version": 1, "default_agent": names[0], "agents": agents})


@contextmanager
def _peak_rss(every_s: float = 0.002) -> Iterator[dict[str, float]]:
    """Samples this process's RSS in a thread; `peak_mb` is filled on exit."""
    process, stop, out = psutil.Process(), threading.Event(), {"peak_mb": 0.0}

    def sample() -> None:
        while not stop.is_set():
            out["peak_mb"] = max(out["peak_mb"], process.memory_info().rss / MB)
            stop.wait(every_s)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield out
    finally:
        stop.set()
        thread.join()


def _engine(registry: Any, cache: Path, config: Any, load_model: Any = None) -> Any:
    from orion_fsm import Engine
    from orion_fsm.backends import LoadedModel
    from orion_fsm.services.models._loader import ModelLoader

    options: dict[str, Any] = {}
    if "caches" in inspect.signature(Engine).parameters:
        options["caches"] = False  # result caches would answer repeats without a model
    engine = Engine(registry=registry, cache_dir=cache, threads=1, trace_path=False,
                    embeddings=False, **options)
    # Until the Engine takes loader options, replace its loader before it starts.
    engine.loader = ModelLoader(cache, threads=1, config=config, clock=engine.clock,
                                load_model=load_model or LoadedModel.load)
    return engine


def budget_workload(quick: bool = False) -> dict[str, Any]:
    """200 random requests over 4 tiny models of different sizes, a budget that holds 2.

    Two requests in flight (what the budget can serve at once), then 4 in flight, where
    loads meet models held by other requests: they wait for room (`room_wait_s`) or fall
    back. Informational: the same burst with `room_wait_s=0` (refuse at once).
    """
    from orion_fsm import RequestFailed
    from orion_fsm.services.models._loader import LoaderConfig
    from orion_fsm.services.models._tiers import estimate_model_memory

    n = 100 if quick else 200
    rng = random.Random(42)
    with tempfile.TemporaryDirectory() as tmp:
        models = _make_models(Path(tmp))
        registry = _registry(models)
        estimates = {k: estimate_model_memory(p, CONTEXT).total_mb for k, p in models.items()}
        budget_mb = estimates["d"] + estimates["c"]  # the two largest fit, no three do
        config = LoaderConfig(memory_budget_mb=budget_mb, predictive_preload=False)
        outcomes: dict[str, Counter[str]] = {}

        async def run(concurrency: int) -> dict[str, Any]:
            counts: Counter[str] = Counter()
            engine = _engine(registry, Path(tmp) / "cache", config)
            plan = [(i, rng.choice(list(models))) for i in range(n)]

            async def worker() -> None:
                while plan:
                    i, name = plan.pop()
                    try:
                        result = await engine.infer(f"hello there, request {i}", agent=name)
                        counts["fallback" if result.fallback else "success"] += 1
                    except RequestFailed as exc:
                        counts[f"error:{exc.reason}"] += 1

            async with engine:
                async with anyio.create_task_group() as tg:
                    for _ in range(concurrency):
                        tg.start_soon(worker)
                stats = engine.loader.stats
                over = engine.loader.used_bytes > engine.loader.budget_bytes
            return {"outcomes": dict(counts), "loads": stats.loads,
                    "evictions": stats.evictions, "refusals": stats.refusals,
                    "estimate_over_budget_at_end": over}

        with _peak_rss() as steady:
            steady_run = anyio.run(run, 2)
        with _peak_rss() as burst:
            burst_run = anyio.run(run, 4)
        # For comparison only: the same burst when loads never wait for room.
        config = LoaderConfig(memory_budget_mb=budget_mb, predictive_preload=False,
                              room_wait_s=0)
        fail_fast_run = anyio.run(run, 4)
        outcomes = {"2_in_flight": Counter(steady_run["outcomes"]),
                    "4_in_flight": Counter(burst_run["outcomes"])}
    peak = max(steady["peak_mb"], burst["peak_mb"])
    limit = budget_mb + ENGINE_OVERHEAD_MB
    clean = all(set(c) <= {"success", "fallback"} for c in outcomes.values())
    return {"requests_per_run": n, "model_estimates_mb": {k: round(v, 1)
                                                          for k, v in estimates.items()},
            "budget_mb": round(budget_mb, 1), "peak_rss_mb": round(peak, 1),
            "runs": {"2_in_flight": {**steady_run, "peak_rss_mb": round(steady["peak_mb"], 1)},
                     "4_in_flight": {**burst_run, "peak_rss_mb": round(burst["peak_mb"], 1)},
                     "4_in_flight_room_wait_0_informational": fail_fast_run},
            "checks": [
                check("peak process RSS (MB), budget + 150 MB engine overhead", peak,
                       f"<= {limit:.0f}", peak <= limit),
                check("requests not ending in success or clean fallback",
                       sum(v for c in outcomes.values() for k, v in c.items()
                           if k not in ("success", "fallback")), "== 0", clean),
            ]}


_UNLOAD_SCRIPT = textwrap.dedent("""
    import gc, json, sys, anyio, psutil
    from pathlib import Path
    from orion_fsm import Registry
    from orion_fsm._engine import default_cache_dir
    from orion_fsm.backends import SamplingParams
    from orion_fsm.services.models._loader import LoaderConfig, ModelLoader

    registry = Registry.load(sys.argv[1] if len(sys.argv) > 1 else None)
    spec = registry.get(registry.default_agent)
    process = psutil.Process()

    async def main():
        loader = ModelLoader(default_cache_dir(), config=LoaderConfig(predictive_preload=False))
        (await loader.acquire(spec)).release()  # the runtime's one-time setup, out of the way
        await loader.unload_idle()
        gc.collect()
        before = process.memory_info().rss
        lease = await loader.acquire(spec)
        ids = lease.prepared.tokenizer.encode("Tell me about the sea. " * 8)
        lease.model.generate(ids, SamplingParams(max_tokens=8, temperature=0),
                             on_event=lambda e: None, should_stop=lambda: False)
        loaded = process.memory_info().rss
        lease.release()
        await loader.unload_idle()
        after = process.memory_info().rss
        print(json.dumps({"model": lease.prepared.key.label, "rss_before_mb": before / 2**20,
                          "rss_loaded_mb": loaded / 2**20, "rss_after_unload_mb": after / 2**20,
                          "estimate_mb": lease.prepared.estimate.total_mb}))

    anyio.run(main)
""")


def unload_returns_memory(quick: bool = False) -> dict[str, Any]:
    """Process RSS before load, after load (and a short generation), after unload.

    In fresh processes: SmolLM2 from the default registry, and a 71 MB tiny model.
    """
    runs: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        models = _make_models(Path(tmp))
        reg_path = Path(tmp) / "tiny.json"
        reg_path.write_text(json.dumps({"version": 1, "default_agent": "d", "agents": [{
            "id": "d", "role": "d", "description": "tiny", "capabilities": [],
            "model": {"path": str(models["d"])}, "format": "gguf", "model_type": "llama",
            "chat_template": "chatml", "system_prompt": "", "context_length": CONTEXT,
            "ram_estimate_mb": 80, "fallback": None}]}))
        for name, argv in (("smollm2", []), ("tiny_71mb", [str(reg_path)])):
            out = subprocess.run([sys.executable, "-c", _UNLOAD_SCRIPT, *argv], check=True,
                                 capture_output=True, text=True).stdout
            m = json.loads(out)
            cost = m["rss_loaded_mb"] - m["rss_before_mb"]
            returned = m["rss_loaded_mb"] - m["rss_after_unload_mb"]
            runs[name] = {**{k: (round(v, 1) if isinstance(v, float) else v)
                             for k, v in m.items()},
                          "model_rss_mb": round(cost, 1), "returned_mb": round(returned, 1),
                          "returned_share": round(returned / cost, 4)}
    return {"runs": runs, "checks": [
        check(f"{name}: share of the model's RSS returned by unloading", r["returned_share"],
               ">= 0.90", r["returned_share"] >= 0.90) for name, r in runs.items()]}


_WARM_SCRIPT = textwrap.dedent("""
    import time
    t0 = time.perf_counter()
    import anyio
    from orion_fsm import Engine
    t1 = time.perf_counter()

    async def main():
        async with Engine(trace_path=False, embeddings=False) as engine:
            async with engine.stream("Hello!", max_tokens=4) as stream:
                async for _ in stream:
                    t2 = time.perf_counter()
                    break
        print(t1 - t0, t2 - t1)

    anyio.run(main)
""")


def warm_start(quick: bool = False) -> dict[str, Any]:
    """A new process: `Engine()` to the first streamed token of SmolLM2, conversion cached."""
    def once() -> tuple[float, float]:
        out = subprocess.run([sys.executable, "-c", _WARM_SCRIPT], check=True,
                             capture_output=True, text=True).stdout.split()
        return float(out[0]), float(out[1])

    once()  # converts the default model if this machine never did
    runs = [once() for _ in range(3 if quick else 5)]
    first_token = statistics.median(r[1] for r in runs)
    return {"import_s": [round(r[0], 3) for r in runs],
            "engine_to_first_token_s": [round(r[1], 3) for r in runs],
            "checks": [check("warm start: Engine() to first token, SmolLM2 (s, median)",
                              first_token, "<= 1.5", first_token <= 1.5)]}


def _cold_load(load: Callable[..., Any]) -> Callable[..., Any]:
    """`load_model` that first drops the file from the page cache: a read from disk, as for a
    model whose pages the OS reclaimed since it was last used."""
    def wrapped(model_path: Path, *args: Any, **kwargs: Any) -> Any:
        fd = os.open(model_path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        return load(model_path, *args, **kwargs)

    return wrapped


def preload_ttft(quick: bool = False) -> dict[str, Any]:
    """Time to first token with and without predictive preloading, on a workload that
    switches models (budget for 2 of 4), sequential requests.

    patterned: the next agent follows a d -> c -> b -> a cycle 80 % of the time (a usage
    pattern to learn); uniform: no pattern. Loads read the file from disk (page cache dropped
    first) as for models evicted long enough ago; `warm_cache` keeps the page cache.
    """
    from orion_fsm.backends import LoadedModel
    from orion_fsm.services.models._loader import LoaderConfig
    from orion_fsm.services.models._tiers import estimate_model_memory

    n = 60 if quick else 160
    with tempfile.TemporaryDirectory() as tmp:
        models = _make_models(Path(tmp))
        registry = _registry(models)
        names = list(models)
        budget_mb = sum(sorted(estimate_model_memory(p, CONTEXT).total_mb
                               for p in models.values())[-2:])

        def workload(patterned: bool, seed: int) -> list[str]:
            rng, order, out = random.Random(seed), names[::-1], [names[-1]]
            for _ in range(n - 1):
                follow = patterned and rng.random() < 0.8
                nxt = order[(order.index(out[-1]) + 1) % 4] if follow else rng.choice(names)
                out.append(nxt)
            return out

        async def measure(plan: list[str], preload: bool, cold: bool) -> dict[str, Any]:
            config = LoaderConfig(memory_budget_mb=budget_mb, predictive_preload=preload)
            load = _cold_load(LoadedModel.load) if cold else LoadedModel.load
            engine = _engine(registry, Path(tmp) / "cache", config, load)
            ttft: list[float] = []
            async with engine:  # the engine runs the loader's preloading task
                for i, name in enumerate(plan):
                    result = await engine.infer(f"hello there, request {i}", agent=name,
                                                max_tokens=16)
                    ttft.append(result.ttft_ms or result.total_ms)
            stats = engine.loader.stats
            return {"ttft_mean_ms": round(statistics.fmean(ttft), 2),
                    "ttft_p50_ms": round(statistics.median(ttft), 2),
                    "ttft_p90_ms": round(sorted(ttft)[int(0.9 * (len(ttft) - 1))], 2),
                    "loads": stats.loads, "preloads": stats.preloads,
                    "preload_hits": stats.preload_hits, "evictions": stats.evictions}

        results: dict[str, Any] = {}
        for label, patterned, cold in (("patterned", True, True), ("uniform", False, True),
                                       ("patterned_warm_cache", True, False)):
            plan = workload(patterned, seed=7)
            off = anyio.run(measure, plan, False, cold)
            on = anyio.run(measure, plan, True, cold)
            results[label] = {"without_preload": off, "with_preload": on,
                              "mean_ttft_ratio": round(on["ttft_mean_ms"]
                                                       / off["ttft_mean_ms"], 4)}
    ratio = results["patterned"]["mean_ttft_ratio"]
    return {"requests": n, "budget_mb": round(budget_mb, 1), "workloads": results,
            "checks": [check("patterned switching, cold loads: mean TTFT with / without "
                              "preloading", ratio, "< 1.0", ratio < 1.0)]}


BENCHMARKS: dict[str, Callable[..., dict[str, Any]]] = {
    "loader_budget_workload": budget_workload,
    "loader_unload_returns_memory": unload_returns_memory,
    "loader_warm_start": warm_start,
    "loader_preload_ttft": preload_ttft,
}

if __name__ == "__main__":
    only = [a for a in sys.argv[1:] if not a.startswith("--")] or list(BENCHMARKS)
    for bench_name in only:
        print(bench_name, json.dumps(BENCHMARKS[bench_name](quick="--quick" in sys.argv),
                                     indent=2))
