"""A persistent context store: documents far longer than a model's window, cut into chunks,
found again by BM25 (SQLite FTS5) and MiniLM embeddings fused by reciprocal rank.

One SQLite file per store (WAL; one transaction per document, so a killed process leaves a
document in or out). A document's text is stored once, zlib-compressed as a whole; chunks are
offsets into it; the FTS5 index is contentless; vectors are int8 with a scale per vector until
the store holds enough to learn a product quantizer from, then 48-byte codes (`_vectors`).
Blocking work runs in worker threads; vectors are computed in the background by `run()` and
join when ready.
"""

from __future__ import annotations

import hashlib
import threading
import time
import zlib
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, Literal, Protocol, Self

import anyio
from anyio.abc import TaskStatus

from orion_fsm._exceptions import (
    ConfigurationError,
    ContextError,
    EmbeddingError,
    EmbeddingUnavailable,
)
from orion_fsm.services.models._heap import release_freed_heap

from ._chunker import (
    Chunk,
    ChunkingConfig,
    DuplicateFilter,
    Encoder,
    chunk_text,
    detect_format,
    exact_key,
    normalise,
    simhash,
)
from ._gist import gist
from ._lexical import WORD, fts_match, indexed_columns, query_terms
from ._quantize import pack_int8
from ._store_values import AddResult, ContextHit, ContextStats
from ._vectors import Vectors, decode, learn_codebook, nearest, read_all, read_codebook

if TYPE_CHECKING:
    # Imported where used: sqlite3 and numpy would slow `import orion_fsm` down.
    import sqlite3

    import numpy as np

    from ._rerank import Reranker

__all__ = [
    "ContextStore",
    "SearchMode",
    "default_capacity_tokens",
]

SearchMode = Literal["fused", "lexical", "semantic"]
ProgressCallback = Callable[[int, int, str], None]  # (done, total, what)

