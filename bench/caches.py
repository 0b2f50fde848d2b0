"""Benchmarks of the L1/L2/L3 caches: memory-tier hits (the path every cached request takes)
and disk-tier hits (a restart, or an entry evicted from memory), under asyncio and trio."""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel

from bench._common import check, percentile, tiny_registry_doc
from orion_fsm.services.caches._cacheset import CacheConfig, TieredCache


def _result(i: int) -> dict[str, Any]:
    """An L1 value shaped like a served result."""
    return {"text": f"answer number {i} " * 20, "agent": "conversation", "state": "success",
            "tokens": {"input": 40, "output": 64}, "token_ids": list(range(64))}


def cache_memory_hit(quick: bool = False) -> dict[str, Any]:
    """L1 memory-tier hits: `get_memory` and `await get` one call at a time (p50/p99, µs), then
    1,000 concurrent callers awaiting `get` (hits/s), each backend in turn."""
    n = 20_000 if quick else 200_000
    callers, rounds = 1_000, (5 if quick else 20)
    figures: dict[str, Any] = {"calls": n, "concurrent_callers": callers}

    with tempfile.TemporaryDirectory() as tmp:
        for backend in ("asyncio", "trio"):
            measured = anyio.run(_memory_hits, Path(tmp) / backend, n, callers, rounds,
                                 backend=backend)
            figures[backend] = {k: round(v, 3) for k, v in measured.items()}

    worst = {k: max(figures[b][k] for b in ("asyncio", "trio"))
             for k in ("get_memory_p50_us", "get_p50_us")}
    slowest_rate = min(figures[b]["concurrent_hits_per_s"] for b in ("asyncio", "trio"))
    return {**figures, "checks": [
        check("L1 get_memory hit (µs, p50, worst backend)", worst["get_memory_p50_us"],
               "<= 10", worst["get_memory_p50_us"] <= 10),
        check("L1 await get hit (µs, p50, worst backend)", worst["get_p50_us"], "<= 50",
               worst["get_p50_us"] <= 50),
        check("L1 hits/s, 1,000 concurrent callers (slowest backend)", slowest_rate,
               ">= 2000", slowest_rate >= 2000),
    ]}


async def _memory_hits(directory: Path, n: int, callers: int, rounds: int) -> dict[str, float]:
    async with TieredCache[dict[str, Any]]("l1", CacheConfig.default("l1", directory)) as cache:
        keys = [f"key-{i}" for i in range(50)]
        for i, key in enumerate(keys):
            await cache.set(key, _result(i))
        sync_us, async_us = [], []
        for i in range(n):
            key = keys[i % 50]
            t = time.perf_counter_ns()
            cache.get_memory(key)
            sync_us.append((time.perf_counter_ns() - t) / 1e3)
        for i in range(n):
            key = keys[i % 50]
            t = time.perf_counter_ns()
            await cache.get(key)
            async_us.append((time.perf_counter_ns() - t) / 1e3)

        async def caller(offset: int) -> None:
            for r in range(rounds):
                await cache.get(keys[(offset + r) % 50])
                await anyio.lowlevel.checkpoint()  # as a request would yield

        t0 = time.perf_counter()
        async with anyio.create_task_group() as tg:
            for c in range(callers):
                tg.start_soon(caller, c)
        elapsed = time.perf_counter() - t0
        assert cache.stats().misses == 0
    return {"get_memory_p50_us": statistics.median(sync_us),
            "get_memory_p99_us": percentile(sync_us, 0.99),
            "get_p50_us": statistics.median(async_us),
            "get_p99_us": percentile(async_us, 0.99),
            "concurrent_hits_per_s": callers * rounds / elapsed}


