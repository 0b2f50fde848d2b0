"""Conversation memory: the turns of a session that no longer fit the model's window are
summarised by the model (with a stated prompt) and kept in the session's context store, so
later turns retrieve them. A policy says how many recent turns stay verbatim and how short
a summary is.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Final, Literal

from orion_fsm._exceptions import ConfigurationError
from orion_fsm._types import Message

from ._chunker import Encoder
from ._store import ContextStore

__all__ = ["MEMORY_POLICIES", "SUMMARY_PROMPT", "MemoryPolicy", "compact_turns",
           "policy_named", "session_store_name", "summarised_turns"]

MemoryPolicyName = Literal["adaptive", "aggressive", "conservative"]
# The instruction the model summarises old turns with; `{turns}` is the transcript.
SUMMARY_PROMPT: Final = (
    "Summarise this conversation for your own memory. Keep names, numbers, decisions, "
    "questions still open and facts the user stated; drop greetings and repetition. "
    "Write short factual sentences.\n\n{turns}")


@dataclass(frozen=True, slots=True)
class MemoryPolicy:
    """What a policy keeps: the recent turns verbatim (at least `min_recent`, within
    `window_share` of the agent's context) and summaries of at most `summary_ratio` of the
    tokens they replace."""

    name: str
    min_recent: int
    window_share: float
    summary_ratio: float
    keep_transcript: bool  # the summarised turns are stored verbatim too (retrievable)


MEMORY_POLICIES: Final = {
    # Most turns verbatim; summaries keep detail (about a third of the original tokens).
    "conservative": MemoryPolicy("conservative", min_recent=6, window_share=0.6,
                                 summary_ratio=0.33, keep_transcript=True),
    # As many recent turns as fit half the window; summaries about a fifth.
    "adaptive": MemoryPolicy("adaptive", min_recent=2, window_share=0.5, summary_ratio=0.2,
                             keep_transcript=True),
    # The last exchange only; summaries about a tenth (the seed's 60-80 % RAM gain).
    "aggressive": MemoryPolicy("aggressive", min_recent=2, window_share=0.25,
                               summary_ratio=0.1, keep_transcript=False),
}

Summarise = Callable[[str, int], Awaitable[str]]  # (prompt, max_tokens) -> summary


def policy_named(name: str) -> MemoryPolicy:
    try:
        return MEMORY_POLICIES[name]
    except KeyError:
        raise ConfigurationError("memory policy", name,
                                 "one of " + ", ".join(MEMORY_POLICIES)) from None


def session_store_name(session: str) -> str:
    """The context store of a session's memory."""
    return f"session-{session}"


async def summarised_turns(store: ContextStore) -> int:
    """How many turns of the session are in the store already (documents "turns A-B")."""
    ends = [int(d["name"].rsplit("-", 1)[1]) for d in await store.documents()
            if d["name"].startswith("turns ")]
    return max(ends) + 1 if ends else 0


def _transcript(turns: Sequence[Message]) -> str:
    return "\n".join(f"{m.role}: {m.content}" for m in turns)


async def compact_turns(turns: Sequence[Message], *, store: ContextStore, tokenizer: Encoder,
                        context_length: int, policy: MemoryPolicy, summarise: Summarise,
                        first_turn: int = 0) -> tuple[tuple[Message, ...], int]:
    """The recent turns that stay in the prompt, and how many older turns were summarised
    into `store` (as a document "turns A-B"). System messages always stay."""
    system = [m for m in turns if m.role == "system"]
    dialogue = [m for m in turns if m.role != "system"]
    budget = int(context_length * policy.window_share)
    kept: list[Message] = []
    used = 0
    for message in reversed(dialogue):
        cost = len(tokenizer.encode(message.content)) + 4  # the template's role markers
        if len(kept) >= policy.min_recent and used + cost > budget:
            break
        kept.insert(0, message)
        used += cost
    old = dialogue[: len(dialogue) - len(kept)]
    if old:
        transcript = _transcript(old)
        # Summarised in parts that fit the window with the instruction and the summary.
        room = int(context_length * 0.5) - len(tokenizer.encode(SUMMARY_PROMPT))
        parts: list[list[Message]] = [[]]
        size = 0
        for message in old:
            cost = len(tokenizer.encode(f"{message.role}: {message.content}")) + 1
            if parts[-1] and size + cost > room:
                parts.append([])
                size = 0
            parts[-1].append(message)
            size += cost
        summaries = []
        for part in parts:
            text = _transcript(part)
            tokens = len(tokenizer.encode(text))
            summaries.append(await summarise(SUMMARY_PROMPT.format(turns=text),
                                             max(16, int(tokens * policy.summary_ratio))))
        summary = "\n".join(summaries)
        last = first_turn + len(old) - 1
        text = f"Conversation turns {first_turn}-{last} (summary)\n\n{summary}\n"
        if policy.keep_transcript:
            text += f"\nTranscript\n\n{transcript}\n"
        await store.add(text, name=f"turns {first_turn}-{last}")
    return (*system, *kept), len(old)
