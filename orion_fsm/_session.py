"""Multi-turn conversations: a `Session` keeps the messages and sends each turn with all of
them, so the slot holding the conversation's prefix evaluates only the new turn; the history
policy that fits a long conversation into the agent's context (`fit_history`); and session
memory, which summarises the turns past the window into the session's context store.
"""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, Self

from ._types import Message, Result
from .services.context._memory import policy_named, session_store_name

if TYPE_CHECKING:
    from ._engine import Engine, ResponseStream
    from ._seams import Encoder
    from .services.models._registry import AgentSpec

__all__ = ["Session", "SessionStream", "fit_history"]


def fit_history(messages: Sequence[Message], agent: AgentSpec,
                tokenizer: Encoder) -> tuple[list[Message], int]:
    """The messages that fit the agent's context, and how many were dropped.

    Policy: system messages always stay; of the others, the newest that fit stay, oldest
    dropped first, leaving room for the answer (the agent's `max_tokens`, at most a quarter of
    the context). The last message always stays: if it alone does not fit, the request is
    refused as too long, as any request is.
    """
    room = agent.context_length - min(agent.generation.max_tokens, agent.context_length // 4)
    system = [m for m in messages if m.role == "system"]
    turns = [m for m in messages if m.role != "system"]

    def size(kept: Sequence[Message]) -> int:
        rendered = agent.chat_template.render([(m.role, m.content) for m in [*system, *kept]])
        return len(tokenizer.encode(rendered))

    dropped = 0
    while len(turns) - dropped > 1 and size(turns[dropped:]) > room:
        dropped += 1
    if dropped == 0:
        return list(messages), 0
    return [*system, *turns[dropped:]], dropped


class Session:
    """A conversation with the engine: `await session.infer(text)` or `session.stream(text)`
    sends the history plus the new user turn, then appends both turns once it succeeds.

    Turns carry the session's id (in the trace, so a turn replays as sent). The first turn's
    agent serves the later ones unless `agent` is given, so they land on the model whose slot
    holds the conversation: turn N evaluates only its new tokens. History longer than the
    agent's context is trimmed per turn by `fit_history` (system messages and the newest turns
    that fit); the session itself keeps every message.

    With `memory` (a policy: adaptive | aggressive | conservative, see `MEMORY_POLICIES`),
    each turn first hands the history to `Engine.remember`: the turns past the policy's share
    of the window are summarised by the model into the store `session-<id>` and leave the
    history; once something was summarised, turns retrieve from that store (the
    `retrieving` phase, cited in the Result) unless they name another `context`.
    """

    def __init__(self, engine: Engine, *, agent: str | None = None, system: str | None = None,
                 session_id: str | None = None, memory: str | None = None) -> None:
        self._engine = engine
        self.id = session_id or f"s-{random.getrandbits(48):012x}"
        self.agent = agent
        self.memory = None if memory is None else policy_named(memory).name
        self._messages: list[Message] = [] if system is None else [Message("system", system)]
        self.summarised = 0  # turns moved from the history into the session's store

    @property
    def messages(self) -> tuple[Message, ...]:
        return tuple(self._messages)

    def _turn(self, text: str) -> list[Message]:
        return [*self._messages, Message("user", text)]

    def _record(self, text: str, result: Result) -> None:
        self._messages += [Message("user", text), Message("assistant", result.text)]
        if self.agent is None:
            self.agent = result.agent

    @property
    def memory_store(self) -> str | None:
        """The context store holding this session's summarised turns, once there is one."""
        return session_store_name(self.id) if self.summarised else None

    async def _compact(self, text: str, options: dict[str, Any]) -> list[Message]:
        """The messages of this turn; with memory, old turns go to the store first."""
        messages = self._turn(text)
        if self.memory is None:
            return messages
        kept = await self._engine.remember(self.id, messages, policy=self.memory,
                                           agent=self.agent)
        if len(kept) < len(messages):
            # Those turns live in the store now: the history keeps the rest only.
            self.summarised += len(messages) - len(kept)
            self._messages = list(kept[:-1])
        if options.get("context") is None and self.memory_store is not None:
            options["context"] = self.memory_store
        return list(kept)

    async def infer(self, text: str, **options: Any) -> Result:
        """One turn (options as `Engine.infer`). Raises `RequestFailed`; the turn is then not
        added to the history."""
        messages = await self._compact(text, options)
        result = await self._engine.infer(messages, agent=self.agent, session_id=self.id,
                                          **options)
        self._record(text, result)
        return result

    def stream(self, text: str, **options: Any) -> SessionStream:
        """One turn, streamed (options as `Engine.stream`); added to the history once the
        stream ends successfully. With memory, the request starts at the first `__anext__`
        (after the old turns are summarised), so `request_id` is None until then."""

        def start(messages: list[Message]) -> ResponseStream:
            return self._engine.stream(messages, agent=self.agent, session_id=self.id,
                                       **options)

        if self.memory is None:
            return SessionStream(self, text, start(self._turn(text)))

        async def compacted() -> ResponseStream:
            return start(await self._compact(text, options))

        return SessionStream(self, text, None, compacted)

    def clear(self) -> None:
        """Forget the turns (system messages stay)."""
        self._messages = [m for m in self._messages if m.role == "system"]


class SessionStream:
    """`async for text in session.stream(...)`: a `ResponseStream` that records the turn."""

    def __init__(self, session: Session, text: str, inner: ResponseStream | None,
                 start: Callable[[], Awaitable[ResponseStream]] | None = None) -> None:
        self._session, self._text, self._inner, self._start = session, text, inner, start
        self.request_id = None if inner is None else inner.request_id

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> str:
        if self._inner is None:
            assert self._start is not None
            self._inner = await self._start()
            self.request_id = self._inner.request_id
        try:
            return await self._inner.__anext__()
        except StopAsyncIteration:
            self._session._record(self._text, self._inner.result)
            raise

    async def aclose(self) -> None:
        if self._inner is not None:
            await self._inner.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    @property
    def result(self) -> Result:
        if self._inner is None:
            raise RuntimeError("the stream has not started: iterate it first")
        return self._inner.result
