"""Context store on a real corpus: the Python 3.11 `library/` reST sources from Debian's
python3.11-doc (≈1.7M tokens). Add time, background embedding time, search latency, RSS,
disk size (and what takes it), reopen time, recall@5 (BM25, embeddings, fused, and fused
reranked by Gemma 3 270M, the opt-in stage, with its latency) on
eval/context_questions.jsonl (all, and the held-out half: odd lines; the even lines were the
dev half the settings were chosen on; also by the strict answer-text matcher), an answer
through `retrieving`, and a SIGKILL during `add`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import psutil

from bench._common import check, percentile
from orion_fsm import (
    ContextStore,
    EmbeddingService,
    Engine,
    RequestFailed,
    Reranker,
    evaluate_context,
    load_questions,
)

QUESTIONS = Path(__file__).parent.parent / "eval" / "context_questions.jsonl"
_LIBRARY = Path("/usr/share/doc/python3.11/html/_sources/library")
_INSTALL = "apt-get update && apt-get install -y python3.11-doc"
# The machine is shared: the embedding pass stops here and reports its rate rather than
# holding the whole benchmark run hostage.
_EMBED_CAP_S = {False: 1500.0, True: 300.0}


def library_sources() -> Path:
    """The corpus folder: found, or installed with apt when running as root, or a clear error."""
    if _LIBRARY.is_dir():
        return _LIBRARY
    found = subprocess.run(["dpkg", "-L", "python3.11-doc"], capture_output=True, text=True)
    for line in found.stdout.splitlines():
        if line.endswith("/_sources/library"):
            return Path(line)
    if os.geteuid() == 0 and shutil.which("apt-get"):
        print(f"[bench] installing python3.11-doc: {_INSTALL}", file=sys.stderr)
        done = subprocess.run(["apt-get", "install", "-y", "python3.11-doc"],
                              capture_output=True, text=True)
        if done.returncode != 0:
            subprocess.run(["apt-get", "update"], capture_output=True, text=True)
            subprocess.run(["apt-get", "install", "-y", "python3.11-doc"],
                           capture_output=True, text=True)
        if _LIBRARY.is_dir():
            return _LIBRARY
    raise RuntimeError(f"the corpus is missing: install Debian's python3.11-doc "
                       f"(`sudo {_INSTALL}`), then run the benchmark again")


def _rss() -> int:
    return int(psutil.Process().memory_info().rss)


def _cpu_s() -> float:
    times = psutil.Process().cpu_times()
    return float(times.user + times.system)


async def _measure(folder: Path, quick: bool) -> dict[str, Any]:
    corpus = library_sources()
    raw_bytes = sum(f.stat().st_size for f in corpus.glob("*.rst.txt"))
    questions = load_questions(QUESTIONS)
    out: dict[str, Any] = {"corpus": str(corpus), "raw_bytes": raw_bytes,
                           "questions": len(questions)}
    embeddings = EmbeddingService()
    engine = Engine(trace_path=folder / "trace.jsonl", warm_up=False, cache_dir=folder / "cache",
                    contexts={"pydocs": folder / "pydocs"}, embeddings=embeddings,
                    context_capacity_tokens=4_194_304,
                    # SmolLM2 reads ~1.8K prompt tokens: minutes on a loaded 2-core machine.
                    timeout_s=900)
    async with engine:
        store = await engine.context("pydocs")  # opening prepares SmolLM2's tokenizer
        rss_before = _rss()
        started = time.perf_counter()
        added = await store.add_paths([corpus])
        out["lexical_ready_s"] = time.perf_counter() - started
        # The add is ~9.5 CPU-s of one thread (chunking, SmolLM2's tokenizer, FTS5): a wall
        # time far above it is the shared machine's load, printed beside it.
        out["load_avg_1min_after_add"] = os.getloadavg()[0]
        out["rss_growth_lexical_mb"] = (_rss() - rss_before) / 2**20
        stats = await store.stats()
        out.update(documents=stats.documents, chunks=stats.chunks, tokens=stats.tokens,
                   duplicates=sum(a.duplicates for a in added))
        lexical_ms = []
        for q in questions:
            t = time.perf_counter()
            await store.search(q.query, 5, mode="lexical")
            lexical_ms.append((time.perf_counter() - t) * 1e3)
        out["lexical_search_p50_ms"] = percentile(lexical_ms, 0.5)
        out["lexical_search_p99_ms"] = percentile(lexical_ms, 0.99)
        started = time.perf_counter()
        cpu_before = _cpu_s()
        embedded_before = (await store.stats()).embedded
        with anyio.move_on_after(_EMBED_CAP_S[quick]):
            await store.wait_embedded()
        embed_s = time.perf_counter() - started
        stats = await store.stats()
        # CPU seconds of this process per vector: what the wall time would be on cores of
        # its own (one thread), whatever the load of the shared machine.
        out["embed_cpu_s_per_chunk"] = (_cpu_s() - cpu_before) / max(
            1, stats.embedded - embedded_before)
        out.update(embedded=stats.embedded, embed_s=embed_s,
                   embed_chunks_per_s=stats.embedded / embed_s if embed_s else 0.0,
                   embeddings_state=stats.embeddings)
        out["embeddings_complete_s"] = (embed_s if stats.embedded == stats.chunks
                                        else embed_s * stats.chunks / max(1, stats.embedded))
        out["embeddings_complete_extrapolated"] = stats.embedded != stats.chunks
        out["rss_growth_mb"] = (_rss() - rss_before) / 2**20
        # Every file SQLite keeps while the store is open (database, -wal, -shm).
        out["disk_bytes_open"] = sum(p.stat().st_size for p in (folder / "pydocs").glob("*")
                                     if p.is_file())
        held_out = questions[1::2]
        for mode in ("lexical", "semantic", "fused"):
            report = await evaluate_context(store, questions, top_k=5, mode=mode)  # type: ignore[arg-type]
            out[f"recall_at_5_{mode}"] = report.recall
            out[f"misses_{mode}"] = [m.query for m in report.misses]
            test = await evaluate_context(store, held_out, top_k=5, mode=mode)  # type: ignore[arg-type]
            out[f"recall_at_5_{mode}_test"] = test.recall
            # By the answer text alone (a module-qualified answer not matched by its module's
            # definition): the figure before the matcher knew about modules.
            out[f"recall_at_5_{mode}_strict"] = report.strict_recall
            out[f"recall_at_5_{mode}_test_strict"] = test.strict_recall
            if mode == "fused":
                out["fused_search_p50_ms"] = percentile(list(report.search_ms), 0.5)
                out["fused_search_p99_ms"] = percentile(list(report.search_ms), 0.99)
        # The opt-in stage: Gemma 3 270M rereads the fused top 12 of each question.
        rss_before_reranker = _rss()
        async with await Reranker.open(cpu=engine.cores) as reranker:
            out["rss_growth_reranker_mb"] = (_rss() - rss_before_reranker) / 2**20
            report = await evaluate_context(store, questions, top_k=5, reranker=reranker)
        out["recall_at_5_reranked"] = report.recall
        # The held-out half from the same run (each question costs seconds here).
        out["recall_at_5_reranked_test"] = sum(q not in report.misses for q in held_out) / len(
            held_out)
        out["recall_at_5_reranked_strict"] = report.strict_recall
        out["misses_reranked"] = [m.query for m in report.misses]
        out["reranked_search_p50_ms"] = percentile(list(report.search_ms), 0.5)
        out["reranked_search_p99_ms"] = percentile(list(report.search_ms), 0.99)
        # An answer through the statechart: the cited chunk holds the answer text.
        q = questions[0]
        try:
            result = await engine.infer(q.query, context="pydocs", max_tokens=48,
                                        temperature=0)
        except RequestFailed as exc:  # the other figures still count
            out["answer"] = {"question": q.query, "error": str(exc),
                             "cited_contains_answer": False}
        else:
            cited = await store.chunks([c.chunk_id for c in result.citations])
            out["answer"] = {"question": q.query, "text": result.text,
                             "citations": [c.as_dict() for c in result.citations],
                             "tokens_in": result.tokens.input,
                             "cited_contains_answer": any(q.answer.lower() in h.text.lower()
                                                          for h in cited)}
    out["disk_bytes"] = sum(p.stat().st_size for p in (folder / "pydocs").glob("*")
                            if p.is_file())
    db = sqlite3.connect(folder / "pydocs" / "store.sqlite3")
    with contextlib.suppress(sqlite3.OperationalError):  # an SQLite built without dbstat
        out["disk_by_table_mb"] = {name: round(size / 1e6, 3) for name, size in db.execute(
            "SELECT name, sum(pgsize) FROM dbstat GROUP BY name ORDER BY 2 DESC")}
        if out["embedded"] < out["chunks"]:
            # Embedding stopped at the cap: the vectors still missing, at the size of those
            # stored, make the disk figure of a complete store.
            vectors = out["disk_by_table_mb"].get("vectors", 0.0) * 1e6
            out["disk_bytes_complete"] = out["disk_bytes"] + int(
                vectors / max(1, out["embedded"]) * (out["chunks"] - out["embedded"]))
    db.close()
    started = time.perf_counter()
    reopened = await ContextStore.open(folder / "pydocs", tokenizer=_Words(), tokenizer_id="-")
    await reopened.search("open a file", 5, mode="lexical")
    out["reopen_s"] = time.perf_counter() - started
    await reopened.aclose()
    return out


class _Words:
    """Reopening needs no tokenizer until something is added: a cheap stand-in."""

    def encode(self, text: str) -> list[int]:
        return list(range(len(text.split())))


def _sigkill_during_add(folder: Path) -> dict[str, Any]:
    """Kill a process adding the corpus mid-way; the store must open whole."""
    corpus = library_sources()
    code = textwrap.dedent(f"""
        import anyio
        from orion_fsm import Engine
        async def main():
            async with Engine(trace_path=False, warm_up=False, embeddings=False,
                              cache_dir={str(folder / "cache")!r},
                              contexts={{"k": {str(folder / "killed")!r}}}) as engine:
                store = await engine.context("k")
                def said(done, total, name):
                    print(name, flush=True)
                await store.add_paths([{str(corpus)!r}], progress=said)
        anyio.run(main)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    for _ in range(20):  # twenty documents in, the next one being written
        proc.stdout.readline()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    db = sqlite3.connect(folder / "killed" / "store.sqlite3")
    integrity = db.execute("PRAGMA integrity_check").fetchone()[0]
    whole = all(db.execute("SELECT count(*) FROM chunks WHERE doc = ?", (d,)).fetchone()[0] == n
                for d, n in db.execute("SELECT id, chunks FROM documents").fetchall())
    chunks = db.execute("SELECT count(*) FROM chunks").fetchone()[0]
    indexed = db.execute("SELECT count(*) FROM fts_docsize").fetchone()[0]
    documents = db.execute("SELECT count(*) FROM documents").fetchone()[0]
    db.close()
    return {"integrity": integrity, "documents_whole": whole, "documents": documents,
            "chunks": chunks, "indexed": indexed,
            "consistent": integrity == "ok" and whole and chunks == indexed}


