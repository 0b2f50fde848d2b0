"""What a context store leaves on disk: vectors coded once there are enough of them, a
write-ahead log folded back after adding, freed pages returned, schema 2 migrated."""

from __future__ import annotations

import sqlite3
import zlib
from collections.abc import Sequence
from pathlib import Path

import anyio
import numpy as np
import pytest

from orion_fsm import ChunkingConfig, ContextStore
from orion_fsm.services.context import _store, _vectors
from tests.services.context.conftest import WordTokenizer

SMALL = ChunkingConfig(max_tokens=60, overlap_tokens=10, min_tokens=5)
TRAIN = 300  # vectors before the codebook is learnt (the store's default is 2,048)


class HashEmbedder:
    """A 384-d unit vector per text, the same for the same text: a query that is a chunk's
    embedded text finds that chunk, whatever the other chunks."""

    def _vector(self, text: str) -> np.ndarray:
        v = np.random.default_rng(zlib.crc32(text.encode())).normal(size=384)
        return (v / np.linalg.norm(v)).astype(np.float32)

    async def embed(self, text: str) -> np.ndarray:
        return self._vector(text)

    async def embed_many(self, texts: Sequence[str], *, remember: bool = True
                         ) -> list[np.ndarray]:
        return [self._vector(t) for t in texts]


def write_docs(folder: Path, documents: int = 8, paragraphs: int = 50) -> Path:
    """Documents whose paragraphs share no words: one chunk each, none a duplicate."""
    folder.mkdir(parents=True)
    for d in range(documents):
        body = "\n\n".join(" ".join(f"d{d}p{p}w{w}" for w in range(40))
                           for p in range(paragraphs))
        (folder / f"doc{d}.md").write_text(f"# Doc {d}\n\n{body}\n")
    return folder


async def open_store(folder: Path) -> ContextStore:
    return await ContextStore.open(folder, tokenizer=WordTokenizer(), tokenizer_id="words",
                                   embeddings=HashEmbedder(), chunking=SMALL)


async def fill(folder: Path, docs: Path) -> list[tuple[str, int]]:
    """Add the documents, compute every vector; (embedded text, chunk id) of a few chunks."""
    async with anyio.create_task_group() as tg:
        store = await open_store(folder)
        await tg.start(store.run)
        await store.add_paths([docs])
        await store.wait_embedded()
        probes = [(_store._embedding_text(h.heading, h.text), h.chunk_id)
                  for h in await store.chunks([1, 50, 200, 390])]
        await store.aclose()
    return probes


def table(folder: Path, sql: str) -> list[tuple[object, ...]]:
    db = sqlite3.connect(folder / "store.sqlite3")
    try:
        return db.execute(sql).fetchall()
    finally:
        db.close()


@pytest.mark.anyio
async def test_vectors_become_product_codes_once_the_store_holds_enough(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_vectors, "PQ_TRAIN", TRAIN)
    probes = await fill(tmp_path / "s", write_docs(tmp_path / "docs"))
    assert table(tmp_path / "s", "SELECT groups FROM codebook") == [(48,)]
    sizes = table(tmp_path / "s", "SELECT length(vector), count(*) FROM vectors "
                                  "GROUP BY length(vector)")
    assert len(sizes) == 1 and sizes[0][0] == 48 and int(str(sizes[0][1])) > TRAIN
    async with await open_store(tmp_path / "s") as store:  # decoded again after reopening
        for text, chunk_id in probes:
            hits = await store.search(text, 3, mode="semantic")
            assert hits[0].chunk_id == chunk_id and hits[0].similarity is not None
            assert hits[0].similarity > 0.5


@pytest.mark.anyio
async def test_a_small_store_keeps_int8_vectors_and_searches_them(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_vectors, "PQ_TRAIN", 10_000)
    probes = await fill(tmp_path / "s", write_docs(tmp_path / "docs"))
    assert table(tmp_path / "s", "SELECT count(*) FROM codebook") == [(0,)]
    assert table(tmp_path / "s", "SELECT DISTINCT length(vector) FROM vectors") == [(388,)]
    async with await open_store(tmp_path / "s") as store:
        for text, chunk_id in probes:
            assert (await store.search(text, 3, mode="semantic"))[0].chunk_id == chunk_id


@pytest.mark.anyio
async def test_the_log_is_folded_back_once_adding_and_embedding_are_done(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_vectors, "PQ_TRAIN", TRAIN)
    docs = write_docs(tmp_path / "docs")
    async with anyio.create_task_group() as tg:
        store = await open_store(tmp_path / "s")
        await tg.start(store.run)
        await store.add_paths([docs])
        await store.wait_embedded()
        wal = tmp_path / "s" / "store.sqlite3-wal"
        assert wal.stat().st_size == 0  # open: the database file alone holds the store
        stats = await store.stats()
        assert stats.disk_bytes == (tmp_path / "s" / "store.sqlite3").stat().st_size + sum(
            p.stat().st_size for p in (tmp_path / "s").glob("*-shm"))
        await store.aclose()
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["store.sqlite3"]


@pytest.mark.anyio
async def test_removing_documents_gives_their_pages_back_and_an_empty_store_its_codebook(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_vectors, "PQ_TRAIN", TRAIN)
    await fill(tmp_path / "s", write_docs(tmp_path / "docs"))
    full = (tmp_path / "s" / "store.sqlite3").stat().st_size
    async with await open_store(tmp_path / "s") as store:
        for d in range(4):
            assert await store.remove(f"docs/doc{d}.md")
        half = (tmp_path / "s" / "store.sqlite3").stat().st_size
        assert half < 0.8 * full  # the codebook (196 KB of 480) stays
        assert table(tmp_path / "s", "PRAGMA freelist_count") == [(0,)]
        assert table(tmp_path / "s", "SELECT count(*) FROM codebook") == [(1,)]
        for d in range(4, 8):
            assert await store.remove(f"docs/doc{d}.md")
    assert table(tmp_path / "s", "SELECT count(*) FROM codebook") == [(0,)]
    assert (tmp_path / "s" / "store.sqlite3").stat().st_size < 0.2 * full


@pytest.mark.anyio
async def test_a_schema_2_store_is_migrated_and_its_vectors_coded(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_vectors, "PQ_TRAIN", 10_000)
    probes = await fill(tmp_path / "s", write_docs(tmp_path / "docs"))
    db = sqlite3.connect(tmp_path / "s" / "store.sqlite3")
    db.execute("DROP TABLE codebook")  # what schema 2 was
    db.execute("UPDATE meta SET value = '2' WHERE key = 'schema'")
    db.commit()
    db.close()
    monkeypatch.setattr(_vectors, "PQ_TRAIN", TRAIN)
    async with await open_store(tmp_path / "s") as store:
        for text, chunk_id in probes:
            assert (await store.search(text, 3, mode="semantic"))[0].chunk_id == chunk_id
    assert table(tmp_path / "s", "SELECT value FROM meta WHERE key = 'schema'") == [("3",)]
    assert table(tmp_path / "s", "SELECT DISTINCT length(vector) FROM vectors") == [(48,)]
