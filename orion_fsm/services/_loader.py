"""The model loader: converted files, tokenizers and loaded models, shared across requests.

Agents that run the same weights with the same context share one loaded instance. Loading
is lazy, happens in a worker thread, and concurrent requests for one model wait for a single
load. A request pins the model it uses (`ModelLease`) so nothing unloads it underneath.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import anyio

from orion_fsm._exceptions import ModelLoadError
from orion_fsm.backends import ConvertedModel, LoadedModel, Tokenizer, ensure_converted

from ._registry import AgentSpec
from ._singleflight import SingleFlight

ProgressCallback = Callable[[str, int, int], None]


@dataclass(frozen=True, slots=True)
class ModelKey:
    source: Path
    context_length: int
    model_type: str


@dataclass(frozen=True, slots=True)
class PreparedModel:
    """A model ready to load: files converted for the runtime and its tokenizer in memory."""

    key: ModelKey
    files: ConvertedModel
    tokenizer: Tokenizer


@dataclass(eq=False)
class _Slot:
    prepared: PreparedModel
    model: LoadedModel
    # One generation per model instance at a time: the runtime holds one context.
    generation_lock: anyio.Lock = field(default_factory=anyio.Lock)
    pins: int = 0


class ModelLease:
    """A pinned, loaded model. `async with lease.generating():` gives exclusive use."""

    __slots__ = ("_released", "_slot")

    def __init__(self, slot: _Slot) -> None:
        self._slot = slot
        self._released = False
        slot.pins += 1

    @property
    def model(self) -> LoadedModel:
        return self._slot.model

    @property
    def prepared(self) -> PreparedModel:
        return self._slot.prepared

    @property
    def generation_lock(self) -> anyio.Lock:
        return self._slot.generation_lock

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._slot.pins -= 1


class ModelLoader:
    def __init__(self, cache_dir: Path, *, threads: int | None = None,
                 progress: ProgressCallback | None = None) -> None:
        self.cache_dir = cache_dir
        self.threads = threads or max(1, os.cpu_count() or 1)
        self._progress = progress
        self._prepared: dict[ModelKey, PreparedModel] = {}
        self._slots: dict[ModelKey, _Slot] = {}
        self._preparing: SingleFlight[PreparedModel] = SingleFlight()
        self._loading: SingleFlight[_Slot] = SingleFlight()

    @staticmethod
    def key_for(agent: AgentSpec) -> ModelKey:
        return ModelKey(agent.model.locate(), agent.context_length, agent.model_type)

    def loaded(self) -> list[ModelKey]:
        return list(self._slots)

    async def prepare(self, agent: AgentSpec) -> PreparedModel:
        """Converted files and tokenizer for the agent's model; no weights loaded."""
        key = self.key_for(agent)
        prepared = self._prepared.get(key)
        if prepared is not None:
            return prepared

        async def convert() -> PreparedModel:
            def work() -> PreparedModel:
                files = ensure_converted(key.source, self.cache_dir, progress=self._progress)
                return PreparedModel(key, files, Tokenizer.from_file(files.tokenizer_path))

            result = await anyio.to_thread.run_sync(work)
            self._prepared[key] = result
            return result

        return await self._preparing.run(key, convert)

    async def acquire(self, agent: AgentSpec) -> ModelLease:
        """Load the agent's model if needed and pin it for the caller; `release()` unpins."""
        prepared = await self.prepare(agent)
        slot = self._slots.get(prepared.key)
        if slot is None:
            slot = await self._loading.run(prepared.key, lambda: self._load(prepared))
        return ModelLease(slot)

    async def _load(self, prepared: PreparedModel) -> _Slot:
        def work() -> LoadedModel:
            return LoadedModel.load(
                prepared.files.model_path, prepared.files.tokenizer_path,
                context_length=prepared.key.context_length, threads=self.threads,
                model_type=prepared.key.model_type,
            )

        try:
            model = await anyio.to_thread.run_sync(work)
        except ModelLoadError:
            raise
        except Exception as exc:  # the runtime raises plain errors on bad files
            raise ModelLoadError(f"cannot load {prepared.key.source}: {exc}") from exc
        slot = _Slot(prepared, model)
        self._slots[prepared.key] = slot
        return slot

    async def aclose(self) -> None:
        """Unload every model (the engine is closing: no request holds a lease)."""
        slots, self._slots = list(self._slots.values()), {}
        for slot in slots:
            await anyio.to_thread.run_sync(slot.model.close)
