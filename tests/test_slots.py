"""Many requests at once: slots chosen by cached prefix, a queue fair by priority that a
cancelled caller leaves, sessions that evaluate only their new turn, the stall watchdog, and
the slot figures in `Engine.stats()`, the Result, the trace and its replay."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest

from orion_fsm import Engine, LoaderConfig, ModelLoader, Registry, Session
from orion_fsm.backends import SamplingParams
from orion_fsm.testing.faults import faulty_loader
from orion_fsm.testing.replay import assert_replays
from tests.conftest import agent, assert_no_thread_leaked, read_trace_lines

pytestmark = pytest.mark.anyio

MakeEngine = Callable[..., Engine]
GREEDY = SamplingParams(max_tokens=4, temperature=0, top_k=1)


def one_model(path: Path, **extra: Any) -> dict[str, Any]:
    return {"version": 1, "default_agent": "a", "agents": [agent("a", path, **extra)]}


def generate(model: Any, ids: list[int]) -> None:
    model.generate(ids, GREEDY, on_event=lambda e: None, should_stop=lambda: False)


async def test_a_request_takes_the_free_slot_holding_its_prefix(
    tiny_models: dict[str, Path], tmp_path: Path,
) -> None:
    registry = Registry.from_dict(one_model(tiny_models["small"], parallel=3))
    spec = registry.get("a")
    loader = ModelLoader(tmp_path / "cache", threads=1,
                         config=LoaderConfig(predictive_preload=False))
    prepared = await loader.prepare(spec)
    encode = prepared.tokenizer.encode
    first, second = encode("You are a pirate. Say hi"), encode("You are a lawyer. Say hi")
    a = await loader.acquire(spec, prompt_ids=first)
    b = await loader.acquire(spec, prompt_ids=second)  # the first slot is busy: a second one
    assert (a.load_info.slot, b.load_info.slot) == (0, 1)
    await anyio.to_thread.run_sync(generate, a.model, first)
    await anyio.to_thread.run_sync(generate, b.model, second)
    a.release()
    b.release()

    follow_up = encode("You are a lawyer. Say hi and then bye")
    lease = await loader.acquire(spec, prompt_ids=follow_up)
    assert lease.load_info.slot == 1  # the lawyer's slot, not the least recently used one
    assert lease.load_info.reused_tokens == len(second) > 0
    outcome = await anyio.to_thread.run_sync(lambda: lease.model.generate(
        follow_up, GREEDY, on_event=lambda e: None, should_stop=lambda: False))
    # The slot evaluated only what follows the prefix it held.
    assert outcome.prefilled == len(follow_up) - lease.load_info.reused_tokens
    lease.release()
    assert loader.stats.slots_added == 1  # two slots were enough: the third was never loaded
    await loader.aclose()


async def test_a_freed_slot_goes_to_the_waiting_request_of_lowest_priority_number(
    tiny_models: dict[str, Path], tmp_path: Path,
) -> None:
    spec = Registry.from_dict(one_model(tiny_models["small"], parallel=1)).get("a")
    loader = ModelLoader(tmp_path / "cache", threads=1,
                         config=LoaderConfig(predictive_preload=False))
    held = await loader.acquire(spec)
    served: list[str] = []

    async def wait(name: str, priority: int) -> None:
        lease = await loader.acquire(spec, priority=priority)
        served.append(name)
        assert lease.load_info.slot_wait_ms > 0
        lease.release()

    async with anyio.create_task_group() as tg:
        for queued, (name, priority) in enumerate(
                (("late-low", 5), ("first-normal", 1), ("urgent", 0)), start=1):
            tg.start_soon(wait, name, priority)
            while loader.slot_stats()[0].queued < queued:  # noqa: ASYNC110
                await anyio.sleep(0.001)
        held.release()
    assert served == ["urgent", "first-normal", "late-low"]
    assert loader.stats.slot_waits == 3
    await loader.aclose()


async def test_a_cancelled_queued_request_leaves_the_queue_and_the_next_one_is_served(
    make_engine: MakeEngine, tiny_models: dict[str, Path], tmp_path: Path,
) -> None:
    engine = make_engine(one_model(tiny_models["small"], parallel=1), caches=False)
    async with engine:
        await engine.infer("warm up", max_tokens=1)
        stream = engine.stream("hold the only slot", max_tokens=200)
        async with stream:
            await anext(stream)  # the slot is taken, generating
            with anyio.CancelScope() as queued_scope:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(engine.infer, "I will give up")
                    while engine.stats().models[0].queued == 0:  # noqa: ASYNC110
                        await anyio.sleep(0.001)
                    (model,) = engine.stats().models
                    assert (model.slots, model.running, model.queued) == (1, 1, 1)
                    queued_scope.cancel()
            assert engine.stats().models[0].queued == 0  # it left the queue
        after = await engine.infer("next", max_tokens=2)
        assert after.ok and after.slot == 0
        assert engine.stats().models[0].running == 0
    states = [(r["result"]["state"], r["result"]["error_reason"])
              for r in read_trace_lines(tmp_path / "traces" / "test.jsonl")]
    assert states == [("success", None), ("error", "cancelled"), ("error", "cancelled"),
                      ("success", None)]


async def test_a_sessions_second_turn_evaluates_only_its_new_tokens(
    make_engine: MakeEngine, tiny_models: dict[str, Path], tmp_path: Path,
) -> None:
    engine = make_engine(one_model(tiny_models["small"], context_length=512), caches=False)
    async with engine:
        session = engine.session()
        assert isinstance(session, Session)
        first = await session.infer("hello there, how are you", max_tokens=4)
        second = await session.infer("and what about tomorrow", max_tokens=4)
    assert [m.role for m in session.messages] == ["user", "assistant", "user", "assistant"]
    assert first.session_id == second.session_id == session.id
    assert first.prefilled_tokens == first.tokens.input  # a cold slot evaluates everything
    # Turn 2 re-sends turn 1: the slot already held it and evaluates only the rest.
    assert second.slot == first.slot
    assert second.reused_prefix_tokens is not None
    assert second.reused_prefix_tokens >= first.tokens.input
    assert second.prefilled_tokens == second.tokens.input - second.reused_prefix_tokens
    records = read_trace_lines(tmp_path / "traces" / "test.jsonl")
    assert [r["request"]["session_id"] for r in records] == [session.id] * 2
    assert records[1]["result"]["reused_prefix_tokens"] == second.reused_prefix_tokens


async def test_history_beyond_the_context_is_trimmed_oldest_turns_first(
    make_engine: MakeEngine, tiny_models: dict[str, Path], tmp_path: Path,
) -> None:
    engine = make_engine(one_model(tiny_models["small"], context_length=128), caches=False)
    async with engine:
        session = engine.session(system="Be brief.")
        results = [await session.infer(f"turn {i}: " + "words " * 12, max_tokens=4)
                   for i in range(6)]
    assert all(r.ok for r in results)
    assert len(session.messages) == 13  # the session keeps everything
    # Each prompt leaves room for the answer (max_tokens 4 of the 128-token context).
    assert all(r.tokens.input <= 128 - 4 for r in results)
    trimmed = [next(p for p in r["phases"] if p["state"] == "loading_agent")["attributes"]
               .get("orion.session.trimmed_messages", 0)
               for r in read_trace_lines(tmp_path / "traces" / "test.jsonl")]
    assert trimmed[0] == 0 and trimmed[-1] > 0
    assert trimmed == sorted(trimmed)  # the longer the history, the more is dropped


async def test_a_hung_generation_is_abandoned_as_stalled_and_its_slot_quarantined(
    make_engine: MakeEngine, tiny_models: dict[str, Path], tmp_path: Path,
) -> None:
    doc = {"version": 1, "default_agent": "hangs", "agents": [
        agent("hangs", tiny_models["medium"], fallback="backup", parallel=1, stall_s=0.2),
        agent("backup", tiny_models["small"])]}
    load = faulty_loader(1.0, ("hang",), only=["medium"])
    before = set(threading.enumerate())
    engine = make_engine(doc, load_model=load, caches=False)
    async with engine:
        # Two at once on a one-slot agent: the second queues behind the hang, then moves on.
        results = []

        async def one(text: str) -> None:
            results.append(await engine.infer(text, agent="hangs"))

        async with anyio.create_task_group() as tg:
            tg.start_soon(one, "first")
            tg.start_soon(one, "second")
        stats = {m.model.split(":")[0]: m for m in engine.stats().models}
        assert engine.loader.stats.quarantined == 2
        assert stats["tiny-medium"].slots == 0  # both quarantined, replaced on demand
    assert [r.agent for r in results] == ["backup", "backup"]
    assert all(r.ok and r.fallback and r.finish_reason == "length" and r.tokens.output == 8
               for r in results)  # the backup generated in full: the stall stopped no one else
    assert load.plan.injected["hang"] == 2
    records = read_trace_lines(tmp_path / "traces" / "test.jsonl")
    for record in records:
        (span,) = [s for s in record["phases"] if s["state"] == "inferencing"][:1]
        assert span["attributes"]["orion.inference.failure"] == "stalled"
        assert "stalled: no token for" in span["attributes"]["orion.inference_error"]
    await assert_no_thread_leaked(before)


async def test_a_hung_stream_falls_back_before_any_text_and_replays_as_stalled(
    make_engine: MakeEngine, tiny_models: dict[str, Path], tmp_path: Path,
) -> None:
    doc = {"version": 1, "default_agent": "hangs", "agents": [
        agent("hangs", tiny_models["medium"], fallback="backup", stall_s=0.2),
        agent("backup", tiny_models["small"])]}
    engine = make_engine(doc, load_model=faulty_loader(1.0, ("hang",), only=["medium"]),
                         caches=False)
    async with engine:
        stream = engine.stream("hello", agent="hangs", max_tokens=3)
        texts = [text async for text in stream]
    assert stream.result.ok and stream.result.agent == "backup"
    assert "".join(texts) == stream.result.text
    (record,) = read_trace_lines(tmp_path / "traces" / "test.jsonl")
    report = await assert_replays(record, registry=engine.registry)
    assert report.replayed is not None
    (failed,) = [p for p in report.replayed["phases"] if p["state"] == "inferencing"][:1]
    assert failed["attributes"]["orion.inference.failure"] == "stalled"


async def test_the_slot_figures_replay_as_recorded(make_engine: MakeEngine,
                                                   tiny_models: dict[str, Path],
                                                   tmp_path: Path) -> None:
    engine = make_engine(one_model(tiny_models["small"]), caches=False)
    async with engine:
        session = engine.session()
        await session.infer("hello", max_tokens=3)
        turn = await session.infer("again", max_tokens=3)
    record = read_trace_lines(tmp_path / "traces" / "test.jsonl")[-1]
    (loading,) = [p for p in record["phases"] if p["state"] == "loading_agent"]
    assert loading["attributes"]["orion.slot.reused_tokens"] == turn.reused_prefix_tokens > 0
    report = await assert_replays(record, registry=engine.registry)
    assert report.replayed is not None
    replayed = report.replayed["result"]
    for name in ("slot", "reused_prefix_tokens", "slot_wait_ms", "session_id"):
        assert replayed[name] == record["result"][name]


@pytest.mark.slow
async def test_a_session_turn_after_an_answer_evaluates_only_its_own_text(
        tmp_path: Path) -> None:
    # The template's tokens between an answer and the next question (and the answer's last
    # token, when max_tokens cut it) are evaluated on the session's slot once the answer
    # ended: turn N evaluates what turn 1 does, its own text.
    async with Engine(trace_path=tmp_path / "t.jsonl", embeddings=False,
                      caches=False) as engine:
        session = engine.session(agent="conversation")
        first = await session.infer("What is the capital of France?", temperature=0,
                                    max_tokens=16)
        assert first.finish_reason in ("stop", "length")
        second = await session.infer("And of Italy?", temperature=0, max_tokens=8)
        tokenizer = engine.registry.get("conversation")
        own = "And of Italy?<|im_end|>\n<|im_start|>assistant\n"
        expected = len((await engine.loader.prepare(tokenizer)).tokenizer.encode(own))
    assert second.prefilled_tokens == expected
