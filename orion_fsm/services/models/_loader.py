"""The model loader: converted files, tokenizers and loaded models, shared across requests.

Models load lazily in a worker thread and stay only while they earn their place: a memory
budget and a model count evict the least recently used idle model, an idle model goes after
its keep-alive, and a model a request holds (`ModelLease`) is never unloaded under it.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
from collections import Counter, deque
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import anyio
from anyio.abc import TaskStatus

from orion_fsm._clock import Clock, SystemClock
from orion_fsm._exceptions import ConfigurationError, InsufficientMemory, ModelLoadError
from orion_fsm._singleflight import SingleFlight
from orion_fsm.backends import ConvertedModel, LoadedModel, Tokenizer, ensure_converted
from orion_fsm.services.models._pressure import PressureGauge, PressureLevel
from orion_fsm.services.models._registry import AgentSpec, ModelSource
from orion_fsm.services.models._tiers import (
    DEFAULT_VARIANT,
    MB,
    MemoryEstimate,
    RamTier,
    VariantChoice,
    choose_variant,
    estimate_model_memory,
    tier_for,
)

if TYPE_CHECKING:
    from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

__all__ = [
    "LoadInfo",
    "LoaderConfig",
    "LoaderStats",
    "ModelKey",
    "ModelLease",
    "ModelLoader",
    "PreparedModel",
    "ProgressCallback",
    "ResidentModel",
]

ProgressCallback = Callable[[str, int, int], None]
LoadModel = Callable[..., LoadedModel]

_log = logging.getLogger("orion_fsm.loader")
_READ_CHUNK: Final = 4 << 20
_QUEUE: Final = 16  # pending background commands; a full queue drops preload hints
_SEND_FAILURES: Final = (anyio.WouldBlock, anyio.ClosedResourceError, anyio.BrokenResourceError)


@dataclass(frozen=True, slots=True)
class ModelKey:
    """One loaded instance: agents with the same file, variant and context share it."""

    source: Path
    context_length: int
    model_type: str
    variant: str = DEFAULT_VARIANT

    @property
    def label(self) -> str:
        return f"{self.source.stem}:{self.variant}@{self.context_length}"


@dataclass(frozen=True, slots=True)
class PreparedModel:
    """A model ready to load: files converted for the runtime, its tokenizer, its estimate."""

    key: ModelKey
    files: ConvertedModel
    tokenizer: Tokenizer
    estimate: MemoryEstimate

    @property
    def sha256(self) -> str:
        """The source file's digest: what cache keys and traces name the model by."""
        return self.files.source_sha256


@dataclass(frozen=True, slots=True)
class LoadInfo:
    """What one `acquire` found or did, for the loading span."""

    model: str
    variant: str
    loaded_now: bool  # this request waited for a load (its own or one already running)
    load_ms: float  # time it waited for that load; 0 when the model was resident
    estimate_mb: float
    unloaded: tuple[str, ...]  # models unloaded to make room for this load
    preloaded: bool  # the load was started ahead of time by a preload

    def span_attributes(self) -> dict[str, Any]:
        return {
            "orion.model": self.model,
            "orion.model.variant": self.variant,
            "orion.model.loaded_now": self.loaded_now,
            "orion.model.load_ms": round(self.load_ms, 3),
            "orion.model.estimate_mb": round(self.estimate_mb, 1),
            "orion.model.unloaded": list(self.unloaded),
            "orion.model.preloaded": self.preloaded,
        }


@dataclass(frozen=True, slots=True)
class ResidentModel:
    """A loaded model as the memory monitor and the CLI see it."""

    key: ModelKey
    estimate_bytes: int
    pins: int
    idle_s: float  # 0 while a request holds it
    keep_alive_s: float

    @property
    def label(self) -> str:
        return self.key.label

    @property
    def variant(self) -> str:
        return self.key.variant


