"""`orion-fsm context add|search|stats|rm|summary|eval`: the context stores under the cache
directory (`<cache dir>/contexts/<name>`), for `orion-fsm run --context NAME`.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import anyio

from orion_fsm import ContextStore, Engine, OrionError, evaluate_context, load_questions

from ._common import add_rerank_option

_DEFAULT_STORE = "default"
_MODES = ("fused", "lexical", "semantic")


def add_parser(sub: Any) -> None:
    context = sub.add_parser("context", help="context stores: documents far beyond the "
                             "model's window, retrieved into prompts")
    csub = context.add_subparsers(dest="context_command", required=True)

    def command(name: str, help: str) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = csub.add_parser(name, help=help)
        parser.add_argument("--store", default=_DEFAULT_STORE,
                            help=f"store name (default: {_DEFAULT_STORE})")
        parser.add_argument("--lexical-only", action="store_true",
                            help="do not load the embedding model (BM25 only)")
        return parser

    add = command("add", "add files or folders (reST, Markdown, text) as documents")
    add.add_argument("paths", nargs="+")
    add.add_argument("--no-wait", action="store_true",
                     help="return once BM25 can find them; vectors are computed the next "
                     "time the store is open")
    search = command("search", "the best chunks for a query, with why they matched")
    search.add_argument("query")
    search.add_argument("--top-k", type=int, default=5)
    search.add_argument("--mode", choices=_MODES, default="fused")
    search.add_argument("--json", action="store_true")
    add_rerank_option(search)
    stats = command("stats", "documents, chunks, tokens, capacity, embeddings, disk")
    stats.add_argument("--json", action="store_true")
    rm = command("rm", "remove a document (by name or id)")
    rm.add_argument("document")
    summary = command("summary", "a compressed overview of the store")
    summary.add_argument("--max-tokens", type=int, default=512)
    ev = command("eval", "recall@k on JSONL questions {\"query\", \"answer\"}: a hit is a "
                 "top-k chunk containing the answer text")
    ev.add_argument("file")
    ev.add_argument("--top-k", type=int, default=5)
    ev.add_argument("--mode", choices=_MODES, default="fused")
    ev.add_argument("--json", action="store_true")
    add_rerank_option(ev)
    context.set_defaults(handler=lambda args: anyio.run(_context, args))


async def _context(args: argparse.Namespace) -> int:
    semantic = not args.lexical_only and getattr(args, "mode", "fused") != "lexical"
    engine = Engine(registry=args.registry, cache_dir=args.cache_dir, trace_path=False,
                    warm_up=False, embeddings=None if semantic else False,
                    rerank=getattr(args, "rerank", False))
    failure: OrionError | None = None
    async with engine:
        try:
            store = await engine.context(args.store, create=args.context_command == "add")
            args.reranker = await engine.reranker()
            return await _HANDLERS[args.context_command](store, args)
        except OrionError as exc:
            failure = exc  # raised outside the engine's block: one line, not a group
    assert failure is not None
    raise failure


async def _add(store: ContextStore, args: argparse.Namespace) -> int:
    bar = _bar(sys.stderr.isatty(), "indexing", "B")
    results = await store.add_paths(args.paths, progress=lambda done, total, name: bar(
        done, total))
    added = [r for r in results if not r.unchanged]
    tokens = sum(r.tokens_added for r in added)
    print(f"{store.name}: {len(added)} documents added ({len(results) - len(added)} "
          f"unchanged), {tokens} tokens, {sum(r.chunks for r in added)} chunks, "
          f"{sum(r.duplicates for r in added)} duplicate chunks dropped")
    for r in results:
        if r.evicted:
            print(f"  evicted to make room for {r.name}: {', '.join(r.evicted)}")
    if store.embeddings is not None and not args.no_wait:
        stats = await store.stats()
        bar = _bar(sys.stderr.isatty(), "embedding", "chunk")
        async with anyio.create_task_group() as tg:
            async def show() -> None:
                while True:
                    s = await store.stats()
                    bar(s.embedded, s.chunks)
                    await anyio.sleep(1.0)
            tg.start_soon(show)
            await store.wait_embedded()
            tg.cancel_scope.cancel()
        stats = await store.stats()
        print(f"{store.name}: {stats.embedded}/{stats.chunks} chunks embedded "
              f"({stats.embeddings})")
    return 0


async def _search(store: ContextStore, args: argparse.Namespace) -> int:
    hits = await store.search(args.query, args.top_k, mode=args.mode, reranker=args.reranker)
    if args.json:
        print(json.dumps([h.as_dict() for h in hits], ensure_ascii=False, indent=2))
        return 0
    if not hits:
        print("no chunk matches")
    for i, h in enumerate(hits, 1):
        print(f"[{i}] {h.document} #{h.position} (chunk {h.chunk_id}, {h.tokens} tokens, "
              f"score {h.score:.4f})")
        if h.heading:
            print(f"    {h.heading}")
        print(f"    why: {h.why}")
        preview = " ".join(h.text.split())[:240]
        print(f"    {preview}{'…' if len(h.text) > 240 else ''}")
    return 0


async def _stats(store: ContextStore, args: argparse.Namespace) -> int:
    stats = await store.stats()
    if args.json:
        print(json.dumps(stats.as_dict(), indent=2))
        return 0
    print(f"{stats.name} ({stats.path})")
    print(f"  documents {stats.documents}, chunks {stats.chunks}, tokens {stats.tokens} "
          f"of {stats.capacity_tokens} ({stats.tokens / stats.capacity_tokens:.1%})")
    print(f"  embedded {stats.embedded}/{stats.chunks} ({stats.embeddings})")
    print(f"  disk {stats.disk_bytes} bytes for {stats.raw_bytes} bytes of text")
    return 0


async def _rm(store: ContextStore, args: argparse.Namespace) -> int:
    document: str | int = int(args.document) if args.document.isdigit() else args.document
    if not await store.remove(document):
        print(f"orion-fsm: no document {args.document!r} in store {store.name!r}; "
              "`orion-fsm context stats` lists what it holds", file=sys.stderr)
        return 1
    print(f"removed {args.document} from {store.name}")
    return 0


async def _summary(store: ContextStore, args: argparse.Namespace) -> int:
    print(await store.summary(args.max_tokens))
    return 0


async def _eval(store: ContextStore, args: argparse.Namespace) -> int:
    questions = load_questions(args.file)
    if store.embeddings is not None and args.mode != "lexical":
        await store.wait_embedded()
    report = await evaluate_context(store, questions, top_k=args.top_k, mode=args.mode,
                                    reranker=args.reranker)
    if args.json:
        print(json.dumps(report.as_dict(), ensure_ascii=False, indent=2))
        return 0
    print(f"recall@{args.top_k} ({report.mode}): {report.recall:.3f} "
          f"({report.hits}/{report.questions})")
    for miss in report.misses:
        print(f"  miss: {miss.query!r} (expected {miss.answer!r})")
    return 0


_HANDLERS = {"add": _add, "search": _search, "stats": _stats, "rm": _rm,
             "summary": _summary, "eval": _eval}


def _bar(enabled: bool, desc: str, unit: str) -> Any:
    """A tqdm bar on stderr fed with (done, total); nothing when stderr is not a terminal."""
    state: dict[str, Any] = {}

    def update(done: int, total: int) -> None:
        if not enabled:
            return
        from tqdm import tqdm

        bar = state.get("bar")
        if bar is None:
            bar = state["bar"] = tqdm(total=total or None, desc=desc, unit=unit,
                                      unit_scale=unit == "B", leave=False, file=sys.stderr)
        bar.total = total
        bar.update(done - bar.n)
        if total and done >= total:
            bar.close()

    return update
