"""Benchmarks of the shared embedding service: micro-batching throughput, one model per
process (RSS with 3 components vs 1), and the float16 storage of vectors in L2."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import numpy as np

from bench._common import check

ROOT = Path(__file__).resolve().parents[1]



def corpus(n: int) -> list[str]:
    """`n` distinct, realistic texts: the routing eval set, the registry examples, variations."""
    texts = [json.loads(line)["text"] for line in
             (ROOT / "eval" / "routing.jsonl").read_text(encoding="utf-8").splitlines() if line]
    registry = json.loads((ROOT / "models.json").read_text(encoding="utf-8"))
    texts += [e for a in registry["agents"] for e in a["routing"]["examples"]]
    texts = list(dict.fromkeys(texts))
    base, i = list(texts), 0
    while len(texts) < n:
        texts.append(f"{base[i % len(base)]} (asked again, take {i // len(base) + 2})")
        i += 1
    return texts[:n]


def microbatch_throughput(quick: bool = False) -> dict[str, Any]:
    """64 concurrent single-text `embed()` callers vs the same 64 texts embedded one by one.

    One by one is measured twice: through the service (what a component awaiting each text
    gets) and as direct `model.encode([text])` calls (no service overhead at all). Each run
    uses a fresh service and store, so nothing is served from L2. Runs interleaved; medians.
    """
    from orion_fsm.services.routing._embeddings import EmbeddingService, MemoryEmbeddingStore

    runs = 3 if quick else 7
    pool = corpus(64 * runs * 3 + 80)
    concurrent_s: list[float] = []
    sequential_s: list[float] = []
    direct_s: list[float] = []
    batches: list[int] = []

    async def main() -> None:
        async with EmbeddingService() as warm:
            # Load the model and let torch meet batch and single shapes before timing.
            await warm.embed_many(pool[-64:])
            for text in pool[-80:-64]:
                await warm.embed(text)
            model = warm.model
            assert model is not None  # embed() above loaded it
        for run in range(runs):
            texts = pool[run * 192: run * 192 + 192]
            async with EmbeddingService(store=MemoryEmbeddingStore()) as service:
                started = time.perf_counter()
                async with anyio.create_task_group() as tg:
                    for text in texts[:64]:
                        tg.start_soon(service.embed, text)
                concurrent_s.append(time.perf_counter() - started)
                batches.append(int(service.stats()["batches"]))
                started = time.perf_counter()
                for text in texts[64:128]:
                    await service.embed(text)
                sequential_s.append(time.perf_counter() - started)
            started = time.perf_counter()
            for text in texts[128:]:
                model.encode([text], normalize_embeddings=True, show_progress_bar=False)
            direct_s.append(time.perf_counter() - started)

    anyio.run(main)
    concurrent, sequential = statistics.median(concurrent_s), statistics.median(sequential_s)
    direct = statistics.median(direct_s)
    vs_service, vs_direct = sequential / concurrent, direct / concurrent
    return {
        "runs": runs, "texts_per_run": 64,
        "concurrent_ms": [round(s * 1e3, 1) for s in concurrent_s],
        "one_by_one_service_ms": [round(s * 1e3, 1) for s in sequential_s],
        "one_by_one_direct_encode_ms": [round(s * 1e3, 1) for s in direct_s],
        "batches_for_64_concurrent": batches,
        "ms_per_text": {"concurrent": round(concurrent * 1e3 / 64, 2),
                        "one_by_one_service": round(sequential * 1e3 / 64, 2),
                        "one_by_one_direct": round(direct * 1e3 / 64, 2)},
        "checks": [
            check("64 concurrent vs one by one through the service (x throughput)",
                   vs_service, ">= 4", vs_service >= 4),
            check("64 concurrent vs one-by-one direct model.encode (x throughput)",
                   vs_direct, ">= 4", vs_direct >= 4),
        ],
    }


_RSS_PROBE = """
import sys, anyio, psutil
from orion_fsm.services.routing._embeddings import EmbeddingService
mode, n = sys.argv[1], int(sys.argv[2])
texts = [f"component {i} embeds sentence {j}" for i in range(n) for j in range(16)]
async def main():
    if mode == "service":
        # n components, each with its own EmbeddingService, as an engine would wire them.
        services = [EmbeddingService() for _ in range(n)]
        async with anyio.create_task_group() as tg:
            for s in services:
                await tg.start(s.run)
            for i, s in enumerate(services):
                await s.embed_many(texts[i * 16:(i + 1) * 16])
            ids = {id(s.model) for s in services}
            for s in services:
                await s.aclose()
        print(psutil.Process().memory_info().rss, len(ids))
    else:
        # What n components would cost loading their own copy of the model.
        import os
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from sentence_transformers import SentenceTransformer
        from orion_fsm.services.routing._embeddings import default_model_dir
        models = [SentenceTransformer(str(default_model_dir()), device="cpu") for _ in range(n)]
        for i, m in enumerate(models):
            m.encode(texts[i * 16:(i + 1) * 16])
        print(psutil.Process().memory_info().rss, len(models))