def bench_context(quick: bool = False) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="orion-bench-context-") as tmp:
        folder = Path(tmp)
        out = anyio.run(_measure, folder, quick)
        out["sigkill"] = _sigkill_during_add(folder)
    disk_ratio = out.get("disk_bytes_complete", out["disk_bytes"]) / out["raw_bytes"]
    out["disk_over_raw"] = disk_ratio
    # The vectors still missing at the cap, counted as for the closed store.
    out["disk_open_over_raw"] = (out["disk_bytes_open"] + out.get("disk_bytes_complete", 0)
                                 - (out["disk_bytes"] if "disk_bytes_complete" in out else 0)
                                 ) / out["raw_bytes"]
    out["checks"] = [
        check(f"lexical index searchable after adding library/ (s, load "
              f"{out['load_avg_1min_after_add']:.1f})", out["lexical_ready_s"],
              "<= 20", out["lexical_ready_s"] <= 20),
        check("embeddings complete (s" + (", extrapolated)" if
              out["embeddings_complete_extrapolated"] else ")"),
              out["embeddings_complete_s"], "<= 150", out["embeddings_complete_s"] <= 150),
        check("fused search p50 (ms)", out["fused_search_p50_ms"], "<= 50",
              out["fused_search_p50_ms"] <= 50),
        check("fused search p99 (ms)", out["fused_search_p99_ms"], "<= 150",
              out["fused_search_p99_ms"] <= 150),
        check("RSS growth incl. MiniLM (MB)", out["rss_growth_mb"], "<= 1024",
              out["rss_growth_mb"] <= 1024),
        check("store on disk / raw text" + (" (vectors missing counted)" if
              "disk_bytes_complete" in out else ""), disk_ratio, "<= 1.0", disk_ratio <= 1.0),
        check("store on disk while open (database, -wal, -shm) / raw text",
              out["disk_open_over_raw"], "<= 1.0", out["disk_open_over_raw"] <= 1.0),
        check("reopen + first search (s)", out["reopen_s"], "<= 1", out["reopen_s"] <= 1),
        check("recall@5 BM25 only", out["recall_at_5_lexical"], "report", True),
        check("recall@5 embeddings only", out["recall_at_5_semantic"], "report", True),
        check("recall@5 fused", out["recall_at_5_fused"], "report", True),
        check("recall@5 BM25 only, held-out half", out["recall_at_5_lexical_test"], "report",
              True),
        check("recall@5 embeddings only, held-out half", out["recall_at_5_semantic_test"],
              "report", True),
        check("recall@5 fused, held-out half (the default search)",
              out["recall_at_5_fused_test"], "report", True),
        check("recall@5 fused, held-out half, answer text only (strict matcher)",
              out["recall_at_5_fused_test_strict"], "report", True),
        check("recall@5 fused + rerank (Gemma 3 270M, top 12)", out["recall_at_5_reranked"],
              "report", True),
        check("recall@5 fused + rerank, held-out half", out["recall_at_5_reranked_test"],
              ">= 0.9", out["recall_at_5_reranked_test"] >= 0.9),
        check("recall@5 fused + rerank, strict matcher", out["recall_at_5_reranked_strict"],
              "report", True),
        check("fused + rerank search p50 (ms)", out["reranked_search_p50_ms"], "report", True),
        check("run --context cites a chunk holding the answer", float(
            out["answer"]["cited_contains_answer"]), "1", out["answer"]["cited_contains_answer"]),
        check("SIGKILL during add leaves the store consistent",
              float(out["sigkill"]["consistent"]), "1", out["sigkill"]["consistent"]),
    ]
    return out


BENCHMARKS: dict[str, Callable[..., dict[str, Any]]] = {"context": bench_context}
