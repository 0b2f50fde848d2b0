"""Session memory: turns past the window are summarised by the model into the session's
context store, later turns retrieve them; policies keep more or fewer turns verbatim."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from orion_fsm import ConfigurationError, Engine, Message
from orion_fsm.testing.replay import assert_replays
from tests.conftest import agent, read_trace_lines

pytestmark = pytest.mark.anyio

MakeEngine = Callable[..., Engine]


def conversation(n: int) -> list[Message]:
    turns = []
    for i in range(n):
        turns.append(Message("user", f"Turn {i}: my boat number {i} is painted colour{i}."))
        turns.append(Message("assistant", f"Noted, boat {i} is colour{i}."))
    return turns


@pytest.fixture
def doc(registry_doc: dict[str, Any], tiny_models: dict[str, Path]) -> dict[str, Any]:
    registry_doc["agents"].append(agent("mid", tiny_models["small"], context_length=600))
    return registry_doc


async def test_old_turns_are_summarised_into_the_session_store_and_retrieved(
        make_engine: MakeEngine, doc: dict[str, Any]) -> None:
    turns = [Message("system", "You are helpful."), *conversation(8)]
    async with make_engine(doc) as engine:
        kept = await engine.remember("s1", turns, agent="mid")
        assert kept[0].role == "system"
        assert list(kept[1:]) == turns[len(turns) - len(kept) + 1:]  # the latest, in order
        assert 2 <= len(kept) - 1 < 16
        store = await engine.context("session-s1", create=False)
        (summary,) = await store.documents()
        summarised = 16 - (len(kept) - 1)
        assert summary["name"] == f"turns 0-{summarised - 1}"
        result = await engine.infer([*kept, Message("user", "what colour was boat 0?")],
                                    agent="mid", context="session-s1", max_tokens=4)
        assert result.citations and result.citations[0].document == summary["name"]
        # Next time only the new turns past the window are summarised, numbered on.
        more = [*kept, *conversation(8)]
        await engine.remember("s1", more, agent="mid")
        names = [d["name"] for d in await store.documents()]
        assert names[1].startswith(f"turns {summarised}-")


async def test_aggressive_keeps_fewer_turns_than_conservative(make_engine: MakeEngine,
                                                              doc: dict[str, Any]) -> None:
    turns = conversation(8)
    async with make_engine(doc) as engine:
        aggressive = await engine.remember("a", turns, agent="mid", policy="aggressive")
        conservative = await engine.remember("c", turns, agent="mid", policy="conservative")
        assert len(aggressive) < len(conservative)
        a_text = (await (await engine.context("session-a")).search("Transcript", 1))
        assert not a_text or "Transcript" not in a_text[0].text  # the summary only
        with pytest.raises(ConfigurationError, match="memory policy"):
            await engine.remember("x", turns, policy="forgetful")


async def test_a_session_with_memory_summarises_old_turns_and_retrieves_them(
        make_engine: MakeEngine, doc: dict[str, Any], tmp_path: Path) -> None:
    async with make_engine(doc) as engine:
        session = engine.session(agent="mid", memory="aggressive")
        sent = 0
        while not session.summarised:
            await session.infer(f"Turn {sent}: my boat number {sent} is painted "
                                f"colour{sent}. " + "It has sails and oars. " * 6,
                                max_tokens=4)
            sent += 1
            assert sent < 20, "the history never outgrew the window"
        store = await engine.context(session.memory_store or "", create=False)
        (summary,) = await store.documents()
        assert summary["name"] == f"turns 0-{session.summarised - 1}"
        # The summarised turns left the history: what it keeps fits the policy's share.
        assert len(session.messages) < 2 * sent
        result = await session.infer("what colour was boat 0?", max_tokens=4)
        assert result.citations and result.citations[0].document == summary["name"]
    records = read_trace_lines(tmp_path / "traces" / "test.jsonl")
    turn = records[-1]
    assert turn["request"]["session_id"] == session.id
    assert turn["context"]["store"] == f"session-{session.id}"
    shutil.rmtree(tmp_path / "cache" / "contexts")
    report = await assert_replays(turn, registry=engine.registry)
    assert report.replayed is not None
    assert report.replayed["context"]["used"] == turn["context"]["used"]


async def test_a_streamed_session_turn_with_memory_starts_after_summarising(
        make_engine: MakeEngine, doc: dict[str, Any]) -> None:
    async with make_engine(doc) as engine:
        session = engine.session(agent="mid", memory="conservative")
        for i in range(30):
            stream = session.stream(f"Turn {i}: boat {i} is colour{i}. " + "Oars. " * 12,
                                    max_tokens=2)
            assert stream.request_id is None  # the request starts once memory is done
            text = "".join([part async for part in stream])
            assert stream.request_id == stream.result.request_id
            assert stream.result.text == text
            if session.summarised:
                break
        assert session.summarised and session.memory_store == f"session-{session.id}"
        assert session.messages[-1].role == "assistant"
        with pytest.raises(ConfigurationError, match="memory policy"):
            engine.session(memory="forgetful")
