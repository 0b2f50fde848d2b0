from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections.abc import Sequence
from pathlib import Path

import anyio
import numpy as np
import pytest

from orion_fsm import ChunkingConfig, ContextError, ContextStore
from tests.services.context.conftest import ConceptEmbedder, WordTokenizer

SMALL = ChunkingConfig(max_tokens=60, overlap_tokens=10, min_tokens=5)

DOCS = {
    "cars.md": "# Cars\n\nThe sedan has four doors and a quiet engine.\n\n"
               "## Repair\n\nChange the oil every ten thousand kilometres.\n",
    "fruit.md": "# Fruit\n\nAn apple a day keeps the doctor away.\n\n"
                "## Storage\n\nKeep the banana away from the pear.\n",
    "sea.md": "# Sea\n\nThe tide rises twice a day.\n\n## Surf\n\nBig waves need a long board.\n",
    "db.md": "# Storage engines\n\nSQLite keeps each table in a B-tree; an index is "
             "another B-tree.\n",
}


async def open_store(folder: Path, **kwargs: object) -> ContextStore:
    kwargs.setdefault("chunking", SMALL)
    return await ContextStore.open(folder, tokenizer=WordTokenizer(), tokenizer_id="words",
                                   **kwargs)  # type: ignore[arg-type]


@pytest.mark.anyio
async def test_add_reports_tokens_chunks_and_lexical_search_finds_them(tmp_path: Path) -> None:
    async with await open_store(tmp_path / "s") as store:
        result = await store.add(DOCS["cars.md"], name="cars.md")
        assert result.chunks == 2 and result.tokens_added > 0 and result.document_id > 0
        hits = await store.search("how often should the oil be changed", top_k=3)
        assert hits[0].document == "cars.md" and hits[0].heading == "Cars > Repair"
        assert "oil" in hits[0].matched_terms and hits[0].lexical_rank == 1
        assert hits[0].semantic_rank is None  # no embedder: BM25 alone
        stats = await store.stats()
        assert (stats.documents, stats.chunks, stats.tokens) == (1, 2, result.tokens_added)


@pytest.mark.anyio
async def test_same_document_again_is_unchanged_and_new_content_replaces_it(
        tmp_path: Path) -> None:
    async with await open_store(tmp_path / "s") as store:
        first = await store.add(DOCS["sea.md"], name="sea")
        again = await store.add(DOCS["sea.md"], name="sea")
        assert again.unchanged and again.document_id == first.document_id
        replaced = await store.add("# Sea\n\nNow about lighthouses only.\n", name="sea")
        assert not replaced.unchanged
        assert await store.search("tide", top_k=3) == []
        assert (await store.search("lighthouses", top_k=3))[0].document == "sea"


@pytest.mark.anyio
async def test_exact_and_near_duplicate_chunks_are_dropped(tmp_path: Path) -> None:
    para = " ".join(f"word{i}" for i in range(200))
    near = para.replace("word100", "changed")
    big = ChunkingConfig(max_tokens=300, overlap_tokens=0, min_tokens=5)
    async with await open_store(tmp_path / "s", chunking=big) as store:
        first = await store.add(f"# A\n\n{para}\n", name="a")
        second = await store.add(f"# A\n\n{para.upper()}\n\n# B\n\n{near}\n\n# C\n\nfresh text",
                                 name="b")
        assert first.duplicates == 0
        assert second.duplicates == 2 and second.chunks == 1


@pytest.mark.anyio
async def test_fusion_finds_by_meaning_what_bm25_cannot(tmp_path: Path) -> None:
    embedder = ConceptEmbedder()
    async with await open_store(tmp_path / "s", embeddings=embedder) as store, \
            anyio.create_task_group() as tg:
        await tg.start(store.run)
        for name, text in DOCS.items():
            await store.add(text, name=name)
        await store.wait_embedded()
        assert (await store.stats()).embeddings == "ready"
        query = "automobile"  # in no document: only the embedding relates it to "sedan"
        assert await store.search(query, top_k=3, mode="lexical") == []
        fused = await store.search(query, top_k=3)
        assert fused[0].document == "cars.md" and fused[0].semantic_rank == 1
        assert fused[0].lexical_rank is None and "embedding #1" in fused[0].why
        # Both rankers agreeing beats either alone: "sqlite index" is a word and a concept.
        both = await store.search("sqlite index", top_k=2)
        assert both[0].document == "db.md"
        assert both[0].lexical_rank == 1 and both[0].semantic_rank == 1
        assert both[0].score == pytest.approx(2 / 1.5)  # 1 / (k + rank) from each, k = 0.5
        await store.aclose()
        tg.cancel_scope.cancel()


