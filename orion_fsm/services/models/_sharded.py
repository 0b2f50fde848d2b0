"""Loading a sharded model: the manifest's parts, checked and assembled in order into the one
file the runtime reads (kept in the cache, by the model's sha256), with a span per part.

The load is a small state machine of its own: initializing (manifest read) -> loading_shard
(once per part, embeddings and first layers first) -> ready. ctransformers evaluates every
layer for every token, so nothing can be served before `ready`: the parts give an early check
of the header and first layers, progress per part, and resumable copies, not an earlier token.
"""

from __future__ import annotations

import enum
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Final

from orion_fsm._exceptions import ModelFileError, ModelLoadError
from orion_fsm._files import make_private_dirs
from orion_fsm.backends._convert import MODEL_FILENAME, TOKENIZER_FILENAME
from orion_fsm.backends._gguf_io import replace_atomically
from orion_fsm.backends._shards import ShardManifest, copy_verified, read_manifest
from orion_fsm.services.observability import _attributes as attr

if TYPE_CHECKING:
    from opentelemetry.trace import Tracer

__all__ = ["ShardLoadState", "ShardedLoad", "assembled_dir"]

ProgressCallback = Callable[[str, int, int], None]
_ASSEMBLED: Final = "assembled"


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


def assembled_dir(cache_dir: Path, model_sha256: str) -> Path:
    """Where the assembled model with this digest is kept in the cache."""
    return cache_dir / _ASSEMBLED / model_sha256[:16]


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
            manifest = read_manifest(self.manifest_path)
            target = assembled_dir(self.cache_dir, manifest.sha256)
            model = target / MODEL_FILENAME
            if model.is_file() and model.stat().st_size == manifest.size:
                self.reused = True
            else:
                self._assemble(manifest, target)
            self._enter(ShardLoadState.READY)
            return model
        except BaseException:
            self.state = ShardLoadState.FAILED
            self.steps.append(ShardStep(self.state, None,
                                        (time.perf_counter() - self._started) * 1e3))
            raise

    def _assemble(self, manifest: ShardManifest, target: Path) -> None:
        try:
            make_private_dirs(target)
        except OSError as exc:
            raise ModelLoadError(f"cannot create {target}: {exc}") from exc
        done = 0

        def advanced(n: int) -> None:
            nonlocal done
            done += n
            if self.progress is not None:
                self.progress("shards", done, manifest.size)

        def write(tmp: Path) -> None:
            with tmp.open("wb") as out:
                for index, entry in enumerate(manifest.shards):
                    self._enter(ShardLoadState.LOADING_SHARD, index)
                    started = time.perf_counter()
                    span = None if self.tracer is None else self.tracer.start_span(
                        "orion.model.shard", attributes={
                            attr.SHARD_INDEX: index, attr.SHARD_COUNT: len(manifest.shards),
                            attr.SHARD_BYTES: entry.size, attr.SHARD_TENSORS: len(entry.tensors)})
                    try:
                        copy_verified(manifest, entry, out, advanced)
                    finally:
                        if span is not None:
                            span.set_attribute(attr.SHARD_LOAD_MS,
                                               round((time.perf_counter() - started) * 1e3, 3))
                            span.end()
                out.flush()
                os.fsync(out.fileno())

        try:
            replace_atomically(target / MODEL_FILENAME, write)
            if manifest.tokenizer is not None:
                source = manifest.path.parent / manifest.tokenizer
                replace_atomically(target / TOKENIZER_FILENAME,
                                   lambda tmp: tmp.write_bytes(source.read_bytes()))
        except ModelFileError as exc:
            raise ModelLoadError(exc.message) from exc
