"""Values that cross the public API: what a caller asks for and what it gets back.

All frozen: a Result handed to a caller never changes under it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal

FinalState = Literal["success", "error"]


@dataclass(frozen=True, slots=True)
class Message:
    """One chat turn. `role` is system, user, assistant or tool (a tool's result)."""

    role: str
    content: str


@dataclass(frozen=True, slots=True)
class GenerationParams:
    """Per-request overrides of the agent's generation defaults; None keeps the default."""

    max_tokens: int | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            name: (list(value) if isinstance(value, tuple) else value)
            for name in self.__slots__
            if (value := getattr(self, name)) is not None
        }


@dataclass(frozen=True, slots=True)
class Request:
    """What the caller asked for, as the validating phase received it."""

    id: str
    messages: tuple[Message, ...]
    agent: str | None
    params: GenerationParams
    created_at: float  # unix time, from the engine's clock
    cache: bool | None = None  # None: results cached only when deterministic; False: bypass
    # OpenAI's shapes, checked by the validating phase (see _structured.py).
    response_format: Mapping[str, Any] | None = None
    tools: tuple[Mapping[str, Any], ...] = ()
    tool_choice: str | Mapping[str, Any] | None = None
    # (field, message): an argument the Request cannot hold as given (`params=` of another
    # type, `params=` with overrides, a bad priority); the validating phase refuses it.
    refused: tuple[str, str] | None = None
    session_id: str | None = None  # a turn of this Session (history trimmed to fit)
    context: str | None = None  # a context store to retrieve from (the `retrieving` phase)
    context_top_k: int | None = None  # chunks to retrieve; None: DEFAULT_CONTEXT_TOP_K

    def as_dict(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "id": self.id,
            "messages": [{"role": m.role, "content": m.content} for m in self.messages],
            "agent": self.agent,
            "params": self.params.as_dict(),
            "created_at": self.created_at,
            "cache": self.cache,
            "session_id": self.session_id,
        }
        # Only when asked: a plain request's record keeps its shape.
        if self.response_format is not None:
            doc["response_format"] = self.response_format
        if self.tools:
            doc["tools"] = list(self.tools)
        if self.tool_choice is not None:
            doc["tool_choice"] = self.tool_choice
        if self.refused is not None:
            doc["refused"] = {"field": self.refused[0], "message": self.refused[1]}
        if self.context is not None:  # absent otherwise: older traces keep their shape
            doc["context"] = self.context
        if self.context_top_k is not None:
            doc["context_top_k"] = self.context_top_k
        return doc


# The Hermes / Qwen2.5 tool-call tags, which _structured.py's grammar makes the model write.
TOOL_CALL_OPEN: Final = "<tool_call>\n"
TOOL_CALL_CLOSE: Final = "\n</tool_call>"


@dataclass(frozen=True, slots=True)
class ToolCall:
    """A call the model chose to make: a tool's name and arguments valid under its schema."""

    id: str
    name: str
    arguments: Mapping[str, Any]

    def as_text(self) -> str:
        """The call as the model writes it (compact JSON in `<tool_call>` tags): how an
        assistant turn that called a tool goes back into a conversation's history."""
        body = json.dumps({"name": self.name, "arguments": dict(self.arguments)},
                          ensure_ascii=False, separators=(",", ":"))
        return f"{TOOL_CALL_OPEN}{body}{TOOL_CALL_CLOSE}"

    def as_dict(self) -> dict[str, Any]:
        """OpenAI's shape: arguments as a JSON string."""
        return {"id": self.id, "type": "function",
                "function": {"name": self.name,
                             "arguments": json.dumps(self.arguments, ensure_ascii=False)}}


@dataclass(frozen=True, slots=True)
class Citation:
    """A chunk of a context store that was put into the prompt."""

    store: str
    document: str
    document_id: int
    chunk_id: int
    position: int  # the chunk's place in its document
    score: float  # its retrieval score (reciprocal rank fusion)

    def as_dict(self) -> dict[str, Any]:
        return {"store": self.store, "document": self.document,
                "document_id": self.document_id, "chunk_id": self.chunk_id,
                "position": self.position, "score": round(self.score, 6)}


@dataclass(frozen=True, slots=True)
class PhaseTiming:
    """How long the request spent in one state; a state entered twice appears twice."""

    state: str
    start_ms: float  # since the request started
    ms: float


@dataclass(frozen=True, slots=True)
class TokenUsage:
    input: int
    output: int