@pytest.mark.anyio
async def test_capacity_evicts_least_recently_used_documents(tmp_path: Path) -> None:
    async with await open_store(tmp_path / "s", capacity_tokens=35) as store:
        await store.add(DOCS["cars.md"], name="cars")
        await store.add(DOCS["fruit.md"], name="fruit")
        await store.search("oil engine sedan", top_k=1)  # cars is used: fruit is older now
        result = await store.add(DOCS["sea.md"], name="sea")
        assert result.evicted == ("fruit",)
        names = [d["name"] for d in await store.documents()]
        assert names == ["cars", "sea"]
        assert (await store.stats()).tokens <= 35
        with pytest.raises(ContextError, match="more than the store's capacity"):
            await store.add(" ".join(["word"] * 100), name="huge")


@pytest.mark.anyio
async def test_remove_forgets_a_document_everywhere(tmp_path: Path) -> None:
    async with await open_store(tmp_path / "s") as store:
        await store.add(DOCS["fruit.md"], name="fruit")
        assert await store.remove("fruit")
        assert not await store.remove("fruit")
        assert await store.search("banana", top_k=3) == []
        # Its chunks no longer count as duplicates: adding it again keeps them all.
        again = await store.add(DOCS["fruit.md"], name="fruit")
        assert again.duplicates == 0 and again.chunks == 2


