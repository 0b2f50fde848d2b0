"""Loading a sharded model: the manifest's parts, checked and assembled in order into the one
file the runtime reads (kept in the cache, by the model's sha256), with a span per part.

The load is a small state machine of its own: initializing (manifest read) -> loading_shard
(once per part, embeddings and first layers first) -> ready. ctransformers evaluates every
layer for every token, so nothing can be served before `ready`: the parts give an early check
of the header and first layers, progress per part, and resumable copies, not an earlier token.
"""

from __future__ import annotations

import contextlib
import enum
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Final

from orion_fsm._exceptions import ModelFileError, ModelLoadError
from orion_fsm.backends._shards import ShardEntry, assemble, read_manifest
from orion_fsm.services.observability import _attributes as attr

if TYPE_CHECKING:
    from opentelemetry.trace import Tracer

__all__ = ["ShardLoadState", "ShardStep", "ShardedLoad"]

ProgressCallback = Callable[[str, int, int], None]


class ShardLoadState(enum.Enum):
    INITIALIZING = "initializing"
    LOADING_SHARD = "loading_shard"
    READY = "ready"
    FAILED = "failed"


_ALLOWED: Final = {
    ShardLoadState.INITIALIZING: {ShardLoadState.LOADING_SHARD, ShardLoadState.READY,
                                  ShardLoadState.FAILED},
    ShardLoadState.LOADING_SHARD: {ShardLoadState.LOADING_SHARD, ShardLoadState.READY,
                                   ShardLoadState.FAILED},
    ShardLoadState.READY: set(),
    ShardLoadState.FAILED: set(),
}


@dataclass(frozen=True, slots=True)
class ShardStep:
    """One state entered: which part (for loading_shard) and when, in ms since the start."""

    state: ShardLoadState
    shard: int | None
    at_ms: float


@dataclass
class ShardedLoad:
    """One assembly of a sharded model, through its states; `run()` returns the model file."""

    manifest_path: Path
    cache_dir: Path
    tracer: Tracer | None = None
    progress: ProgressCallback | None = None
    state: ShardLoadState = ShardLoadState.INITIALIZING
    steps: list[ShardStep] = field(default_factory=list)
    reused: bool = False  # assembled by an earlier load: no part was read
    parts: int = 0  # parts the model is made of (known once the manifest is read)
    _started: float = field(default_factory=time.perf_counter)

    def _enter(self, state: ShardLoadState, shard: int | None = None) -> None:
        if state not in _ALLOWED[self.state]:
            raise RuntimeError(f"shard load cannot go from {self.state.value} to {state.value}")
        self.state = state
        self.steps.append(ShardStep(state, shard, (time.perf_counter() - self._started) * 1e3))

    def run(self) -> Path:
        """The assembled model file (GGUF), assembling it from the parts unless cached."""
        self.steps = [ShardStep(self.state, None, 0.0)]
        try:
            try:
                self.parts = len(read_manifest(self.manifest_path).shards)
            except ModelFileError as exc:  # a load failure, as any other bad model file
                raise ModelLoadError(exc.message) from exc
            model, self.reused = assemble(self.manifest_path, self.cache_dir, part=self._part,
                                          progress=self.progress)
            self._enter(ShardLoadState.READY)
            return model
        except BaseException:
            self.state = ShardLoadState.FAILED
            self.steps.append(ShardStep(self.state, None,
                                        (time.perf_counter() - self._started) * 1e3))
            raise

    @contextlib.contextmanager
    def _part(self, index: int, count: int, entry: ShardEntry) -> Iterator[None]:
        """One part being appended: the loading_shard state and its span."""
        self._enter(ShardLoadState.LOADING_SHARD, index)
        if self.tracer is None:
            yield
            return
        started = time.perf_counter()
        with self.tracer.start_as_current_span("orion.model.shard", attributes={
                attr.SHARD_INDEX: index, attr.SHARD_COUNT: count,
                attr.SHARD_BYTES: entry.size, attr.SHARD_TENSORS: len(entry.tensors)}) as span:
            yield
            span.set_attribute(attr.SHARD_LOAD_MS, round((time.perf_counter() - started) * 1e3,
                                                         3))