def cache_disk_hit(quick: bool = False) -> dict[str, Any]:
    """Disk-tier hits after a restart: a fresh instance on a populated directory, every lookup
    a different key (each one a worker-thread hop, a SQLite read and a promotion). Also the
    write latency of `set` (memory + one SQLite transaction), and L2 embedding hits."""
    import numpy as np

    n = 200 if quick else 1_000
    figures: dict[str, Any] = {"entries": n}
    with tempfile.TemporaryDirectory() as tmp:
        l1_config = CacheConfig.default("l1", Path(tmp))
        l2_config = CacheConfig.default("l2", Path(tmp))
        rng = np.random.default_rng(0)
        embeddings = [rng.standard_normal(384).astype(np.float16) for _ in range(n)]

        async def write() -> dict[str, list[float]]:
            set_ms: list[float] = []
            async with (TieredCache[dict[str, Any]]("l1", l1_config) as l1,
                        TieredCache[Any]("l2", l2_config) as l2):
                for i in range(n):
                    t = time.perf_counter()
                    await l1.set(f"key-{i}", _result(i))
                    set_ms.append((time.perf_counter() - t) * 1e3)
                    await l2.set(f"emb-{i}", embeddings[i])
            return {"set": set_ms}

        async def read() -> dict[str, list[float]]:
            l1_ms: list[float] = []
            l2_ms: list[float] = []
            async with (TieredCache[dict[str, Any]]("l1", l1_config) as l1,
                        TieredCache[Any]("l2", l2_config) as l2):
                for i in range(n):
                    t = time.perf_counter()
                    value = await l1.get(f"key-{i}")
                    l1_ms.append((time.perf_counter() - t) * 1e3)
                    t = time.perf_counter()
                    emb = await l2.get(f"emb-{i}")
                    l2_ms.append((time.perf_counter() - t) * 1e3)
                    assert value is not None and emb is not None
                assert l1.stats().disk_hits == n and l2.stats().disk_hits == n
            return {"l1": l1_ms, "l2": l2_ms}

        writes = anyio.run(write)
        reads = {"asyncio": anyio.run(read), "trio": anyio.run(read, backend="trio")}

    def summary(ms: list[float]) -> dict[str, float]:
        return {"p50_ms": round(statistics.median(ms), 4),
                "p99_ms": round(percentile(ms, 0.99), 4)}

    figures["l1_set"] = summary(writes["set"])
    for backend, samples in reads.items():
        figures[backend] = {"l1_disk_hit": summary(samples["l1"]),
                            "l2_disk_hit": summary(samples["l2"])}
    worst = max(figures[b]["l1_disk_hit"]["p50_ms"] for b in reads)
    set_p50 = figures["l1_set"]["p50_ms"]
    return {**figures, "checks": [
        check("L1 disk-tier hit (ms, p50, worst backend)", worst, "<= 5", worst <= 5),
        check("L1 set, memory + disk (ms, p50)", set_p50, "<= 10", set_p50 <= 10),
    ]}


def l1_hit_through_engine(quick: bool = False) -> dict[str, Any]:
    """An L1 hit through the full engine (statechart, spans, trace line): p50 one at a time,
    then 1,000 concurrent callers (requests/s), on a tiny real model."""
    from orion_fsm import Engine, Registry
    from orion_fsm.testing import make_tiny_llama_gguf

    n, callers = (300 if quick else 2_000), 1_000
    figures: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        model = make_tiny_llama_gguf(Path(tmp) / "tiny.gguf", n_layers=1, n_embd=32, seed=3)
        registry = Registry.from_dict(tiny_registry_doc(model, max_tokens=4))

        async def main() -> None:
            async with Engine(registry=registry, cache_dir=Path(tmp) / "c", threads=1,
                              embeddings=False,
                              trace_path=Path(tmp) / "t.jsonl") as engine:
                first = await engine.infer("hello")
                assert first.cache is None
                one: list[float] = []
                for _ in range(n):
                    t = time.perf_counter()
                    result = await engine.infer("hello")
                    one.append((time.perf_counter() - t) * 1e3)
                assert result.cache == "L1"
                figures["p50_ms"] = round(statistics.median(one), 4)
                figures["p99_ms"] = round(percentile(one, 0.99), 4)

                async def caller() -> None:
                    await engine.infer("hello")

                t = time.perf_counter()
                async with anyio.create_task_group() as tg:
                    for _ in range(callers):
                        tg.start_soon(caller)
                figures["concurrent_callers"] = callers
                figures["requests_per_s"] = round(callers / (time.perf_counter() - t), 1)

        anyio.run(main)
    return {**figures, "checks": [
        check("L1 hit through the engine, p50 (ms)", figures["p50_ms"], "<= 1.0",
               figures["p50_ms"] <= 1.0),
        check("L1 hits/s, 1,000 concurrent callers", figures["requests_per_s"], ">= 2000",
               figures["requests_per_s"] >= 2000)]}


BENCHMARKS: dict[str, Callable[..., dict[str, Any]]] = {
    "cache_memory_hit": cache_memory_hit,
    "cache_disk_hit": cache_disk_hit,
    "l1_hit_through_engine": l1_hit_through_engine,
}
