"""What a phase works with: the engine-wide `Services` and one request's `RequestState`."""

from __future__ import annotations

import threading
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .._structured import OutputFormat
from .._types import Citation, Request, ToolCall
from ..backends import MaskStats, SamplingParams
from ..services.observability import _attributes as attr

if TYPE_CHECKING:
    from .._clock import Clock
    from .._seams import ContextSource, Lease, Loader, Prepared, Router
    from .._singleflight import SingleFlight
    from ..services.caches._cacheset import CacheSet
    from ..services.context._store_values import ContextHit
    from ..services.models._cpu import CpuAllotter
    from ..services.models._loader import LoadInfo
    from ..services.models._registry import AgentSpec, Registry, VirtualSpec
    from ..services.resilience._admission import Deadline
    from ..services.resilience._breaker import BreakerBoard, BreakerPermit
    from ..services.resilience._guardrails import Guardrails
    from ..services.resilience._retry import Retries
    from ..services.routing._embeddings import ExpectedText
    from ..services.routing._router import RoutingDecision
    from ._members import MemberRun

@dataclass(frozen=True, slots=True, eq=False)
class Services:
    """What every request's phases call: built once when the Engine starts."""

    registry: Registry
    router: Router
    loader: Loader
    caches: CacheSet | None
    breakers: BreakerBoard
    guardrails: Guardrails | None
    clock: Clock
    # Identical L1 misses generate once: the first leads, the others wait for its answer.
    l1_flights: SingleFlight[None]
    # The Engine's task group: cache writes happen after the reply, never before it.
    background: Callable[..., object]
    retries: Retries  # whether a transient failure tries the same agent again
    # Cores for each runtime call of a generation; None when the Engine was given `threads`.
    cores: CpuAllotter | None = None
    # Context stores by name, for requests that name one (None: retrieval is off).
    contexts: ContextSource | None = None
    # A stream's chunks come at most this often after its first (Engine(stream_interval_ms=)).
    stream_interval_s: float = 0.0


@dataclass(eq=False, slots=True)
class RequestState:
    """What one request found on its way; lives exactly as long as the request."""

    request: Request
    streaming: bool
    stack: AsyncExitStack  # released when the request ends, however it ends
    deadline: Deadline
    started: float  # the services clock's monotonic time at the start
    notes: dict[str, Any]  # span attributes of the current phase
    breakers_at_start: Mapping[str, Any] = field(default_factory=dict)
    priority: int = 0  # lower first, for a slot as for admission
    # routing
    # Announced to the embedding batcher at admission; arrives as routing starts.
    before_routing: ExpectedText | None = None
    decision: RoutingDecision | None = None
    chain: tuple[str, ...] = ()
    l1_key: str | None = None
    cache_level: str | None = None
    # retrieving: the chunks found (best first), then those the prompt carried
    retrieved: tuple[ContextHit, ...] = ()
    citations: tuple[Citation, ...] = ()
    # the current attempt (an agent of the chain); its resources live on `attempt_scope`
    attempt: int = 0
    attempt_scope: AsyncExitStack | None = None
    agent: AgentSpec | None = None
    prepared: Prepared | None = None
    permit: BreakerPermit | None = None
    lease: Lease | None = None
    load_info: LoadInfo | None = None  # the last lease's: which slot, how long it waited
    prefilled: int | None = None  # prompt tokens the last generation evaluated
    prompt_ids: tuple[int, ...] = ()
    prompt_turns: tuple[tuple[str, str], ...] = ()  # what prompt_ids render (for feedback)
    sampling: SamplingParams | None = None
    token_scores: bool = False  # each token's log-probability kept (a virtual member)
    instruction: str | None = None  # a virtual member's part of the answer (its system turn)
    # Called after each generated chunk is recorded, in the thread that generates it (a
    # virtual leader's: its followers join the moment its answer shows it is not simple).
    on_tokens: Callable[[], None] | None = None
    # generation
    text_parts: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    emitted_chars: int = 0
    first_token_at: float | None = None  # ms since the start
    # per generated token: its log-probability and its distribution's entropy (nats)
    logprobs: list[float] = field(default_factory=list)
    entropies: list[float] = field(default_factory=list)
    # a virtual member's answer: how many tokens it had when it opened a code block (``` in
    # its text), a structure fact its early stop reads while the answer is still coming
    code_at: int | None = None
    finish_reason: str | None = None
    # Set to stop the generation (caller gone, deadline, runaway repetition); read by the
    # worker thread between tokens.
    stop: threading.Event = field(default_factory=threading.Event)
    stopped_for: str | None = None  # finish reason when a guard stopped the generation
    failures: list[tuple[str, str]] = field(default_factory=list)  # (agent, why)
    failure_kind: str | None = None  # how the last attempt failed (breaker_open, load_failed...)
    retried: int = 0  # retries of the current agent of the chain
    attempt_started: float = 0.0  # services clock, when the current attempt began
    refused: set[str] = field(default_factory=set)  # agents an open breaker turned away
    retry_after_s: float | None = None  # every agent refused: when a breaker lets one in
    error: str | None = None
    error_reason: str | None = None
    error_field: str | None = None
    # structured output: the format asked for, and what the output held
    output_format: OutputFormat | None = None
    mask: MaskStats | None = None
    parsed: Any = None
    tool_calls: tuple[ToolCall, ...] = ()
    # a virtual agent (serving_virtual, fusing): each member's run, the early-stop decision,
    # and what fusing made of the answers
    virtual: VirtualSpec | None = None
    members: list[MemberRun] = field(default_factory=list)
    early_stop: dict[str, Any] | None = None
    fusion: dict[str, Any] | None = None

    @property
    def agent_id(self) -> str | None:
        """The agent serving (or last tried): a virtual agent until its fallback takes over."""
        if self.agent is not None:
            return self.agent.id
        return None if self.virtual is None else self.virtual.id

    def usage(self) -> tuple[int, int]:
        """(input, output) tokens: a virtual agent's are its members' sums."""
        if self.members and self.agent is None:
            return (sum(len(m.state.prompt_ids) for m in self.members),
                    sum(len(m.state.token_ids) for m in self.members))
        return len(self.prompt_ids), len(self.token_ids)

    def fail(self, reason: str, message: str, *, field: str | None = None) -> None:
        self.error, self.error_reason, self.error_field = message, reason, field
        self.notes[attr.ERROR_TYPE] = reason
        self.notes[attr.ERROR] = message


@dataclass(frozen=True, slots=True)
class Next:
    """The last item a streaming phase yields: the event to send."""

    event: str


@dataclass(frozen=True, slots=True)
class Region:
    """An event of one region of a parallel state, sent while its phase goes on; `notes`
    are the span attributes of the region's state it leaves."""

    region: str
    event: str
    notes: Mapping[str, Any] = field(default_factory=dict)


PhaseFn = Callable[[Services, RequestState], Awaitable[str]]
StreamingPhaseFn = Callable[[Services, RequestState],
                            AsyncGenerator["str | Region | Next", None]]