@pytest.mark.anyio
async def test_summary_fits_the_token_budget(tmp_path: Path) -> None:
    async with await open_store(tmp_path / "s") as store:
        for name, text in DOCS.items():
            await store.add(text, name=name)
        full = await store.summary(500)
        assert "cars.md" in full and "Repair" in full
        short = await store.summary(12)
        assert len(WordTokenizer().encode(short)) <= 12 and short.startswith("s:")


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_a_store_persists_across_processes(tmp_path: Path, backend: str) -> None:
    folder = tmp_path / "s"

    async def fill() -> None:
        async with await open_store(folder, embeddings=ConceptEmbedder()) as store, \
                anyio.create_task_group() as tg:
            await tg.start(store.run)
            await store.add(DOCS["db.md"], name="db")
            await store.wait_embedded()
            await store.aclose()
            tg.cancel_scope.cancel()

    anyio.run(fill, backend=backend)
    code = textwrap.dedent(f"""
        import anyio
        from orion_fsm import ContextStore
        from tests.services.context.conftest import WordTokenizer, ConceptEmbedder
        async def main():
            store = await ContextStore.open({str(folder)!r}, tokenizer=WordTokenizer(),
                                            tokenizer_id="words", embeddings=ConceptEmbedder())
            hits = await store.search("table", top_k=1)
            stats = await store.stats()
            print(hits[0].document, hits[0].semantic_rank, stats.embedded, stats.chunks)
            await store.aclose()
        anyio.run(main)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": os.getcwd()}, check=True, timeout=60)
    assert out.stdout.split() == ["db", "1", "1", "1"]


def test_sigkill_during_add_leaves_every_document_whole(tmp_path: Path) -> None:
    folder = tmp_path / "s"
    code = textwrap.dedent(f"""
        import anyio, sys
        from orion_fsm import ContextStore, ChunkingConfig
        from tests.services.context.conftest import WordTokenizer
        async def main():
            store = await ContextStore.open({str(folder)!r}, tokenizer=WordTokenizer(),
                                            tokenizer_id="words",
                                            chunking=ChunkingConfig(max_tokens=40))
            i = 0
            while True:
                body = "\\n\\n".join(f"doc {{i}} paragraph {{j}} " + "filler " * 30
                                     for j in range(400))
                await store.add(body, name=f"doc{{i}}")
                print(i, flush=True)
                i += 1
        anyio.run(main)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert proc.stdout is not None
    proc.stdout.readline()  # one document is in; the next one is being written
    time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    db = sqlite3.connect(folder / "store.sqlite3")
    assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    for doc_id, chunks in db.execute("SELECT id, chunks FROM documents"):
        assert db.execute("SELECT count(*) FROM chunks WHERE doc = ?",
                          (doc_id,)).fetchone()[0] == chunks
    total = db.execute("SELECT count(*) FROM chunks").fetchone()[0]
    db.close()
    db = sqlite3.connect(folder / "store.sqlite3")
    fts_rows = db.execute("SELECT count(*) FROM fts_docsize").fetchone()[0]
    db.close()
    assert fts_rows == total  # the index holds exactly the chunks that are in

    async def reopen() -> None:
        async with await open_store(folder) as store:
            assert (await store.stats()).chunks == total >= 1
            hits = await store.search("doc 0 paragraph 7", top_k=1)
            assert hits and hits[0].document == "doc0"

    anyio.run(reopen)


@pytest.mark.anyio
async def test_a_document_is_stored_once_and_chunks_are_spans_of_it(tmp_path: Path) -> None:
    paragraphs = [f"Paragraph {i}: " + " ".join(f"w{i}x{j}" for j in range(20))
                  for i in range(12)]
    text = "Title\n=====\n\n" + "\n\n".join(paragraphs) + "\n"
    async with await open_store(tmp_path / "s") as store:
        added = await store.add(text, name="long.rst")
        assert added.chunks > 3  # overlapping chunks of one section
        hits = await store.chunks(list(range(1, added.chunks + 1)))
        assert all(hit.text in text for hit in hits)
        assert all(p in "".join(hit.text for hit in hits) for p in paragraphs)
    db = sqlite3.connect(tmp_path / "s" / "store.sqlite3")
    (packed,) = db.execute("SELECT text FROM documents").fetchone()
    columns = {row[1] for row in db.execute("PRAGMA table_info(chunks)")}
    db.close()
    assert len(packed) < len(text.encode())  # compressed as a whole
    assert not columns & {"text", "body"}  # chunks hold offsets, not text


@pytest.mark.anyio
async def test_a_store_of_an_older_schema_is_refused_and_left_as_it_was(tmp_path: Path) -> None:
    (tmp_path / "old").mkdir()
    db = sqlite3.connect(tmp_path / "old" / "store.sqlite3")
    db.execute("CREATE TABLE meta(key TEXT PRIMARY KEY, value TEXT NOT NULL)")
    db.execute("INSERT INTO meta VALUES ('schema', '1')")
    db.commit()
    db.close()
    with pytest.raises(ContextError, match=r"has schema 1.*add the documents again"):
        await open_store(tmp_path / "old")
    db = sqlite3.connect(tmp_path / "old" / "store.sqlite3")
    tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master")}
    db.close()
    assert "vectors" not in tables


class _RandomEmbedder:
    """384-dimensional unit vectors, one per text length: rows as large as MiniLM's."""

    def _vector(self, text: str) -> np.ndarray:
        v = np.random.default_rng(len(text)).normal(size=384).astype(np.float32)
        return v / np.linalg.norm(v)

    async def embed(self, text: str) -> np.ndarray:
        return self._vector(text)

    async def embed_many(self, texts: Sequence[str], *, remember: bool = True
                         ) -> list[np.ndarray]:
        return [self._vector(t) for t in texts]


@pytest.mark.anyio
async def test_int8_vectors_take_little_more_than_their_bytes_on_disk(
        tmp_path: Path) -> None:
    # Embedded shortest first, written by id: a vector costs little more than its 388 bytes.
    texts = [f"Doc {i}\n=====\n\n" + "\n\n".join(
        " ".join(f"w{i}x{j}x{k}" for k in range(5 + (i * 7 + j * 13) % 40))
        for j in range(30))
        for i in range(8)]
    async with anyio.create_task_group() as tg:
        store = await open_store(tmp_path / "s", embeddings=_RandomEmbedder())
        await tg.start(store.run)
        for i, text in enumerate(texts):
            await store.add(text, name=f"doc{i}.rst")
        await store.wait_embedded()
        embedded = (await store.stats()).embedded
        await store.aclose()
    db = sqlite3.connect(tmp_path / "s" / "store.sqlite3")
    size = db.execute("SELECT sum(pgsize) FROM dbstat WHERE name = 'vectors'").fetchone()[0]
    db.close()
    assert embedded > 100
    assert size / embedded < 1.25 * (384 + 4)


@pytest.mark.anyio
async def test_a_rankers_first_result_outranks_a_chunk_both_rank_lower(tmp_path: Path) -> None:
    from orion_fsm.services.context import _store

    async with await open_store(tmp_path / "s", embeddings=ConceptEmbedder()) as store:
        for name, text in DOCS.items():
            await store.add(text, name=name)
        ids = {h.document: h.chunk_id for h in await store.chunks(list(range(1, 20)))}

        def bm25(terms: Sequence[str], limit: int) -> list[tuple[int, float]]:
            return [(ids["sea.md"], 3.0), (ids["fruit.md"], 2.0), (ids["db.md"], 1.0)]

        async def nearest(query: str, limit: int) -> list[tuple[int, float]]:
            return [(ids["cars.md"], 0.9), (ids["sea.md"], 0.8), (ids["db.md"], 0.7)]

        store._bm25 = bm25  # type: ignore[method-assign]
        store._nearest = nearest  # type: ignore[method-assign]
        found = [h.document for h in await store.search("anything", top_k=4)]
    # The embeddings' first result (found by them alone) comes before the chunk both rankers
    # put third: with the classic k = 60 that agreement would have outranked it.
    assert found == ["sea.md", "cars.md", "db.md", "fruit.md"]
    assert _store._RRF_K < 1