@dataclass(frozen=True, slots=True)
class MemberResult:
    """One member of a virtual agent's request: its region, what it said, how it ended."""

    role: str  # its region of the parallel state: solution | explanation
    agent: str  # the agent that served it (after its own fallback) or was last tried
    state: str  # done | failed | stopped (the other member's early stop ended it)
    text: str
    tokens: TokenUsage
    ttft_ms: float | None  # since the request started
    start_ms: float  # since the request started
    total_ms: float | None
    confidence: float | None  # geometric mean of its tokens' probabilities (its own model)
    entropy: float | None  # mean entropy of its tokens' distributions, in nats
    weight: float  # its weight in the fusion
    used: bool  # its text is part of the fused answer
    finish_reason: str | None
    error: str | None = None
    agents_tried: tuple[str, ...] = ()
    phases: tuple[PhaseTiming, ...] = ()  # its region's states
    # leader_first: when this follower was let in to load (since the request started); None:
    # it started with the request, or never did (the leader stopped early).
    joined_ms: float | None = None
    code_at: int | None = None  # its answer's tokens when it opened a code block (```)
    # The member whose answer was judged for early stop: the verdict ("taken: why" or "not
    # taken: why") and when it was made (ms since the request started).
    verdict: str | None = None
    verdict_ms: float | None = None

    def as_dict(self) -> dict[str, Any]:
        def ms(value: float | None) -> float | None:
            return None if value is None else round(value, 3)

        return {"role": self.role, "agent": self.agent, "state": self.state, "text": self.text,
                "tokens": {"input": self.tokens.input, "output": self.tokens.output},
                "ttft_ms": ms(self.ttft_ms), "start_ms": ms(self.start_ms),
                "total_ms": ms(self.total_ms),
                "confidence": None if self.confidence is None else round(self.confidence, 4),
                "entropy": None if self.entropy is None else round(self.entropy, 4),
                "weight": round(self.weight, 4), "used": self.used,
                "finish_reason": self.finish_reason, "error": self.error,
                "agents_tried": list(self.agents_tried),
                "phases": [{"state": p.state, "start_ms": round(p.start_ms, 3),
                            "ms": round(p.ms, 3)} for p in self.phases],
                "joined_ms": ms(self.joined_ms), "code_at": self.code_at,
                "verdict": self.verdict, "verdict_ms": ms(self.verdict_ms)}


@dataclass(frozen=True, slots=True)
class Result:
    """The outcome of one request: its final state, its text and how it got there."""

    request_id: str
    trace_id: str
    state: FinalState
    text: str
    agent: str | None  # the agent that served it (or was last tried)
    requested_agent: str | None  # the agent routing chose first
    fallback: bool  # served by an agent other than the one routing chose
    agents_tried: tuple[str, ...]
    phases: tuple[PhaseTiming, ...]
    tokens: TokenUsage
    ttft_ms: float | None
    total_ms: float
    finish_reason: str | None  # stop | length | cancelled, when generation ran
    error: str | None = None
    error_reason: str | None = None  # invalid | exhausted | cancelled | timeout
    error_field: str | None = None  # the request field an `invalid` error names
    token_ids: tuple[int, ...] = field(default=(), repr=False)
    routing: Mapping[str, Any] = field(default_factory=dict)
    cache: str | None = None  # "L1" when served from the result cache
    parsed: Any = None  # under a JSON response_format: the decoded, validated value
    tool_calls: tuple[ToolCall, ...] = ()
    # The slot (model instance) that served it, the time spent waiting for a free slot, the
    # prompt tokens its context already held and those it evaluated (None: no model ran).
    slot: int | None = None
    slot_wait_ms: float | None = None
    reused_prefix_tokens: int | None = None
    prefilled_tokens: int | None = None
    session_id: str | None = None
    # exhausted because every circuit breaker of the chain was open: seconds until the first
    # lets a probe request through (HTTP: 503 + Retry-After); None otherwise
    retry_after_s: float | None = None
    citations: tuple[Citation, ...] = ()  # context chunks the prompt carried, best first
    # A virtual agent's members (solution first), each with its weight in the fused text.
    members: tuple[MemberResult, ...] = ()

    @property
    def ok(self) -> bool:
        return self.state == "success"

    def as_dict(self) -> dict[str, Any]:
        """The JSON shape printed by `orion-fsm run --json`."""
        return {
            "request_id": self.request_id,
            "trace_id": self.trace_id,
            "state": self.state,
            "text": self.text,
            "agent": self.agent,
            "requested_agent": self.requested_agent,
            "fallback": self.fallback,
            "agents_tried": list(self.agents_tried),
            "phases": [
                {"state": p.state, "start_ms": round(p.start_ms, 3), "ms": round(p.ms, 3)}
                for p in self.phases
            ],
            "tokens": {"input": self.tokens.input, "output": self.tokens.output},
            "ttft_ms": None if self.ttft_ms is None else round(self.ttft_ms, 3),
            "total_ms": round(self.total_ms, 3),
            "finish_reason": self.finish_reason,
            "error": self.error,
            "error_reason": self.error_reason,
            "routing": dict(self.routing),
            "cache": self.cache,
            "parsed": self.parsed,
            "tool_calls": [c.as_dict() for c in self.tool_calls],
            "slot": self.slot,
            "slot_wait_ms": None if self.slot_wait_ms is None else round(self.slot_wait_ms, 3),
            "reused_prefix_tokens": self.reused_prefix_tokens,
            "prefilled_tokens": self.prefilled_tokens,
            "session_id": self.session_id,
            "retry_after_s": self.retry_after_s,
            "citations": [c.as_dict() for c in self.citations],
            **({"members": [m.as_dict() for m in self.members]} if self.members else {}),
        }
