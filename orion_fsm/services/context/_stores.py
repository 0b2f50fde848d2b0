"""The context stores an Engine serves, by name: opened on first use (one folder each under
the cache dir, or at a given path), their background embedding owned by one task group.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Final

import anyio
from anyio.abc import TaskGroup, TaskStatus

from orion_fsm._exceptions import ContextError

from ._chunker import ChunkingConfig, Encoder
from ._store import ContextStore
from ._store_values import ContextHit

if TYPE_CHECKING:
    from ._rerank import Reranker
    from ._store import TextEmbedder

__all__ = ["ContextStores", "TokenizerSource"]

_NAME: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
# The tokenizer that counts a store's tokens, and its identity (the model's sha256).
TokenizerSource = Callable[[], Awaitable[tuple[Encoder, str]]]


def check_store_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise ContextError(f"context store name {name!r} is not valid: use letters, digits, "
                           "'_', '.' or '-' (at most 64), starting with a letter or digit")
    return name


class ContextStores:
    """Stores by name for one Engine; `retrieve` is what the `retrieving` phase calls."""

    def __init__(self, root: Path, *, tokenizer: TokenizerSource,
                 embeddings: TextEmbedder | None,
                 paths: Mapping[str, str | Path] | None = None,
                 capacity_tokens: int | None = None,
                 chunking: ChunkingConfig | None = None,
                 reranker: Callable[[], Awaitable[Reranker]] | None = None) -> None:
        self.root = root
        # Opens the reranker on the first retrieval that needs it (its model: ~0.3 s, 0.3 GB).
        self._open_reranker = reranker
        self._reranker: Reranker | None = None
        self._reranker_lock = anyio.Lock()
        self._tokenizer = tokenizer
        self._embeddings = embeddings
        self._paths = {check_store_name(n): Path(p).expanduser() for n, p in
                       (paths or {}).items()}
        self._capacity = capacity_tokens
        self._chunking = chunking
        self._open: dict[str, ContextStore] = {}
        self._opening = anyio.Lock()
        self._task_group: TaskGroup | None = None
        self._done = anyio.Event()

    def folder(self, name: str) -> Path:
        """Where store `name` lives: its given path, else `<cache dir>/contexts/<name>`."""
        check_store_name(name)
        return self._paths.get(name) or self.root / name

    def names(self) -> list[str]:
        """The stores on disk under the root, and those given a path."""
        found = {p.name for p in self.root.glob("*") if (p / "store.sqlite3").is_file()}
        return sorted(found | set(self._paths))

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Hosts each open store's background embedding until `aclose()`."""
        self._done = anyio.Event()
        try:
            async with anyio.create_task_group() as tg:
                self._task_group = tg
                task_status.started()
                await anyio.sleep_forever()
        finally:
            self._task_group = None
            self._done.set()

    async def aclose(self) -> None:
        """Stop the background embedding (a batch being written finishes), then close."""
        if self._task_group is not None:
            self._task_group.cancel_scope.cancel()
            with anyio.CancelScope(shield=True):
                await self._done.wait()
        stores, self._open = list(self._open.values()), {}
        for store in stores:
            await store.aclose()
        reranker, self._reranker = self._reranker, None
        if reranker is not None:
            await reranker.aclose()

    async def get(self, name: str, *, create: bool = True) -> ContextStore:
        """The open store `name`; created empty if missing and `create`."""
        if (store := self._open.get(name)) is not None:
            return store
        async with self._opening:
            if (store := self._open.get(name)) is not None:
                return store
            folder = self.folder(name)
            if not create and not (folder / "store.sqlite3").is_file():
                known = ", ".join(self.names()) or "none yet"
                raise ContextError(
                    f"no context store named {name!r} (stores: {known}); add documents with "
                    f"`orion-fsm context add PATH --store {name}`")
            tokenizer, tokenizer_id = await self._tokenizer()
            store = await ContextStore.open(
                folder, name=name, tokenizer=tokenizer, tokenizer_id=tokenizer_id,
                embeddings=self._embeddings, capacity_tokens=self._capacity,
                chunking=self._chunking)
            if self._task_group is not None:
                await self._task_group.start(store.run)
            self._open[name] = store
            return store

    async def retrieve(self, store: str, query: str, top_k: int) -> Sequence[ContextHit]:
        opened = await self.get(store, create=False)
        return await opened.search(query, top_k, reranker=await self.reranker())

    async def reranker(self) -> Reranker | None:
        """The reranker, opened on first use; None when the Engine does not rerank."""
        if self._open_reranker is None or self._reranker is not None:
            return self._reranker
        async with self._reranker_lock:
            if self._reranker is None:
                self._reranker = await self._open_reranker()
        return self._reranker
