"""The seams the request phases call through, declared once as Protocols.

A model and its stream (the backend), the loader and the lease it hands out, and the router.
The live implementations (`LoadedModel`, `ModelLoader`, the routers), replay's stand-ins and
the fault injectors satisfy them structurally, and mypy checks each where it is passed in.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING, Protocol

from .services.models._memory import WatchedLoader

if TYPE_CHECKING:
    from anyio.abc import TaskStatus

    from .backends import CoreGate, GenerationEvent, GenerationOutcome, SamplingParams, Threads
    from .services.context._store_values import ContextHit
    from .services.models._loader import LoaderStats, LoadInfo, ModelKey, SlotStats
    from .services.models._registry import AgentSpec
    from .services.routing._router import RoutingDecision


class Encoder(Protocol):
    """Text to token ids: what rendering a prompt needs of a tokenizer."""

    def encode(self, text: str) -> list[int]: ...

    def find_special(self, text: str) -> tuple[str, int] | None:
        """The first special token of the vocabulary written in `text`, and its offset."""
        ...


class Vocabulary(Protocol):
    """The size of the vocabulary generated ids index: what output guards check against."""

    @property
    def vocab_size(self) -> int: ...


class Stream(Protocol):
    """A generation pulled one event at a time; `next_event()` blocks (a worker thread's job)."""

    def next_event(self) -> GenerationEvent | None: ...

    @property
    def outcome(self) -> GenerationOutcome: ...

    def close(self) -> None: ...


class Model(Protocol):
    """A loaded model: generate in one blocking call, or open a stream of events."""

    @property
    def tokenizer(self) -> Vocabulary: ...

    @property
    def cached_ids(self) -> Sequence[int]:
        """The ids its context holds: a prompt sharing their prefix evaluates only the rest."""
        ...

    def generate(self, prompt_ids: Sequence[int], params: SamplingParams, *,
                 on_event: Callable[[GenerationEvent], None],
                 should_stop: Callable[[], bool], threads: Threads = None,
                 cores: CoreGate | None = None) -> GenerationOutcome: ...

    def open_stream(self, prompt_ids: Sequence[int], params: SamplingParams, *,
                    should_stop: Callable[[], bool] | None = None, threads: Threads = None,
                    cores: CoreGate | None = None, interval_s: float = 0.0) -> Stream: ...


class Prepared(Protocol):
    """A model ready to load: which file, its digest and its tokenizer; no weights yet."""

    @property
    def key(self) -> ModelKey: ...

    @property
    def sha256(self) -> str: ...

    @property
    def tokenizer(self) -> Encoder: ...


class Lease(Protocol):
    """One slot of a loaded model (an instance with its own context), the request's alone
    until the lease is released."""

    @property
    def model(self) -> Model: ...

    @property
    def load_info(self) -> LoadInfo: ...

    @property
    def stall_s(self) -> float:
        """No token for this long: the generation is abandoned."""
        ...

    def quarantine(self) -> None:
        """Never hand this slot out again: a generation was abandoned in it."""

    def record_generation(self, tokens: int, seconds: float) -> None:
        """How long `tokens` took to generate (after the first): what `stall_s` learns from."""


class Loader(WatchedLoader, Protocol):
    """Keeps models resident; the Engine runs it for its lifetime and its memory monitor
    watches it (budget, resident models, idle unloads, the pressure gate)."""

    async def prepare(self, agent: AgentSpec) -> Prepared: ...

    def key_for(self, agent: AgentSpec) -> ModelKey:
        """The model instance that serves `agent` (what its circuit breaker guards); raises
        ModelLoadError when the model file cannot be found."""
        ...

    def lease(self, agent: AgentSpec, *, prompt_ids: Sequence[int] = (), priority: int = 0,
              since: float | None = None) -> AbstractAsyncContextManager[Lease]: ...

    def slot_stats(self) -> list[SlotStats]: ...

    @property
    def stats(self) -> LoaderStats: ...

    async def run(self, *, task_status: TaskStatus[None]) -> None: ...

    def stop(self) -> None: ...

    async def aclose(self) -> None: ...


class ContextSource(Protocol):
    """Chunks of a named context store for a query: the live stores, or a trace's record."""

    async def retrieve(self, store: str, query: str, top_k: int) -> Sequence[ContextHit]: ...


class Router(Protocol):
    """Anything that picks an agent for a text. Routers never load models."""

    async def route(self, text: str, *, requested: str | None) -> RoutingDecision: ...

    def warm_texts(self) -> Sequence[str]:
        """Texts worth embedding before the first request (empty for routers that do not)."""
        ...