anyio.run(main)
"""


def _rss(mode: str, n: int) -> tuple[int, int]:
    done = subprocess.run([sys.executable, "-c", _RSS_PROBE, mode, str(n)], check=True,
                          capture_output=True, text=True, cwd=ROOT)
    rss, models = done.stdout.split()
    return int(rss), int(models)


def shared_model_rss(quick: bool = False) -> dict[str, Any]:
    """RSS of a process where 3 components embed vs 1 (fresh interpreters, psutil)."""
    repeats = 1 if quick else 3
    one = [_rss("service", 1) for _ in range(repeats)]
    three = [_rss("service", 3) for _ in range(repeats)]
    naive = _rss("separate-models", 3)
    rss1 = statistics.median(r for r, _ in one)
    rss3 = statistics.median(r for r, _ in three)
    ratio = rss3 / rss1
    return {
        "rss_mb_1_component": round(rss1 / 2**20, 1),
        "rss_mb_3_components": round(rss3 / 2**20, 1),
        "models_loaded_with_3_components": three[0][1],
        "rss_mb_3_separately_loaded_models": round(naive[0] / 2**20, 1),
        "checks": [check("RSS 3 components / RSS 1 component", ratio, "<= 1.10",
                          ratio <= 1.10 and three[0][1] == 1)],
    }


def float16_storage(quick: bool = False) -> dict[str, Any]:
    """float16 vectors in L2: bytes saved and the cosine error of the round trip (500 texts)."""
    from orion_fsm.services.routing._embeddings import EmbeddingService, pack_vector, unpack_vector

    texts = corpus(500)

    async def main() -> list[np.ndarray]:
        async with EmbeddingService() as service:
            return await service.embed_many(texts)

    vectors = anyio.run(main)
    errors, component_errors, f32_bytes, f16_bytes = [], [], 0, 0
    for vector in vectors:
        stored = pack_vector(vector)
        back = unpack_vector(stored)
        assert back is not None
        errors.append(abs(1.0 - float(back @ vector)))
        component_errors.append(float(np.abs(back - vector).max()))
        f32_bytes += vector.nbytes
        f16_bytes += stored.nbytes
    saving = 1 - f16_bytes / f32_bytes
    worst = max(errors)
    return {
        "vectors": len(vectors), "dim": int(vectors[0].shape[0]),
        "float32_kb": round(f32_bytes / 1024, 1), "float16_kb": round(f16_bytes / 1024, 1),
        "mean_cosine_error": float(f"{statistics.fmean(errors):.3g}"),
        "max_cosine_error": float(f"{worst:.3g}"),
        "max_component_error": float(f"{max(component_errors):.3g}"),
        "checks": [check("float16 vs float32 bytes saved", saving, ">= 0.5", saving >= 0.5),
                   {"figure": "max cosine error of the float16 round trip",
                    "value": float(f"{worst:.3g}"), "target": "< 1e-3", "met": worst < 1e-3}],
    }


BENCHMARKS: dict[str, Callable[..., dict[str, Any]]] = {
    "embeddings_microbatch": microbatch_throughput,
    "embeddings_shared_model_rss": shared_model_rss,
    "embeddings_float16": float16_storage,
}