@dataclass(frozen=True, slots=True)
class LoaderConfig:
    """Limits and policies; None picks the default for the machine's RAM tier."""

    memory_budget_mb: float | None = None  # None: budget_fraction of the available RAM
    budget_fraction: float = 0.5
    max_loaded_models: int | None = None
    keep_alive_s: float | None = None  # an agent's own `keep_alive_s` wins
    quantization: str | None = None  # a variant name or q4 | q8 | f16 | ...
    overhead_mb: float = 16.0  # per model, beyond weights and KV cache
    tier: RamTier | None = None  # None: from psutil's total RAM
    predictive_preload: bool = True
    preload_min_share: float = 0.4  # of the observed successors of the agent just used
    usage_window: int = 256  # recent acquires the prediction learns from
    sweep_interval_s: float = 1.0  # real time between idle checks of the background task
    # How long a load waits for requests to release the models that fill the budget before
    # it is refused (0: refuse at once). A model too big for the budget is refused at once.
    room_wait_s: float = 10.0

    def __post_init__(self) -> None:
        problems = [
            (name, value, rule) for name, value, rule, ok in (
                ("memory_budget_mb", self.memory_budget_mb, "positive or None",
                 self.memory_budget_mb is None or self.memory_budget_mb > 0),
                ("budget_fraction", self.budget_fraction, "in (0, 1]",
                 0 < self.budget_fraction <= 1),
                ("max_loaded_models", self.max_loaded_models, "at least 1 or None",
                 self.max_loaded_models is None or self.max_loaded_models >= 1),
                ("keep_alive_s", self.keep_alive_s, "at least 0 or None",
                 self.keep_alive_s is None or self.keep_alive_s >= 0),
                ("overhead_mb", self.overhead_mb, "at least 0", self.overhead_mb >= 0),
                ("sweep_interval_s", self.sweep_interval_s, "positive",
                 self.sweep_interval_s > 0),
                ("room_wait_s", self.room_wait_s, "at least 0", self.room_wait_s >= 0),
            ) if not ok
        ]
        if problems:
            name, value, rule = problems[0]  # one at a time, like every ConfigurationError
            raise ConfigurationError(f"LoaderConfig.{name}", value, rule)


@dataclass(slots=True)
class LoaderStats:
    loads: int = 0
    unloads: int = 0
    evictions: int = 0  # unloads to make room
    idle_unloads: int = 0  # keep-alive expiries and pressure relief
    refusals: int = 0  # InsufficientMemory raised
    room_waits: int = 0  # times a load waited for requests to release models
    preloads: int = 0
    preload_hits: int = 0  # a request found the model a preload had loaded


@dataclass(eq=False)
class _Slot:
    prepared: PreparedModel
    model: LoadedModel
    last_used: float
    keep_alive_s: float
    # One generation per model instance at a time: the runtime holds one context.
    # A semaphore, not a Lock: a stream abandoned without aclose() is closed by the event
    # loop's async-generator finalizer, in another task, and a Lock refuses that release.
    generation_lock: anyio.Semaphore = field(default_factory=lambda: anyio.Semaphore(1))
    pins: int = 0
    preloaded: bool = False  # loaded by a preload and not used yet

    @property
    def estimate_bytes(self) -> int:
        return self.prepared.estimate.total_bytes


@dataclass(frozen=True, slots=True)
class _Loaded:
    unloaded: tuple[str, ...]
    preloaded: bool


class ModelLease:
    """A pinned, loaded model. Hold `lease.generation_lock` while generating; then `release()`."""

    __slots__ = ("_on_release", "_released", "_slot", "load_info")

    def __init__(self, slot: _Slot, load_info: LoadInfo,
                 on_release: Callable[[_Slot], None]) -> None:
        self._slot = slot
        self._released = False
        self._on_release = on_release
        self.load_info = load_info
        slot.pins += 1

    @property
    def model(self) -> LoadedModel:
        return self._slot.model

    @property
    def prepared(self) -> PreparedModel:
        return self._slot.prepared

    @property
    def generation_lock(self) -> anyio.Semaphore:
        return self._slot.generation_lock

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._slot.pins -= 1
            self._on_release(self._slot)


class _UsageModel:
    """Which agent tends to follow which, over the last `window` acquires."""

    def __init__(self, window: int) -> None:
        self._recent: deque[str] = deque(maxlen=max(2, window))

    def record(self, agent_id: str) -> None:
        self._recent.append(agent_id)

    def likely_next(self, agent_id: str, min_share: float) -> list[str]:
        """Successors of `agent_id` seen at least `min_share` of the time, most frequent first."""
        after = Counter(b for a, b in pairwise(self._recent) if a == agent_id)
        seen = sum(after.values())
        if seen < 3:  # too few observations to call it a pattern
            return []
        return [b for b, n in after.most_common() if n / seen >= min_share]


def _release_freed_heap() -> None:
    # glibc keeps the runtime's freed vocabulary and buffers in its heap, so RSS only fell
    # by ~75 % after unloading SmolLM2; malloc_trim hands them back to the OS (~100 %).
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return
    trim(0)


