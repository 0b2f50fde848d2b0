"""The model loader: converted files, tokenizers and loaded models, shared across requests.

Models load lazily in a worker thread and stay only while they earn their place: a memory
budget and a model count evict the least recently used idle model, an idle model goes after
its keep-alive, and a model a request holds (`ModelLease`) is never unloaded under it.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import logging
from collections import Counter, deque
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import TYPE_CHECKING, Final

import anyio
from anyio.abc import TaskStatus

from orion_fsm._clock import Clock, SystemClock
from orion_fsm._config import DEFAULT_STALL_FLOOR_S, STALL_TOKENS_FACTOR
from orion_fsm._exceptions import ConfigurationError, InsufficientMemory, ModelLoadError
from orion_fsm._singleflight import SingleFlight
from orion_fsm.backends import (
    LLAMA_CPP_EXTRA,
    LlamaRuntime,
    LlamaSequence,
    LoadedModel,
    SlotModel,
    Tokenizer,
    ensure_converted,
    ensure_tokenizer,
    llama_cpp_available,
    read_gguf_header,
    reused_prefix,
)
from orion_fsm.backends._shards import is_manifest
from orion_fsm.services.models._cpu import usable_cores
from orion_fsm.services.models._heap import release_freed_heap
from orion_fsm.services.models._loader_values import (
    LoaderConfig,
    LoaderStats,
    LoadInfo,
    ModelKey,
    PreparedModel,
    ResidentModel,
    SlotStats,
    mb,
)
from orion_fsm.services.models._pressure import PressureGauge, PressureLevel
from orion_fsm.services.models._registry import AgentSpec, ModelSource
from orion_fsm.services.models._sharded import ShardedLoad
from orion_fsm.services.models._slots import Instance, ModelLease, Resident, Waiter
from orion_fsm.services.models._tiers import (
    MB,
    VariantChoice,
    choose_variant,
    estimate_model_memory,
    tier_for,
)

if TYPE_CHECKING:
    from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
    from opentelemetry.trace import Tracer

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
    "SlotStats",
    "require_runtimes",
]

ProgressCallback = Callable[[str, int, int], None]
LoadModel = Callable[..., LoadedModel]

_log = logging.getLogger("orion_fsm.loader")
_READ_CHUNK: Final = 4 << 20
_QUEUE: Final = 16  # pending background commands; a full queue drops preload hints
_SEND_FAILURES: Final = (anyio.WouldBlock, anyio.ClosedResourceError, anyio.BrokenResourceError)
# Architectures ctransformers' 2023 ggml runs (GGUF `general.architecture`); any other needs
# llama.cpp. Its slots are sequences of one context, so "auto" gives it more of them.
_CTRANSFORMERS_ARCHITECTURES: Final = frozenset(
    {"llama", "gpt2", "gptj", "gpt_neox", "falcon", "mpt", "starcoder", "replit", "dolly-v2"})
_LLAMA_SLOTS_PER_CORE: Final = 4


@dataclass(frozen=True, slots=True)
class _Loaded:
    unloaded: tuple[str, ...]
    preloaded: bool


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
        tracer: Tracer | None = None,
    ) -> None:
        self.cache_dir = cache_dir
        self.tracer = tracer  # spans of the loader's own work (one per part of a sharded model)
        # Explicit threads win; None lets each runtime call take cores from a CpuAllotter.
        self.threads = threads
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
        self._residents: dict[ModelKey, Resident] = {}
        self._reserved: dict[ModelKey, int] = {}  # loads under way, counted against the limits
        self._preparing: SingleFlight[PreparedModel] = SingleFlight()
        self._loading: SingleFlight[_Loaded] = SingleFlight()
        self._admission: anyio.Lock | None = None
        self._seq = itertools.count()  # arrival order of requests waiting for a slot
        self._room_freed: anyio.Event | None = None  # set when a request releases a model
        self._usage = _UsageModel(config.usage_window)
        self._agents: dict[str, AgentSpec] = {}
        self._queued: set[tuple[str, str | None]] = set()
        self._stopped = False
        self._located: dict[ModelSource, Path] = {}
        self._architectures: dict[Path, str] = {}
        # llama_cpp models: the runtime whose sequences are the resident's slots.
        self._runtimes: dict[ModelKey, LlamaRuntime] = {}
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
        return ModelKey(path, agent.context_length, agent.model_type, choice.name,
                        self._runtime_for(agent.runtime, path))

    def _runtime_for(self, asked: str, path: Path) -> str:
        """The runtime that runs the file: the agent's, unless ctransformers cannot run its
        architecture (then llama.cpp, when installed)."""
        if asked != "ctransformers":
            return asked
        arch = self._architectures.get(path)
        if arch is None:
            meta = read_gguf_header(path).metadata.get("general.architecture", "llama")
            arch = self._architectures[path] = str(meta)
        if arch in _CTRANSFORMERS_ARCHITECTURES:
            return asked
        if llama_cpp_available():
            return "llama_cpp"
        raise ModelLoadError(
            f"{path.name} is a {arch!r} model, which ctransformers cannot run; install the "
            f"llama.cpp runtime ({LLAMA_CPP_EXTRA}) or pick a llama-family model")

    def keep_alive_for(self, agent: AgentSpec) -> float:
        if agent.keep_alive_s is not None:
            return agent.keep_alive_s
        if self.config.keep_alive_s is not None:
            return self.config.keep_alive_s
        return self.tier.keep_alive_s

    # --- what is loaded ---------------------------------------------------------------------

    def loaded(self) -> list[ModelKey]:
        return list(self._residents)

    def models(self) -> list[ResidentModel]:
        """Loaded models, least recently used first."""
        now = self.clock.monotonic()
        return [ResidentModel(s.prepared.key, s.estimate_bytes, s.pins,
                              0.0 if s.pins else max(0.0, now - s.last_used), s.keep_alive_s)
                for s in self._by_recency()]

    @property
    def used_bytes(self) -> int:
        """Estimated bytes of the loaded models and of the loads under way."""
        return (sum(r.estimate_bytes for r in self._residents.values())
                + sum(self._reserved.values()))

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
                source, shards = key.source, 0
                if is_manifest(source):
                    # A sharded model: its parts assembled into one file (what the runtime
                    # reads), in the loader's own states (see _sharded.py).
                    load = ShardedLoad(source, self.cache_dir, self.tracer, self._progress)
                    source = load.run()
                    shards = load.parts
                # llama.cpp reads the file as it is: only the tokenizer is built for it.
                ensure = ensure_tokenizer if key.runtime == "llama_cpp" else ensure_converted
                files = ensure(source, self.cache_dir, progress=self._progress)
                estimate = estimate_model_memory(files.model_path, key.context_length,
                                                 overhead_bytes=overhead)
                return PreparedModel(key, files, Tokenizer.from_file(files.tokenizer_path),
                                     estimate, shards)

            result = await anyio.to_thread.run_sync(work)
            self._prepared[key] = result
            return result

        return await self._preparing.run(key, convert)

    def parallel_for(self, agent: AgentSpec, prepared: PreparedModel) -> int:
        """Slots the agent's model may have: the agent's `parallel`, else `auto`: two per
        usable core (four generations share two cores token by token, so none waits for
        another to finish), as many as the memory budget holds, at least one."""
        if agent.parallel is not None:
            return agent.parallel
        estimate = prepared.estimate
        if prepared.key.runtime == "llama_cpp":
            # Slots are sequences batched in one decode step: a KV cache each, weights once.
            room = self.budget_bytes - estimate.weights_bytes - estimate.overhead_bytes
            fit = room // max(1, estimate.kv_cache_bytes)
            return max(1, min(_LLAMA_SLOTS_PER_CORE * usable_cores(), fit))
        fit = self.budget_bytes // max(1, estimate.total_bytes)
        return max(1, min(2 * usable_cores(), fit))

    def stall_s_for(self, agent: AgentSpec, resident: Resident) -> float:
        """The agent's `stall_s`, else 20 x the measured time per token, at least 5 s."""
        if agent.stall_s is not None:
            return agent.stall_s
        return max(DEFAULT_STALL_FLOOR_S, STALL_TOKENS_FACTOR * (resident.token_s or 0.0))

    async def acquire(self, agent: AgentSpec, *, variant: str | None = None,
                      prompt_ids: Sequence[int] = (), priority: int = 0,
                      since: float | None = None) -> ModelLease:
        """Load the agent's model if needed and take one of its slots; `release()` frees it.

        Of the free slots, the one whose context shares the longest prefix with `prompt_ids`
        (its evaluation is skipped); with none free, another slot is loaded if `parallel`
        and the budget allow, else the request waits, lower `priority` numbers first, then
        the oldest `since` (when the request started, on the loader's clock; default now):
        a request retried after a failure keeps its place instead of queueing behind every
        request that came after it, and its deadline.
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
        while (resident := self._residents.get(key)) is None:
            flight = await self._loading.run(key, lambda: self._load(prepared, agent))
        resident.pins += 1
        loaded_at = self.clock.monotonic()
        resident.parallel = max(resident.parallel, self.parallel_for(agent, prepared))
        if key.runtime == "llama_cpp":  # its context has room for this many sequences
            resident.parallel = min(resident.parallel, resident.sequences)
        try:
            instance, queued = await self._take_slot(
                resident, prompt_ids, priority, started if since is None else since)
        except BaseException:
            resident.pins -= 1
            self._after_release(resident)
            raise
        waited = (self.clock.monotonic() - loaded_at) * 1e3 if queued else 0.0
        info = LoadInfo(
            model=key.label, variant=key.variant, loaded_now=flight is not None,
            load_ms=0.0 if flight is None else (loaded_at - started) * 1e3,
            estimate_mb=prepared.estimate.total_mb,
            unloaded=() if flight is None else flight.unloaded,
            preloaded=resident.preloaded or (flight is not None and flight.preloaded),
            slot=instance.index, slot_wait_ms=waited,
            reused_tokens=reused_prefix(instance.model.cached_ids, prompt_ids),
            parallel=resident.parallel, shards=prepared.shards,
        )
        if resident.preloaded:
            resident.preloaded = False
            self.stats.preload_hits += 1
        resident.keep_alive_s = max(resident.keep_alive_s, self.keep_alive_for(agent))
        resident.last_used = instance.last_used = self.clock.monotonic()
        lease = ModelLease(resident, instance, info, self.stall_s_for(agent, resident),
                           self._released)
        if self.config.predictive_preload:
            for nxt in self._usage.likely_next(agent.id, self.config.preload_min_share):
                spec = self._agents[nxt]
                if nxt != agent.id and self._is_absent(spec):
                    self.preload(spec)
                    break
        return lease

    @contextlib.asynccontextmanager
    async def lease(self, agent: AgentSpec, *, variant: str | None = None,
                    prompt_ids: Sequence[int] = (), priority: int = 0,
                    since: float | None = None) -> AsyncIterator[ModelLease]:
        """`acquire` for the block: the slot is held until it is left, however."""
        lease = await self.acquire(agent, variant=variant, prompt_ids=prompt_ids,
                                   priority=priority, since=since)
        try:
            yield lease
        finally:
            lease.release()

    def slot_stats(self) -> list[SlotStats]:
        """Each resident model's slots: running, queued, quarantined."""
        return [SlotStats(r.prepared.key.label, r.parallel, len(r.instances), r.running,
                          r.queued, len(r.quarantined)) for r in self._residents.values()]

    async def _take_slot(self, resident: Resident, prompt_ids: Sequence[int],
                         priority: int, since: float) -> tuple[Instance, bool]:
        """A slot for the request, and whether it had to queue (or load one) for it."""
        queued = False
        while True:
            free = [i for i in resident.instances if not i.busy]
            if free and not resident.queued:
                # The longest shared prefix; among equals, the least recently used, so a
                # conversation's slot is the last to be taken by strangers.
                best = max(free, key=lambda i: (reused_prefix(i.model.cached_ids, prompt_ids),
                                                -i.last_used))
                best.busy = True
                return best, queued
            if (len(resident.instances) + resident.creating < resident.parallel
                    and (added := await self._add_slot(resident)) is not None):
                return added, True
            if not queued:
                queued = True
                self.stats.slot_waits += 1
            instance = await self._wait_for_slot(resident, priority, since)
            if instance is not None:
                return instance, queued

    async def _wait_for_slot(self, resident: Resident, priority: int,
                             since: float) -> Instance | None:
        """Queue until a release hands this request a slot (or wakes it to look again)."""
        waiter = Waiter(priority, since, next(self._seq), anyio.Event())
        heapq.heappush(resident.waiters, waiter)
        resident.queued += 1
        try:
            await waiter.event.wait()
        except BaseException:
            if waiter.instance is not None:
                # A slot arrived as we were cancelled: pass it on, or it is lost.
                self._released(resident, waiter.instance, pinned=False)
            elif not waiter.woken:
                waiter.abandoned = True
                resident.queued -= 1
            raise
        return waiter.instance

    async def _add_slot(self, resident: Resident) -> Instance | None:
        """Load one more instance for a request that found every slot busy; None when the
        budget has no room for it (the request then waits for a slot)."""
        prepared = resident.prepared
        if self._admission is None:
            self._admission = anyio.Lock()
        # Counted (in `parallel` and in used_bytes) from the start: the caller checked
        # `parallel` with no await since, so two requests never both take the last place.
        resident.creating += 1
        try:
            async with self._admission:
                if self.used_bytes > self.budget_bytes and await self._evict_for(
                        0, keep=resident, count_models=False) is None:
                    if not resident.instances:  # every slot quarantined: nothing frees up
                        raise self._refuse(prepared, (
                            f"its {len(resident.quarantined)} slot(s) were abandoned by the "
                            "stall watchdog and the budget has no room for a new one"))
                    return None
            runtime = self._runtimes.get(prepared.key)
            if runtime is not None and not runtime.closed:
                # A sequence of the context there is: nothing to load, no thread hop (a
                # request that joins late misses the step its neighbours share).
                model: SlotModel = runtime.open_sequence()
            else:
                with anyio.CancelScope(shield=True):
                    # llama_cpp: a new context (the last one was given up on) holds them all.
                    model = await anyio.to_thread.run_sync(self._load_blocking, prepared,
                                                           resident.sequences)
        except ModelLoadError:
            if not resident.instances:
                raise
            return None  # serve with the slots there are
        finally:
            resident.creating -= 1
        instance = Instance(resident.next_index, model, self.clock.monotonic(), busy=True)
        resident.next_index += 1
        resident.instances.append(instance)
        self.stats.slots_added += 1
        _log.info("slot_added", extra={"model": prepared.key.label, "slot": instance.index,
                                       "slots": len(resident.instances)})
        return instance

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
        await self._reap_quarantined()
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
        residents, self._residents = list(self._residents.values()), {}
        for resident in residents:
            await self._close_instances(resident)
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

    def _by_recency(self) -> list[Resident]:
        return sorted(self._residents.values(), key=lambda s: s.last_used)

    def _pressure(self) -> PressureLevel:
        return PressureLevel.LOW if self.monitor is None else self.monitor.level

    def _is_absent(self, agent: AgentSpec) -> bool:
        try:
            key = self.key_for(agent)
        except ModelLoadError:
            return False
        return key not in self._residents and not self._loading.in_flight(key)

    def _released(self, resident: Resident, instance: Instance, *, pinned: bool = True) -> None:
        """A request let go of a slot: hand it to the first waiter, or free it."""
        now = self.clock.monotonic()
        resident.last_used = instance.last_used = now
        if pinned:
            resident.pins -= 1
        if instance.quarantined:
            self.stats.quarantined += 1
            _log.warning("slot_quarantined", extra={"model": resident.prepared.key.label,
                                                    "slot": instance.index})
            self._give_up_wedged(resident)
        handed = False
        while resident.waiters and not handed:
            waiter = heapq.heappop(resident.waiters)
            if waiter.abandoned:
                continue
            resident.queued -= 1
            waiter.woken = True
            if not instance.quarantined:
                waiter.instance = instance  # still busy: it changes hands
                handed = True
            # Woken without a slot: it may load a replacement for the quarantined one.
            waiter.event.set()
            break
        if not handed:
            instance.busy = False
        self._after_release(resident)

    def _after_release(self, resident: Resident) -> None:
        if resident.pins == 0:
            self._signal_room()
        if resident.pins == 0 and resident.keep_alive_s <= 0:
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
            if prepared.key in self._residents:
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
            f"model {prepared.key.label} needs about {mb(est.total_bytes)} (weights "
            f"{mb(est.weights_bytes)} + KV cache {mb(est.kv_cache_bytes)} for "
            f"{prepared.key.context_length} tokens); {why}",
            needed_bytes=prepared.estimate.total_bytes, budget_bytes=self.budget_bytes)

    def _held_back(self, need: int) -> str | None:
        """Why the models requests hold (or are loading) leave no room; None if they don't."""
        held = [s for s in self._residents.values() if s.pins > 0]
        held_bytes = sum(s.estimate_bytes for s in held) + sum(self._reserved.values())
        held_count = len(held) + len(self._reserved)
        if held_bytes + need <= self.budget_bytes and held_count < self.max_loaded_models:
            return None
        return (f"the {held_count} model(s) in use by requests hold {mb(held_bytes)} of the "
                f"{mb(self.budget_bytes)} budget, with at most {self.max_loaded_models} "
                "model(s) loaded")

    async def _admit(self, prepared: PreparedModel, *, wait_s: float) -> list[str]:
        """Unload idle models (LRU first) until `prepared` fits, then reserve its room.

        Models in use are never unloaded: while they block, wait up to `wait_s` for their
        requests to release them, then refuse (the request falls back to a smaller agent).
        """
        need = prepared.estimate.total_bytes
        if need > self.budget_bytes:
            raise self._refuse(prepared, (
                f"the memory budget is {mb(self.budget_bytes)}: use a smaller quantization "
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

    async def _evict_for(self, need: int, *, keep: Resident | None = None,
                         count_models: bool = True) -> list[str] | None:
        """Unload idle models (never `keep`), least recently used first, until `need` fits;
        None if the idle ones ran out (requests pinned them while this awaited)."""
        unloaded: list[str] = []
        while (self.used_bytes + need > self.budget_bytes
               or (count_models and len(self._residents) + len(self._reserved)
                   >= self.max_loaded_models)):
            victim = next((s for s in self._by_recency() if s.pins == 0 and s is not keep),
                          None)
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
            sequences = self.parallel_for(agent, prepared)
            with anyio.CancelScope(shield=True):
                model = await anyio.to_thread.run_sync(self._load_blocking, prepared, sequences)
        except BaseException:
            del self._reserved[key]
            self._signal_room()
            raise
        del self._reserved[key]
        now = self.clock.monotonic()
        self._residents[key] = Resident(prepared, [Instance(0, model, now)], last_used=now,
                                 keep_alive_s=self.keep_alive_for(agent), preloaded=preload,
                                 sequences=sequences)
        self.stats.loads += 1
        self.stats.preloads += int(preload)
        _log.info("model_loaded", extra={
            "model": key.label, "estimate_mb": round(prepared.estimate.total_mb, 1),
            "unloaded": unloaded, "preload": preload,
            "load_ms": round((now - started) * 1e3, 1)})
        return _Loaded(tuple(unloaded), preload)

    def _load_blocking(self, prepared: PreparedModel, sequences: int = 1) -> SlotModel:
        """A new slot: a ctransformers instance, or a sequence of the llama.cpp context (the
        first one creates it, with room for `sequences`)."""
        key = prepared.key
        if key.runtime == "llama_cpp":
            runtime = self._runtimes.get(key)
            if runtime is not None and not runtime.closed:
                return runtime.open_sequence()
            if self._progress is not None:
                for done, total in _read_through(key.source):
                    self._progress("read", done, total)
            sequence = LlamaSequence.load(key.source, prepared.files.tokenizer_path,
                                          context_length=key.context_length,
                                          sequences=sequences, threads=self.threads)
            self._runtimes[key] = sequence.runtime
            return sequence
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

    async def _unload(self, resident: Resident, *, idle: bool) -> bool:
        key = resident.prepared.key
        # Checked and removed with no await in between: nobody can pin it after this.
        if resident.pins > 0 or self._residents.get(key) is not resident:
            return False
        del self._residents[key]
        with anyio.CancelScope(shield=True):
            await self._close_instances(resident)
        self.stats.unloads += 1
        if idle:
            self.stats.idle_unloads += 1
        else:
            self.stats.evictions += 1
        _log.info("model_unloaded", extra={"model": key.label,
                                           "reason": "idle" if idle else "evicted"})
        return True

    async def _close_instances(self, resident: Resident) -> None:
        live = [i.model for i in resident.instances]
        # A quarantined instance whose thread is still stuck cannot be closed (closing waits
        # for it): it is dropped (a llama.cpp sequence given back unwaited), and the runtime
        # frees it when that thread lets go.
        live += [i.model for i in resident.quarantined if not i.model.generating]
        stuck = [i.model for i in resident.quarantined if i.model.generating]
        resident.instances, resident.quarantined = [], []
        for model in live:
            await anyio.to_thread.run_sync(self._close, model)
        for model in stuck:  # after the live ones: the last close would wait for the thread
            if isinstance(model, LlamaSequence):
                model.abandon()
        self._runtimes.pop(resident.prepared.key, None)

    def _give_up_wedged(self, resident: Resident) -> None:
        """Every slot of a llama.cpp model stalled: its one decode thread is stuck in the
        runtime. Its sequences are given back without waiting (the thread frees the context
        when its call returns) and the next slot is a sequence of a new context."""
        key = resident.prepared.key
        runtime = self._runtimes.get(key)
        if key.runtime != "llama_cpp" or runtime is None or resident.instances:
            return
        _log.warning("context_wedged", extra={"model": key.label,
                                              "sequences": len(resident.quarantined)})
        del self._runtimes[key]
        resident.wedged.append(runtime)
        for instance in resident.quarantined:
            if isinstance(instance.model, LlamaSequence):
                instance.model.abandon()
        resident.quarantined.clear()

    async def _reap_quarantined(self) -> None:
        """Close quarantined instances whose stuck generation has ended: room for new slots."""
        for resident in list(self._residents.values()):
            done = [i for i in resident.quarantined if not i.model.generating]
            for instance in done:
                resident.quarantined.remove(instance)
                await anyio.to_thread.run_sync(self._close, instance.model)
            freed = [r for r in resident.wedged if r.closed]
            resident.wedged = [r for r in resident.wedged if not r.closed]
            if done or freed:
                self._signal_room()

    @staticmethod
    def _close(model: SlotModel) -> None:
        model.close()
        # glibc kept the runtime's freed vocabulary and buffers: RSS only fell by ~75 %
        # after unloading SmolLM2 without this (~100 % with it).
        release_freed_heap()


def require_runtimes(agents: Iterable[AgentSpec]) -> None:
    """ConfigurationError for the first agent whose runtime is not installed."""
    for agent in agents:
        if agent.runtime == "llama_cpp" and not llama_cpp_available():
            raise ConfigurationError(f"agent {agent.id!r}: runtime", agent.runtime,
                                     f"installed first ({LLAMA_CPP_EXTRA})")


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