_DB_FILE: Final = "store.sqlite3"
_SCHEMA_VERSION: Final = "3"
# Schema 2 differs by the codebook table and an index of chunks by document (1.5 % of the
# store; only removing a document reads chunks by document, scanning 7,400 rows in ~1 ms):
# opening a schema 2 store adds the one, drops the other and learns the codebook.
_MIGRATES: Final = frozenset({"2"})
# 2 KiB pages: a compressed document's last overflow page wastes half a page on average
# (library/, 317 documents: 4 KiB pages 5.38 MB, 2 KiB 5.23 MB, 1 KiB 5.27 MB).
_PAGE_SIZE: Final = 2048
# The write-ahead log is cut back to this after a checkpoint (it otherwise keeps the size
# of the largest transaction): the store's files stay near the database's own size.
_WAL_LIMIT: Final = 1 << 20
# Reciprocal rank fusion's constant (Cormack et al. use 60). Small, so that each ranker's
# own first results lead the fused list: on library/ most misses were a chunk one ranker put
# in its top 3 and the other missed, outranked by chunks both put around rank 10 (dev half
# of eval/context_questions.jsonl, gist vectors: k=60 27/34, k=0.5 29/34).
_RRF_K: Final = 0.5
# Kept over a convex combination of min-max normalised scores (Bruch et al., 2023): on all
# library/ vectors, lexical weights 0.2-0.8 moved recall@5 by one question either way, and
# while few vectors exist their scores, normalised to [0, 1], outweigh BM25's ranking.
# Background vectors go 8 at a time: a query's own embedding waits behind one such batch
# at most (the service's queue is first come, first served; the bench saw queries wait
# seconds behind batches of 32 on the loaded machine).
_EMBED_BATCH: Final = 8
# Chunks are read a window at a time and embedded shortest first: a batch's texts then have
# similar lengths and the model pads them little (padding is computed like text).
_EMBED_WINDOW: Final = 256
# MiniLM reads 256 word pieces at most (it was trained on 128) and its cost grows with length:
# a chunk's gist (heading, each definition's signature and first sentence, then its text)
# says what it is about, where its first characters are often the end of the previous
# definition (library/ dev half, embeddings only: 25-26/34 on the first 440 characters, 27/34
# on the gist). reST runs ~3.4 characters a word piece, so 440 characters are ~128 of them:
# 40 CPU-ms a chunk on one thread, against 72 for 640 characters (~190) and 79 for whole
# chunks cut at 256 (160 library/ chunks, in one run).
_EMBED_CHARS: Final = 440
_EMBED_RETRY_S: Final = 5.0
_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS documents(
    id INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT NOT NULL UNIQUE, source TEXT,
    sha256 TEXT NOT NULL, tokens INTEGER NOT NULL, chunks INTEGER NOT NULL,
    duplicates INTEGER NOT NULL, raw_bytes INTEGER NOT NULL, added_at REAL NOT NULL,
    used_at REAL NOT NULL, text BLOB NOT NULL, headings BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS chunks(
    id INTEGER PRIMARY KEY AUTOINCREMENT, doc INTEGER NOT NULL, position INTEGER NOT NULL,
    tokens INTEGER NOT NULL, start INTEGER NOT NULL, stop INTEGER NOT NULL,
    section INTEGER NOT NULL, exact BLOB NOT NULL, simhash INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS vectors(chunk INTEGER PRIMARY KEY, vector BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS codebook(
    id INTEGER PRIMARY KEY CHECK (id = 0), groups INTEGER NOT NULL, centroids BLOB NOT NULL);
CREATE VIRTUAL TABLE IF NOT EXISTS fts USING fts5(
    heading, body, content='', tokenize='porter unicode61');
"""
_TEXT_CACHE: Final = 64  # documents kept decompressed for reading hits


class TextEmbedder(Protocol):
    """Unit vectors for texts: the shared EmbeddingService satisfies it."""

    async def embed(self, text: str) -> np.ndarray: ...

    async def embed_many(self, texts: Sequence[str], *, remember: bool = True
                         ) -> list[np.ndarray]: ...


def default_capacity_tokens(ram_bytes: int | None = None) -> int:
    """Tokens a store holds by default, by the machine's RAM (the seed's table): under 8 GiB
    512K, under 16 GiB 1M, else 2M."""
    if ram_bytes is None:
        import psutil

        ram_bytes = int(psutil.virtual_memory().total)
    gib = ram_bytes / 2**30
    return 524_288 if gib < 8 else 1_048_576 if gib < 16 else 2_097_152


def _list_files(paths: Sequence[str | Path], suffixes: tuple[str, ...]
                ) -> list[tuple[Path, str, int]]:
    """(file, document name, size) of each file given and each file under the folders."""
    files: list[tuple[Path, str, int]] = []
    for given in paths:
        path = Path(given).expanduser()
        if path.is_dir():
            files.extend((f, str(f.relative_to(path.parent)), f.stat().st_size)
                         for f in sorted(path.rglob("*"))
                         if f.is_file() and f.name.lower().endswith(suffixes))
        elif path.is_file():
            files.append((path, path.name, path.stat().st_size))
        else:
            raise ContextError(f"no file or folder at {path}: check the path")
    return files


def _embedding_text(heading: str, text: str) -> str:
    return gist(heading, text, _EMBED_CHARS)


class ContextStore:
    """A named store of documents for retrieval. Open with `await ContextStore.open(...)`
    (or through `Engine.context(name)`), close with `await store.aclose()`.

    `tokenizer` counts tokens (the serving agent's own); `embeddings` (optional) gives the
    vectors: run `store.run` in a task group to compute them in the background.
    """

    def __init__(self, folder: Path, *, name: str, tokenizer: Encoder, tokenizer_id: str,
                 embeddings: TextEmbedder | None = None,
                 capacity_tokens: int | None = None,
                 chunking: ChunkingConfig | None = None) -> None:
        if capacity_tokens is not None and capacity_tokens < 1:
            raise ConfigurationError("ContextStore.capacity_tokens", capacity_tokens,
                                     "a positive number of tokens")
        self.name = name
        self.folder = folder = folder.expanduser()
        self.path = folder / _DB_FILE
        self.tokenizer = tokenizer
        self.tokenizer_id = tokenizer_id
        self.embeddings = embeddings
        self.capacity_tokens = capacity_tokens or default_capacity_tokens()
        self.chunking = chunking or ChunkingConfig()
        self._write_lock = threading.Lock()
        self._read_lock = threading.Lock()
        # Loading the vectors and appending new ones exclude each other: none is missed.
        self._vec_lock = threading.Lock()
        self._writer: sqlite3.Connection | None = None
        self._reader: sqlite3.Connection | None = None
        self._dups = DuplicateFilter()
        self._vectors = Vectors()
        self._vectors_loaded = False
        self._limiter = anyio.CapacityLimiter(1)  # one writer thread; SQLite serialises anyway
        self._read_limiter = anyio.CapacityLimiter(2)
        self._wakeup = anyio.Event()
        self._idle = anyio.Event()  # set when no chunk waits for a vector
        self._embed_error: str | None = None
        self._running = False
        self._closing = False
        self._run_scope: anyio.CancelScope | None = None
        self._stopped = anyio.Event()
        self._stopped.set()  # not running
        self._used: dict[int, float] = {}  # documents found since the last LRU write
        # Decompressed documents (text, section headings), most recently read last.
        self._texts: OrderedDict[int, tuple[str, list[str]]] = OrderedDict()
        self._texts_lock = threading.Lock()
        self._embed_cursor = 0  # chunks up to this id have their vectors (a hint)

    # --- lifetime ---------------------------------------------------------------------------

    @classmethod
    async def open(cls, folder: str | Path, *, name: str | None = None, tokenizer: Encoder,
                   tokenizer_id: str, embeddings: TextEmbedder | None = None,
                   capacity_tokens: int | None = None,
                   chunking: ChunkingConfig | None = None) -> ContextStore:
        store = cls(Path(folder), name=name or Path(folder).name, tokenizer=tokenizer,
                    tokenizer_id=tokenizer_id, embeddings=embeddings,
                    capacity_tokens=capacity_tokens, chunking=chunking)
        await anyio.to_thread.run_sync(store._open_sync, limiter=store._limiter)
        return store

    def _connect(self) -> sqlite3.Connection:
        import sqlite3

        db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None,
                             timeout=30.0)
        # Both only take effect on a new, empty database (before the WAL header is written).
        db.execute(f"PRAGMA page_size={_PAGE_SIZE}")
        # Pages freed by removing documents go back to the file system (incremental_vacuum).
        db.execute("PRAGMA auto_vacuum=INCREMENTAL")
        db.execute("PRAGMA journal_mode=WAL")
        db.execute(f"PRAGMA journal_size_limit={_WAL_LIMIT}")
        # WAL + NORMAL: a killed process loses nothing committed; a power cut may lose the
        # last transactions but never leaves a half-written one.
        db.execute("PRAGMA synchronous=NORMAL")
        return db

    def _open_sync(self) -> None:
        import sqlite3

        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            writer = self._connect()
        except (OSError, sqlite3.Error) as exc:
            raise ContextError(f"cannot open context store {self.name!r} at {self.path}: "
                               f"{exc}; check the folder exists and is writable") from exc
        try:
            # The version is read before any table is created: an older store stays as it was.
            writer.execute("CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, "
                           "value TEXT NOT NULL)")
            meta = dict(writer.execute("SELECT key, value FROM meta").fetchall())
            schema = meta.get("schema", _SCHEMA_VERSION)
            if schema != _SCHEMA_VERSION and schema not in _MIGRATES:
                writer.close()
                raise ContextError(
                    f"context store {self.name!r} at {self.path} has schema "
                    f"{meta['schema']}, this version reads {_SCHEMA_VERSION}: remove the "
                    "folder and add the documents again")
            writer.executescript(_SCHEMA)
            if schema in _MIGRATES:
                self._migrate(writer)
            writer.execute("INSERT OR IGNORE INTO meta VALUES ('schema', ?)", (_SCHEMA_VERSION,))
            writer.execute("INSERT OR IGNORE INTO meta VALUES ('tokenizer', ?)",
                           (self.tokenizer_id,))
            self._stored_tokenizer = str(meta.get("tokenizer", self.tokenizer_id))
            for chunk_id, key, sim in writer.execute("SELECT id, exact, simhash FROM chunks"):
                self._dups.add(chunk_id, key, sim)
        except sqlite3.DatabaseError as exc:
            writer.close()
            raise ContextError(f"context store {self.name!r} at {self.path} is not readable "
                               f"({exc}): remove the folder and add the documents again"
                               ) from exc
        self._writer = writer
        self._reader = self._connect()

    def _migrate(self, db: sqlite3.Connection) -> None:
        """Schema 2 to 3, in one transaction: the codebook table exists (the script made it);
        a store with enough int8 vectors gets their codes now, as if they had just arrived."""
        db.execute("BEGIN IMMEDIATE")
        try:
            learn_codebook(db)
            db.execute("DROP INDEX IF EXISTS chunks_by_doc")
            db.execute("UPDATE meta SET value = ? WHERE key = 'schema'", (_SCHEMA_VERSION,))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        self._compact(db)

    async def aclose(self) -> None:
        """Stop the background embedding (a batch being written finishes), then close."""
        self._closing = True
        self._wakeup.set()
        if self._run_scope is not None:
            self._run_scope.cancel()
        with anyio.CancelScope(shield=True):
            await self._stopped.wait()
            await anyio.to_thread.run_sync(self._close_sync, limiter=self._limiter)

    def _close_sync(self) -> None:
        with self._write_lock:
            if self._used and self._writer is not None:
                self._flush_used(self._writer)
            for db in (self._reader, self._writer):
                if db is not None:
                    db.close()
            self._reader = self._writer = None

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.aclose()

    def _db(self) -> sqlite3.Connection:
        if self._writer is None:
            raise ContextError(f"context store {self.name!r} is closed: open it again")
        return self._writer

    def _rdb(self) -> sqlite3.Connection:
        if self._reader is None:
            raise ContextError(f"context store {self.name!r} is closed: open it again")
        return self._reader

    # --- adding -----------------------------------------------------------------------------

    async def add(self, text: str, *, name: str, source: str | None = None) -> AddResult:
        """Add (or replace) document `name`: chunked, de-duplicated and indexed in one
        transaction; searchable by BM25 when this returns, by embeddings once computed."""
        if not isinstance(text, str):
            raise ContextError(f"document {name!r} must be text, got {type(text).__name__}")
        if not name or not name.strip():
            raise ContextError("a document needs a non-empty name: pass name=…")
        result = await anyio.to_thread.run_sync(self._add_sync, text, name, source,
                                                limiter=self._limiter)
        if result.chunks:
            self._wakeup.set()
        return result

    async def add_paths(self, paths: Iterable[str | Path], *,
                        progress: ProgressCallback | None = None,
                        suffixes: tuple[str, ...] = (".rst", ".txt", ".md", ".markdown")
                        ) -> list[AddResult]:
        """Add files, and the files under folders (those ending with `suffixes`); each file
        is a document named by its path relative to the folder given. `progress(done_bytes,
        total_bytes, name)` after each file."""
        files = await anyio.to_thread.run_sync(_list_files, list(paths), suffixes)
        total = sum(size for _, _, size in files)
        done = 0
        results = []
        for file, name, size in files:
            try:
                text = await anyio.Path(file).read_text(encoding="utf-8", errors="replace")
            except OSError as exc:
                raise ContextError(f"cannot read {file}: {exc}") from exc
            results.append(await self.add(text, name=name, source=str(file)))
            done += size
            if progress is not None:
                progress(done, total, name)
        if any(not r.unchanged for r in results):
            await anyio.to_thread.run_sync(self._settle_sync, limiter=self._limiter)
        return results

    def _add_sync(self, text: str, name: str, source: str | None) -> AddResult:
        digest = hashlib.sha256(text.encode()).hexdigest()
        with self._write_lock:
            db = self._db()
            row = db.execute("SELECT id, sha256, chunks FROM documents WHERE name = ?",
                             (name,)).fetchone()
            if row is not None and row[1] == digest:
                return AddResult(row[0], name, 0, row[2], 0, unchanged=True)
        # Chunking, counting tokens and compressing (the slow part) happen outside the lock.
        raw_bytes = len(text.encode())
        text = normalise(text)
        chunks = chunk_text(text, self.tokenizer, fmt=detect_format(text, name),
                            config=self.chunking)
        prints = [(exact_key(c.text), simhash(c.text)) for c in chunks]
        sections = list(dict.fromkeys(c.heading for c in chunks))
        section_of = {heading: i for i, heading in enumerate(sections)}
        packed_text = zlib.compress(text.encode(), 9)
        packed_headings = zlib.compress("\n".join(sections).encode(), 9)
        with self._write_lock:
            db = self._db()
            db.execute("BEGIN IMMEDIATE")
            added: list[tuple[int, bytes, int]] = []
            try:
                old = db.execute("SELECT id FROM documents WHERE name = ?", (name,)).fetchone()
                if old is not None:
                    self._delete_doc(db, old[0])
                kept, duplicates = self._dedup(chunks, prints)
                tokens = sum(c.tokens for c, _ in kept)
                if tokens > self.capacity_tokens:
                    raise ContextError(
                        f"document {name!r} is {tokens} tokens, more than the store's "
                        f"capacity of {self.capacity_tokens}: raise capacity_tokens or split it")
                evicted = self._make_room(db, tokens)
                now = time.time()
                cursor = db.execute(
                    "INSERT INTO documents(name, source, sha256, tokens, chunks, duplicates, "
                    "raw_bytes, added_at, used_at, text, headings) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (name, source, digest, tokens, len(kept), duplicates, raw_bytes, now, now,
                     packed_text, packed_headings))
                doc_id = cursor.lastrowid
                assert doc_id is not None
                for chunk, (key, sim) in kept:
                    cur = db.execute(
                        "INSERT INTO chunks(doc, position, tokens, start, stop, section, exact,"
                        " simhash) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                        (doc_id, chunk.position, chunk.tokens, chunk.start, chunk.end,
                         section_of[chunk.heading], key, sim))
                    chunk_id = cur.lastrowid
                    assert chunk_id is not None
                    db.execute("INSERT INTO fts(rowid, heading, body) VALUES (?, ?, ?)",
                               (chunk_id, *indexed_columns(chunk.heading, chunk.text)))
                    added.append((chunk_id, key, sim))
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                self._reload_dups(db)
                raise
        for chunk_id, key, sim in added:
            self._dups.add(chunk_id, key, sim)
        return AddResult(doc_id, name, tokens, len(kept), duplicates, evicted=evicted)

    def _settle_sync(self) -> None:
        with self._write_lock:
            self._settle(self._db())

    def _settle(self, db: sqlite3.Connection) -> None:
        """After a large add or a removal: FTS5's segments merged into one, dropping what
        deleted rows left (a contentless index forgets a row by adding a tombstone;
        library/: 2.59 -> 2.48 MB, 0.2 s), then the files compacted."""
        db.execute("INSERT INTO fts(fts) VALUES ('optimize')")
        self._compact(db)

    def _compact_sync(self) -> None:
        with self._write_lock:
            self._compact(self._db())

    def _dedup(self, chunks: Sequence[Chunk], prints: Sequence[tuple[bytes, int]]
               ) -> tuple[list[tuple[Chunk, tuple[bytes, int]]], int]:
        kept: list[tuple[Chunk, tuple[bytes, int]]] = []
        local = DuplicateFilter(self._dups.max_distance)
        for i, (chunk, (key, sim)) in enumerate(zip(chunks, prints, strict=True)):
            if (self._dups.duplicate_of(key, sim) is None
                    and local.duplicate_of(key, sim) is None):
                kept.append((chunk, (key, sim)))
                local.add(-1 - i, key, sim)  # this document's own repeats count too
        return kept, len(chunks) - len(kept)

    def _reload_dups(self, db: sqlite3.Connection) -> None:
        self._dups = DuplicateFilter(self._dups.max_distance)
        for chunk_id, key, sim in db.execute("SELECT id, exact, simhash FROM chunks"):
            self._dups.add(chunk_id, key, sim)

    def _make_room(self, db: sqlite3.Connection, tokens: int) -> tuple[str, ...]:
        """Evict least recently used documents until `tokens` more fit (same transaction)."""
        self._flush_used(db)
        held = db.execute("SELECT coalesce(sum(tokens), 0) FROM documents").fetchone()[0]
        evicted: list[str] = []
        if held + tokens <= self.capacity_tokens:
            return ()
        for doc_id, doc_name, doc_tokens in db.execute(
                "SELECT id, name, tokens FROM documents ORDER BY used_at, id").fetchall():
            if held + tokens <= self.capacity_tokens:
                break
            self._delete_doc(db, doc_id)
            held -= doc_tokens
            evicted.append(doc_name)
        return tuple(evicted)

    def _delete_doc(self, db: sqlite3.Connection, doc_id: int) -> None:
        """Inside a transaction: the document, its chunks, vectors and index entries."""
        text, headings = self._document(db, doc_id)
        for chunk_id, section, start, stop in db.execute(
                "SELECT id, section, start, stop FROM chunks WHERE doc = ?", (doc_id,)
                ).fetchall():
            # A contentless FTS5 table forgets a row only when given the text it indexed.
            db.execute("INSERT INTO fts(fts, rowid, heading, body) VALUES ('delete', ?, ?, ?)",
                       (chunk_id, *indexed_columns(headings[section], text[start:stop])))
            self._dups.discard(chunk_id)
            self._vectors.removed.add(chunk_id)
        db.execute("DELETE FROM vectors WHERE chunk IN (SELECT id FROM chunks WHERE doc = ?)",
                   (doc_id,))
        if db.execute("SELECT 1 FROM vectors LIMIT 1").fetchone() is None:
            # An empty store learns its codebook again from the vectors that come next.
            db.execute("DELETE FROM codebook")
        db.execute("DELETE FROM chunks WHERE doc = ?", (doc_id,))
        db.execute("DELETE FROM documents WHERE id = ?", (doc_id,))
        with self._texts_lock:
            self._texts.pop(doc_id, None)

    def _document(self, db: sqlite3.Connection, doc_id: int) -> tuple[str, list[str]]:
        """A document's text and its section headings (by chunk `section`), decompressed
        once and kept for the next hits in it. The caller holds the connection's lock."""
        with self._texts_lock:
            found = self._texts.get(doc_id)
            if found is not None:
                self._texts.move_to_end(doc_id)
                return found
        row = db.execute("SELECT text, headings FROM documents WHERE id = ?",
                         (doc_id,)).fetchone()
        if row is None:
            return "", []
        found = (zlib.decompress(row[0]).decode(), zlib.decompress(row[1]).decode().split("\n"))
        with self._texts_lock:
            self._texts[doc_id] = found
            while len(self._texts) > _TEXT_CACHE:
                self._texts.popitem(last=False)
        return found

    # --- removing ---------------------------------------------------------------------------

    async def remove(self, document: str | int) -> bool:
        """Remove a document by name or id; False if the store does not hold it."""
        return await anyio.to_thread.run_sync(self._remove_sync, document,
                                              limiter=self._limiter)

    def _remove_sync(self, document: str | int) -> bool:
        with self._write_lock:
            db = self._db()
            column = "id" if isinstance(document, int) else "name"
            row = db.execute(f"SELECT id FROM documents WHERE {column} = ?",
                             (document,)).fetchone()
            if row is None:
                return False
            db.execute("BEGIN IMMEDIATE")
            try:
                self._delete_doc(db, row[0])
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                self._reload_dups(db)
                raise
            self._settle(db)
            return True

    # --- searching --------------------------------------------------------------------------

    async def search(self, query: str, top_k: int = 5, *, mode: SearchMode = "fused",
                     reranker: Reranker | None = None) -> list[ContextHit]:
        """The `top_k` best chunks for `query`: BM25 and embedding ranks fused (RRF); BM25
        alone while vectors are not computed yet (or `mode="lexical"`). A `reranker` reads
        the best `reranker.candidates` and its ranking is fused in (RRF again)."""
        if top_k < 1:
            raise ContextError(f"top_k must be at least 1, got {top_k}")
        pool = max(50, top_k * 10)
        lexical: list[tuple[int, float]] = []
        semantic: list[tuple[int, float]] = []
        if mode != "semantic":
            lexical = await anyio.to_thread.run_sync(self._bm25, query_terms(query), pool,
                                                     limiter=self._read_limiter)
        if mode != "lexical" and self.embeddings is not None and self._embed_error is None:
            semantic = await self._nearest(query, pool)
        fused: dict[int, float] = {}
        for ranking in (lexical, semantic):
            for rank, (chunk_id, _) in enumerate(ranking, 1):
                fused[chunk_id] = fused.get(chunk_id, 0.0) + 1.0 / (_RRF_K + rank)
        wanted = top_k if reranker is None else max(top_k, reranker.candidates)
        best = sorted(fused, key=lambda c: -fused[c])[:wanted]
        if not best:
            return []
        lex_rank = {c: r for r, (c, _) in enumerate(lexical, 1)}
        sem = {c: (r, s) for r, (c, s) in enumerate(semantic, 1)}
        hits = await anyio.to_thread.run_sync(self._hits, best, fused, lex_rank, sem,
                                              query_terms(query), limiter=self._read_limiter)
        if reranker is None:
            return hits
        return (await reranker.rerank(query, hits, rrf_k=_RRF_K))[:top_k]

    def _bm25(self, terms: Sequence[str], limit: int) -> list[tuple[int, float]]:
        if not terms:
            return []
        with self._read_lock:
            # bm25() is lower-is-better; a heading match weighs three body matches (chosen
            # on the dev half of eval/context_questions.jsonl: 2.0 → 3.0 found 2 more).
            return [(row[0], -row[1]) for row in self._rdb().execute(
                "SELECT rowid, bm25(fts, 3.0, 1.0) AS score FROM fts WHERE fts MATCH ? "
                "ORDER BY score LIMIT ?", (fts_match(terms), limit))]

    async def _nearest(self, query: str, limit: int) -> list[tuple[int, float]]:
        if not self._vectors_loaded:
            await anyio.to_thread.run_sync(self._load_vectors, limiter=self._read_limiter)
        vectors = self._vectors
        if vectors.ids is None or not len(vectors.ids):
            return []
        assert self.embeddings is not None
        try:
            q = await self.embeddings.embed(query)
        except EmbeddingUnavailable as exc:
            self._embed_error = exc.message
            return []
        except EmbeddingError:
            return []  # busy: this search is lexical only
        return await anyio.to_thread.run_sync(nearest, self._vectors, q, limit,
                                              limiter=self._read_limiter)

    def _load_vectors(self) -> None:
        with self._vec_lock:
            if self._vectors_loaded:
                return
            with self._read_lock:
                self._vectors.ids, self._vectors.matrix = read_all(self._rdb())
            self._vectors_loaded = True

    def _hits(self, best: Sequence[int], fused: dict[int, float], lex_rank: dict[int, int],
              sem: dict[int, tuple[int, float]], terms: Sequence[str]) -> list[ContextHit]:
        marks = ",".join("?" * len(best))
        with self._read_lock:
            db = self._rdb()
            rows = {r[0]: r for r in db.execute(
                "SELECT c.id, c.doc, d.name, c.position, c.section, c.start, c.stop, c.tokens "
                f"FROM chunks c JOIN documents d ON d.id = c.doc WHERE c.id IN ({marks})",
                tuple(best))}
            texts = {row[1]: self._document(db, row[1]) for row in rows.values()}
        hits = []
        now = time.time()
        for chunk_id in best:
            row = rows.get(chunk_id)
            if row is None:
                continue  # removed between ranking and reading
            doc_text, headings = texts[row[1]]
            heading, text = headings[row[4]], doc_text[row[5]:row[6]]
            words = set(WORD.findall((heading + " " + text).lower()))
            rank, similarity = sem.get(chunk_id, (None, None))
            hits.append(ContextHit(chunk_id, row[1], row[2], row[3], heading, text, row[7],
                            fused[chunk_id], lex_rank.get(chunk_id), rank, similarity,
                            tuple(t for t in terms if t in words)))
            self._used[row[1]] = now
        return hits

    def _flush_used(self, db: sqlite3.Connection) -> None:
        """Write when documents were last found (the LRU order) in one statement batch."""
        used, self._used = self._used, {}
        if used:
            db.executemany("UPDATE documents SET used_at = max(used_at, ?) WHERE id = ?",
                           [(t, d) for d, t in used.items()])

    async def chunks(self, ids: Sequence[int]) -> list[ContextHit]:
        """Chunks by id, in the order given (those the store no longer holds are left out)."""
        if not ids:
            return []
        return await anyio.to_thread.run_sync(
            self._hits, list(ids), dict.fromkeys(ids, 0.0), {}, {}, (),
            limiter=self._read_limiter)

    # --- embeddings in the background -------------------------------------------------------

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Compute missing vectors, batch by batch, until `aclose()`; start in a task group."""
        if self._running or self._closing:
            raise ContextError(f"context store {self.name!r} is already computing vectors "
                               "or is closed")
        self._running = True
        self._stopped = anyio.Event()
        task_status.started()
        try:
            with anyio.CancelScope() as self._run_scope:
                await self._embed_missing()
        finally:
            self._running = False
            self._run_scope = None
            self._idle.set()
            self._stopped.set()

    async def _embed_missing(self) -> None:
        while not self._closing:
            if self.embeddings is None or self._embed_error is not None:
                self._idle.set()
                await self._wait()
                continue
            window = await anyio.to_thread.run_sync(self._unembedded, _EMBED_WINDOW,
                                                    limiter=self._read_limiter)
            if not window:
                if not self._idle.is_set():  # the vectors just written: the log folded in
                    await anyio.to_thread.run_sync(self._compact_sync, limiter=self._limiter)
                    # A pass's thousands of batches leave their tensors in the heap (library/:
                    # 220 of 976 MB of RSS growth handed back).
                    await anyio.to_thread.run_sync(release_freed_heap, limiter=self._limiter)
                self._idle.set()
                await self._wait()
                continue
            self._idle = anyio.Event() if self._idle.is_set() else self._idle
            texts = sorted(((chunk_id, _embedding_text(heading, text))
                            for chunk_id, heading, text in window), key=lambda c: len(c[1]))
            if await self._embed_sorted(texts):
                self._embed_cursor = max(self._embed_cursor, window[-1][0])

    async def _embed_sorted(self, texts: Sequence[tuple[int, str]]) -> bool:
        """Vectors for (chunk id, text) pairs, batch by batch; False if embedding stopped."""
        assert self.embeddings is not None
        ids: list[int] = []
        vectors: list[np.ndarray] = []
        complete, retry = True, False
        for at in range(0, len(texts), _EMBED_BATCH):
            if self._closing:
                complete = False
                break
            batch = texts[at:at + _EMBED_BATCH]
            try:
                vectors += await self.embeddings.embed_many([t for _, t in batch],
                                                            remember=False)
            except EmbeddingUnavailable as exc:
                self._embed_error = exc.message  # lexical search goes on alone
                complete = False
                break
            except EmbeddingError:
                complete, retry = False, True  # a busy or restarting model: later
                break
            ids += [c for c, _ in batch]
        if ids:
            # One transaction a window, in id order: the vectors table grows at its end.
            order = sorted(range(len(ids)), key=ids.__getitem__)
            await anyio.to_thread.run_sync(self._store_vectors, [ids[i] for i in order],
                                           [vectors[i] for i in order], limiter=self._limiter)
        if retry:
            await anyio.sleep(_EMBED_RETRY_S)
        return complete

    async def _wait(self) -> None:
        await self._wakeup.wait()
        self._wakeup = anyio.Event()

    async def wait_embedded(self) -> None:
        """Return once every chunk has its vector (or embeddings are off or failed)."""
        if self.embeddings is None:
            return
        if not self._running:
            raise ContextError(f"context store {self.name!r} computes no vectors: start "
                               "`store.run` in a task group (the Engine does it)")
        while True:
            await self._idle.wait()
            pending = await anyio.to_thread.run_sync(self._pending_count,
                                                     limiter=self._read_limiter)
            if not pending or self._embed_error is not None or self._closing:
                return
            self._idle = anyio.Event()
            self._wakeup.set()

    def _pending_count(self) -> int:
        with self._read_lock:
            return int(self._rdb().execute(
                "SELECT count(*) FROM chunks c WHERE NOT EXISTS "
                "(SELECT 1 FROM vectors v WHERE v.chunk = c.id)").fetchone()[0])

    def _unembedded(self, limit: int) -> list[tuple[int, str, str]]:
        """(id, heading, text) of up to `limit` chunks without a vector, oldest first."""
        with self._read_lock:
            db = self._rdb()
            for after in dict.fromkeys((self._embed_cursor, 0)):
                rows = db.execute(
                    "SELECT c.id, c.doc, c.section, c.start, c.stop FROM chunks c "
                    "WHERE c.id > ? AND NOT EXISTS (SELECT 1 FROM vectors v WHERE v.chunk = c.id)"
                    " ORDER BY c.id LIMIT ?", (after, limit)).fetchall()
                if rows:
                    break
            out = []
            for chunk_id, doc, section, start, stop in rows:
                text, headings = self._document(db, doc)
                out.append((chunk_id, headings[section], text[start:stop]))
        return out

    def _store_vectors(self, ids: Sequence[int], vectors: Sequence[np.ndarray]) -> None:
        import numpy as np

        with self._vec_lock, self._write_lock:
            db = self._db()
            db.execute("BEGIN IMMEDIATE")
            try:
                quantizer = read_codebook(db)
                packed = ([pack_int8(v) for v in vectors] if quantizer is None
                          else [c.tobytes() for c in quantizer.encode(np.stack(vectors))])
                # A chunk removed while its vector was computed gets none.
                db.executemany(
                    "INSERT OR REPLACE INTO vectors(chunk, vector) SELECT ?, ? "
                    "WHERE EXISTS (SELECT 1 FROM chunks WHERE id = ?)",
                    [(i, p, i) for i, p in zip(ids, packed, strict=True)])
                learnt = quantizer is None and learn_codebook(db)
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
            if learnt:
                self._compact(db)
            if not self._vectors_loaded:
                return
            v = self._vectors
            if learnt:  # every row changed: read back what a reopened store would read
                v.ids, v.matrix = read_all(db)
                return
            new_ids = np.asarray(ids, dtype=np.int64)
            rows = decode(quantizer, packed)
            v.ids = new_ids if v.ids is None else np.concatenate([v.ids, new_ids])
            v.matrix = rows if v.matrix is None else np.concatenate([v.matrix, rows])

    def _compact(self, db: sqlite3.Connection) -> None:
        """Outside a transaction: free pages back to the file system and the write-ahead log
        folded into the database and cut to nothing, so the folder holds what the store is.
        Under the read lock: no read of ours holds an old snapshot the checkpoint waits on."""
        with self._read_lock:
            # Through executescript: execute() steps the pragma once, freeing one page.
            db.executescript("PRAGMA incremental_vacuum;")
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()

    # --- reading about the store ------------------------------------------------------------

    async def stats(self) -> ContextStats:
        return await anyio.to_thread.run_sync(self._stats_sync, limiter=self._read_limiter)

    def _stats_sync(self) -> ContextStats:
        with self._read_lock:
            db = self._rdb()
            documents, tokens, raw = db.execute(
                "SELECT count(*), coalesce(sum(tokens), 0), coalesce(sum(raw_bytes), 0) "
                "FROM documents").fetchone()
            chunks = db.execute("SELECT count(*) FROM chunks").fetchone()[0]
            embedded = db.execute("SELECT count(*) FROM vectors").fetchone()[0]
        disk = sum(p.stat().st_size for p in self.folder.glob(_DB_FILE + "*") if p.is_file())
        state = ("off" if self.embeddings is None else self._embed_error
                 or ("ready" if embedded == chunks else "pending"))
        return ContextStats(self.name, self.folder, documents, chunks, tokens,
                            self.capacity_tokens, embedded, raw, disk, state,
                            self._stored_tokenizer)

    async def documents(self) -> list[dict[str, Any]]:
        """Each document: id, name, source, tokens, chunks, duplicates, added_at, used_at."""
        def read() -> list[dict[str, Any]]:
            with self._read_lock:
                cur = self._rdb().execute(
                    "SELECT id, name, source, tokens, chunks, duplicates, added_at, used_at "
                    "FROM documents ORDER BY id")
                names = [d[0] for d in cur.description]
                return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]
        return await anyio.to_thread.run_sync(read, limiter=self._read_limiter)

    async def summary(self, max_tokens: int = 512) -> str:
        """A compressed overview of what the store holds, within `max_tokens`: each
        document with its sections, most recently used first, cut to fit (token-exact)."""
        if max_tokens < 1:
            raise ContextError(f"max_tokens must be at least 1, got {max_tokens}")
        return await anyio.to_thread.run_sync(self._summary_sync, max_tokens,
                                              limiter=self._read_limiter)

    def _summary_sync(self, max_tokens: int) -> str:
        with self._read_lock:
            docs = self._rdb().execute(
                "SELECT id, name, tokens, chunks FROM documents ORDER BY used_at DESC, id"
            ).fetchall()
            sections = {}
            for doc_id, *_ in docs:
                rows = self._rdb().execute(
                    "SELECT headings FROM documents WHERE id = ?", (doc_id,)).fetchone()
                sections[doc_id] = [h.split(" > ")[-1] for h in
                                    zlib.decompress(rows[0]).decode().split("\n") if h]
        total = sum(d[2] for d in docs)
        lines = [f"{self.name}: {len(docs)} documents, {total} tokens"]
        for doc_id, name, tokens, chunks in docs:
            heads = "; ".join(dict.fromkeys(sections[doc_id]))
            lines.append(f"- {name} ({tokens} tokens, {chunks} chunks)"
                         + (f": {heads}" if heads else ""))
        text = "\n".join(lines)
        ids = self.tokenizer.encode(text)
        if len(ids) <= max_tokens:
            return text
        # Cut at a line, then at a word, until the tokenizer agrees it fits.
        kept: list[str] = []
        for line in lines:
            candidate = "\n".join([*kept, line])
            if len(self.tokenizer.encode(candidate)) > max_tokens:
                words = line.split(" ")
                while words and len(self.tokenizer.encode(
                        "\n".join([*kept, " ".join(words) + " …"]))) > max_tokens:
                    words.pop()
                if words:
                    kept.append(" ".join(words) + " …")
                break
            kept.append(line)
        return "\n".join(kept)