class ModelLoader:
    """Prepares, loads, shares and unloads models within a memory budget.

    `acquire(agent)` pins a model for one request; the budget and `max_loaded_models` are
    enforced before every load. `run()` is the loader's background task (idle sweeps,
    preloads) for the engine's task group; `stop()` ends it.
    """

    def __init__(
        self,
        cache_dir: Path,
        *,
        threads: int | None = None,
        progress: ProgressCallback | None = None,
        config: LoaderConfig | None = None,
        clock: Clock | None = None,
        load_model: LoadModel = LoadedModel.load,
        monitor: PressureGauge | None = None,
    ) -> None:
        self.cache_dir = cache_dir
        self.threads = threads or max(1, os.cpu_count() or 1)
        self.config = config = config or LoaderConfig()
        self.clock: Clock = clock or SystemClock()
        # The pressure source: at CRITICAL, loads are refused. A MemoryMonitor given this
        # loader sets itself here (it may be built after the loader).
        self.monitor: PressureGauge | None = monitor
        self.stats = LoaderStats()
        self._progress = progress
        self._load_model = load_model
        import psutil  # here, not at module level: ~7 ms of `import orion_fsm`

        memory = psutil.virtual_memory()
        self.tier = config.tier or tier_for(memory.total)
        self.budget_bytes = int(config.memory_budget_mb * MB if config.memory_budget_mb
                                else config.budget_fraction * memory.available)
        self.max_loaded_models = config.max_loaded_models or self.tier.max_loaded_models
        self._prepared: dict[ModelKey, PreparedModel] = {}
        self._slots: dict[ModelKey, _Slot] = {}
        self._reserved: dict[ModelKey, int] = {}  # loads under way, counted against the limits
        self._preparing: SingleFlight[PreparedModel] = SingleFlight()
        self._loading: SingleFlight[_Loaded] = SingleFlight()
        self._admission: anyio.Lock | None = None
        self._room_freed: anyio.Event | None = None  # set when a request releases a model
        self._usage = _UsageModel(config.usage_window)
        self._agents: dict[str, AgentSpec] = {}
        self._queued: set[tuple[str, str | None]] = set()
        self._stopped = False
        self._located: dict[ModelSource, Path] = {}
        self._commands: MemoryObjectSendStream[tuple[AgentSpec, str | None] | None]
        self._inbox: MemoryObjectReceiveStream[tuple[AgentSpec, str | None] | None]
        self._commands, self._inbox = anyio.create_memory_object_stream[
            tuple[AgentSpec, str | None] | None](_QUEUE)

    # --- policy -----------------------------------------------------------------------------

    def variant_for(self, agent: AgentSpec, variant: str | None = None) -> VariantChoice:
        """The variant `acquire` would load: the argument, else the config, else the tier's."""
        return choose_variant(agent, variant or self.config.quantization
                              or self.tier.quantization)

    def key_for(self, agent: AgentSpec, variant: str | None = None) -> ModelKey:
        choice = self.variant_for(agent, variant)
        # Found once: locating a packaged model is a find_spec and a stat, on every request
        # otherwise. A missing file is not remembered, so it is looked for again next time.
        path = self._located.get(choice.source)
        if path is None:
            path = self._located[choice.source] = choice.source.locate()
        return ModelKey(path, agent.context_length, agent.model_type, choice.name)

    def keep_alive_for(self, agent: AgentSpec) -> float:
        if agent.keep_alive_s is not None:
            return agent.keep_alive_s
        if self.config.keep_alive_s is not None:
            return self.config.keep_alive_s
        return self.tier.keep_alive_s

    # --- what is loaded ---------------------------------------------------------------------

    def loaded(self) -> list[ModelKey]:
        return list(self._slots)

    def models(self) -> list[ResidentModel]:
        """Loaded models, least recently used first."""
        now = self.clock.monotonic()
        return [ResidentModel(s.prepared.key, s.estimate_bytes, s.pins,
                              0.0 if s.pins else max(0.0, now - s.last_used), s.keep_alive_s)
                for s in self._by_recency()]

    @property
    def used_bytes(self) -> int:
        """Estimated bytes of the loaded models and of the loads under way."""
        return sum(s.estimate_bytes for s in self._slots.values()) + sum(self._reserved.values())

    # --- preparing and acquiring -----------------------------------------------------------

    async def prepare(self, agent: AgentSpec, *, variant: str | None = None) -> PreparedModel:
        """Converted files, tokenizer and memory estimate of the agent's model; no weights."""
        key = self.key_for(agent, variant)
        prepared = self._prepared.get(key)
        if prepared is not None:
            return prepared
        overhead = int(self.config.overhead_mb * MB)

        async def convert() -> PreparedModel:
            def work() -> PreparedModel:
                files = ensure_converted(key.source, self.cache_dir, progress=self._progress)
                estimate = estimate_model_memory(files.model_path, key.context_length,
                                                 overhead_bytes=overhead)
                return PreparedModel(key, files, Tokenizer.from_file(files.tokenizer_path),
                                     estimate)

            result = await anyio.to_thread.run_sync(work)
            self._prepared[key] = result
            return result

        return await self._preparing.run(key, convert)

    async def acquire(self, agent: AgentSpec, *, variant: str | None = None) -> ModelLease:
        """Load the agent's model if needed and pin it for the caller; `release()` unpins.

        Raises `InsufficientMemory` (a `ModelLoadError`) when the model cannot fit.
        """
        prepared = await self.prepare(agent, variant=variant)
        key = prepared.key
        self._usage.record(agent.id)
        self._agents[agent.id] = agent
        started = self.clock.monotonic()
        flight: _Loaded | None = None
        # Loop: a model loaded for us could be evicted before this task resumes; pinning
        # happens with no await between the lookup and the pin.
        while (slot := self._slots.get(key)) is None:
            flight = await self._loading.run(key, lambda: self._load(prepared, agent))
        info = LoadInfo(
            model=key.label, variant=key.variant, loaded_now=flight is not None,
            load_ms=0.0 if flight is None else (self.clock.monotonic() - started) * 1e3,
            estimate_mb=prepared.estimate.total_mb,
            unloaded=() if flight is None else flight.unloaded,
            preloaded=slot.preloaded or (flight is not None and flight.preloaded),
        )
        if slot.preloaded:
            slot.preloaded = False
            self.stats.preload_hits += 1
        slot.keep_alive_s = max(slot.keep_alive_s, self.keep_alive_for(agent))
        slot.last_used = self.clock.monotonic()
        lease = ModelLease(slot, info, self._released)
        if self.config.predictive_preload:
            for nxt in self._usage.likely_next(agent.id, self.config.preload_min_share):
                spec = self._agents[nxt]
                if nxt != agent.id and self._is_absent(spec):
                    self.preload(spec)
                    break
        return lease

    @contextlib.asynccontextmanager
    async def lease(self, agent: AgentSpec, *,
                    variant: str | None = None) -> AsyncIterator[ModelLease]:
        """`acquire` for the block: the model stays pinned until it is left, however."""
        lease = await self.acquire(agent, variant=variant)
        try:
            yield lease
        finally:
            lease.release()

    def preload(self, agent: AgentSpec, *, variant: str | None = None) -> bool:
        """Ask the background task to load the agent's model if memory allows. Never blocks.

        False when the hint was dropped (already queued, queue full, loader stopped).
        """
        hint = (agent.id, variant)
        if hint in self._queued:
            return False
        try:
            self._commands.send_nowait((agent, variant))
        except _SEND_FAILURES:
            return False
        self._queued.add(hint)
        return True

    # --- unloading --------------------------------------------------------------------------

    async def sweep(self) -> list[str]:
        """One pass of the keep-alive policy: unload models idle past their keep-alive."""
        now = self.clock.monotonic()
        expired = [s for s in self._by_recency()
                   if s.pins == 0 and now - s.last_used >= s.keep_alive_s]
        return [s.prepared.key.label for s in expired if await self._unload(s, idle=True)]

    async def unload_idle(self, *, limit: int | None = None) -> list[str]:
        """Unload models no request holds, least recently used first (memory relief)."""
        idle = [s for s in self._by_recency() if s.pins == 0][:limit]
        return [s.prepared.key.label for s in idle if await self._unload(s, idle=True)]

    async def aclose(self) -> None:
        """Unload every model (the engine is closing: no request holds a lease)."""
        self.stop()
        slots, self._slots = list(self._slots.values()), {}
        for slot in slots:
            await anyio.to_thread.run_sync(self._close, slot.model)
            self.stats.unloads += 1

    # --- the background task ----------------------------------------------------------------

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Serve preload hints and unload idle models until `stop()`."""
        task_status.started()
        async with self._inbox:
            while True:
                command: tuple[AgentSpec, str | None] | None = None
                with anyio.move_on_after(self.config.sweep_interval_s):
                    try:
                        command = await self._inbox.receive()
                    except anyio.EndOfStream:
                        return
                if self._stopped:
                    return
                if command is not None:
                    await self._serve_preload(*command)
                await self.sweep()

    def stop(self) -> None:
        """No more background work: `run` returns after the command it is serving."""
        self._stopped = True
        self._commands.close()

    # --- internals --------------------------------------------------------------------------

    def _by_recency(self) -> list[_Slot]:
        return sorted(self._slots.values(), key=lambda s: s.last_used)

    def _pressure(self) -> PressureLevel:
        return PressureLevel.LOW if self.monitor is None else self.monitor.level

    def _is_absent(self, agent: AgentSpec) -> bool:
        try:
            key = self.key_for(agent)
        except ModelLoadError:
            return False
        return key not in self._slots and not self._loading.in_flight(key)

    def _released(self, slot: _Slot) -> None:
        slot.last_used = self.clock.monotonic()
        if slot.pins == 0:
            self._signal_room()
        if slot.pins == 0 and slot.keep_alive_s <= 0:
            # Keep-alive 0: unload now, from the background task (release cannot await).
            # A full queue or a stopped loader: the next sweep, or aclose(), gets it.
            with contextlib.suppress(*_SEND_FAILURES):
                self._commands.send_nowait(None)

    async def _serve_preload(self, agent: AgentSpec, variant: str | None) -> None:
        self._queued.discard((agent.id, variant))
        if self._pressure() >= PressureLevel.MEDIUM:
            return  # a guess is not worth memory that is already short
        try:
            prepared = await self.prepare(agent, variant=variant)
            if prepared.key in self._slots:
                return
            await self._loading.run(prepared.key,
                                    lambda: self._load(prepared, agent, preload=True))
        except Exception as exc:
            # A preload is a guess: whatever stops it, the request that needs the model
            # will meet the same problem and report it properly.
            _log.info("preload_skipped", extra={"agent": agent.id, "reason": str(exc)})

    def _refuse(self, prepared: PreparedModel, why: str) -> InsufficientMemory:
        self.stats.refusals += 1
        est = prepared.estimate
        return InsufficientMemory(
            f"model {prepared.key.label} needs about {_mb(est.total_bytes)} (weights "
            f"{_mb(est.weights_bytes)} + KV cache {_mb(est.kv_cache_bytes)} for "
            f"{prepared.key.context_length} tokens); {why}",
            needed_bytes=prepared.estimate.total_bytes, budget_bytes=self.budget_bytes)

    def _held_back(self, need: int) -> str | None:
        """Why the models requests hold (or are loading) leave no room; None if they don't."""
        held = [s for s in self._slots.values() if s.pins > 0]
        held_bytes = sum(s.estimate_bytes for s in held) + sum(self._reserved.values())
        held_count = len(held) + len(self._reserved)
        if held_bytes + need <= self.budget_bytes and held_count < self.max_loaded_models:
            return None
        return (f"the {held_count} model(s) in use by requests hold {_mb(held_bytes)} of the "
                f"{_mb(self.budget_bytes)} budget, with at most {self.max_loaded_models} "
                "model(s) loaded")

    async def _admit(self, prepared: PreparedModel, *, wait_s: float) -> list[str]:
        """Unload idle models (LRU first) until `prepared` fits, then reserve its room.

        Models in use are never unloaded: while they block, wait up to `wait_s` for their
        requests to release them, then refuse (the request falls back to a smaller agent).
        """
        need = prepared.estimate.total_bytes
        if need > self.budget_bytes:
            raise self._refuse(prepared, (
                f"the memory budget is {_mb(self.budget_bytes)}: use a smaller quantization "
                "variant or context_length, or raise memory_budget_mb"))
        if self._admission is None:
            self._admission = anyio.Lock()
        deadline = anyio.current_time() + wait_s
        while True:
            # One admission decision at a time, so two loads never count the same free memory.
            async with self._admission:
                why = self._held_back(need)
                if why is None:
                    unloaded = await self._evict_for(need)
                    if unloaded is not None:
                        self._reserved[prepared.key] = need
                        return unloaded
                    why = "the loaded models were taken by requests meanwhile"
            remaining = deadline - anyio.current_time()
            if remaining <= 0:
                raise self._refuse(prepared, why + (
                    f"; waited {wait_s:g} s for them to be released" if wait_s > 0 else ""))
            self.stats.room_waits += 1
            if self._room_freed is None:
                self._room_freed = anyio.Event()
            with anyio.move_on_after(remaining):
                await self._room_freed.wait()

    async def _evict_for(self, need: int) -> list[str] | None:
        """Unload idle models, least recently used first, until `need` fits; None if the idle
        ones ran out (requests pinned them while this awaited)."""
        unloaded: list[str] = []
        while (self.used_bytes + need > self.budget_bytes
               or len(self._slots) + len(self._reserved) >= self.max_loaded_models):
            victim = next((s for s in self._by_recency() if s.pins == 0), None)
            if victim is None:
                return None
            if await self._unload(victim, idle=False):
                unloaded.append(victim.prepared.key.label)
        return unloaded

    def _signal_room(self) -> None:
        if self._room_freed is not None:
            self._room_freed.set()
            self._room_freed = None

    async def _load(self, prepared: PreparedModel, agent: AgentSpec, *,
                    preload: bool = False) -> _Loaded:
        key = prepared.key
        if self._pressure() >= PressureLevel.CRITICAL:
            raise self._refuse(prepared, (
                "memory pressure is critical, so no model is loaded until memory is freed "
                "(see `orion-fsm mem`)"))
        started = self.clock.monotonic()
        # A preload is a guess: it never waits for room.
        unloaded = await self._admit(prepared, wait_s=0 if preload else self.config.room_wait_s)
        try:
            # Shielded: a cancelled caller must not leave a loaded model nobody tracks.
            with anyio.CancelScope(shield=True):
                model = await anyio.to_thread.run_sync(self._load_blocking, prepared)
        except BaseException:
            del self._reserved[key]
            self._signal_room()
            raise
        del self._reserved[key]
        now = self.clock.monotonic()
        self._slots[key] = _Slot(prepared, model, last_used=now,
                                 keep_alive_s=self.keep_alive_for(agent), preloaded=preload)
        self.stats.loads += 1
        self.stats.preloads += int(preload)
        _log.info("model_loaded", extra={
            "model": key.label, "estimate_mb": round(prepared.estimate.total_mb, 1),
            "unloaded": unloaded, "preload": preload,
            "load_ms": round((now - started) * 1e3, 1)})
        return _Loaded(tuple(unloaded), preload)

    def _load_blocking(self, prepared: PreparedModel) -> LoadedModel:
        files = prepared.files
        if self._progress is not None:
            # Reading the file first puts it in the page cache (the runtime then maps it at
            # memory speed) and makes the slow part, the disk, visible as a progress bar.
            for done, total in _read_through(files.model_path):
                self._progress("read", done, total)
        try:
            return self._load_model(files.model_path, files.tokenizer_path,
                                    context_length=prepared.key.context_length,
                                    threads=self.threads, model_type=prepared.key.model_type)
        except ModelLoadError:
            raise
        except Exception as exc:  # the runtime raises plain errors on bad files
            raise ModelLoadError(f"cannot load {prepared.key.source}: {exc}") from exc

    async def _unload(self, slot: _Slot, *, idle: bool) -> bool:
        key = slot.prepared.key
        # Checked and removed with no await in between: nobody can pin it after this.
        if slot.pins > 0 or self._slots.get(key) is not slot:
            return False
        del self._slots[key]
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(self._close, slot.model)
        self.stats.unloads += 1
        if idle:
            self.stats.idle_unloads += 1
        else:
            self.stats.evictions += 1
        _log.info("model_unloaded", extra={"model": key.label,
                                           "reason": "idle" if idle else "evicted"})
        return True

    @staticmethod
    def _close(model: LoadedModel) -> None:
        model.close()
        _release_freed_heap()


def _mb(n: int) -> str:
    return f"{n / MB:.0f} MB" if n >= 10 * MB else f"{n / MB:.1f} MB"


def _read_through(path: Path) -> Iterator[tuple[int, int]]:
    total = path.stat().st_size
    done = 0
    buf = bytearray(min(_READ_CHUNK, max(1, total)))
    with path.open("rb", buffering=0) as f:
        while n := f.readinto(buf):
            done += n
            yield done, total
    if total == 0:
        yield 0, 0

