"""The L1 result cache and L3 prompt cache as the request machine uses them."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from orion_fsm import Engine
from tests.conftest import read_trace_lines

pytestmark = pytest.mark.anyio

MakeEngine = Callable[..., Engine]


async def test_an_l1_hit_ends_in_success_from_routing_without_loading_a_model(
    make_engine: MakeEngine, tmp_path: Path, spans: tuple[Any, InMemorySpanExporter]
) -> None:
    async with make_engine() as engine:
        first = await engine.infer("hello  ", temperature=0, max_tokens=6)
    spans[1].clear()
    # A new engine on the same cache directory: the disk tier answers, no model is loaded.
    async with make_engine() as engine:
        second = await engine.infer("hello", temperature=0, max_tokens=6)
        assert engine.loader.loaded() == []
        stats = engine.cache_stats()["l1"]
    assert first.cache is None and second.cache == "L1"
    assert second.text == first.text and second.token_ids == first.token_ids
    assert [p.state for p in second.phases] == ["validating", "routing"]
    assert stats["disk_hits"] == 1
    names = [s.name for s in spans[1].get_finished_spans()]
    assert "loading_agent" not in names and "inferencing" not in names
    routing = next(s for s in spans[1].get_finished_spans() if s.name == "routing")
    assert dict(routing.attributes or {})["cache.level"] == "L1"
    records = read_trace_lines(tmp_path / "traces" / "test.jsonl")
    assert records[-1]["cache"]["level"] == "L1"
    assert records[-1]["transitions"][-1]["event"] == "cache_hit"


async def test_sampled_requests_are_cached_only_when_the_caller_opts_in(
    make_engine: MakeEngine,
) -> None:
    async with make_engine() as engine:
        sampled = [await engine.infer("hi", temperature=0.8, max_tokens=4) for _ in range(2)]
        opted = [await engine.infer("hi", temperature=0.8, max_tokens=4, cache=True)
                 for _ in range(2)]
        seeded = [await engine.infer("hi", temperature=0.8, seed=5, max_tokens=4)
                  for _ in range(2)]
    assert [r.cache for r in sampled] == [None, None]
    assert [r.cache for r in opted] == [None, "L1"]
    assert [r.cache for r in seeded] == [None, "L1"]


async def test_cache_false_bypasses_the_result_cache(make_engine: MakeEngine) -> None:
    async with make_engine() as engine:
        await engine.infer("hello", temperature=0, max_tokens=3)
        again = await engine.infer("hello", temperature=0, max_tokens=3, cache=False)
    assert again.cache is None and "inferencing" in [p.state for p in again.phases]


async def test_a_streamed_l1_hit_yields_the_cached_text(make_engine: MakeEngine) -> None:
    async with make_engine() as engine:
        first = await engine.infer("hello", temperature=0, max_tokens=5)
        stream = engine.stream("hello", temperature=0, max_tokens=5)
        chunks = [c async for c in stream]
    assert stream.result.cache == "L1"
    assert "".join(chunks) == first.text


async def test_different_parameters_or_agents_do_not_share_an_entry(
    make_engine: MakeEngine,
) -> None:
    async with make_engine() as engine:
        await engine.infer("hello", temperature=0, max_tokens=3)
        other_length = await engine.infer("hello", temperature=0, max_tokens=4)
        other_agent = await engine.infer("hello", agent="code", temperature=0, max_tokens=3)
    assert other_length.cache is None and other_agent.cache is None


async def test_an_answer_served_by_a_fallback_agent_is_not_cached(
    make_engine: MakeEngine,
) -> None:
    async with make_engine() as engine:
        first = await engine.infer("hello", agent="broken", temperature=0, max_tokens=3)
        second = await engine.infer("hello", agent="broken", temperature=0, max_tokens=3)
    assert first.fallback and second.fallback and second.cache is None


async def test_concurrent_identical_requests_generate_once(make_engine: MakeEngine) -> None:
    import anyio

    results = []

    async def one() -> None:
        results.append(await engine.infer("same question", temperature=0, max_tokens=6))

    async with make_engine() as engine, anyio.create_task_group() as tg:
        for _ in range(20):
            tg.start_soon(one)
    generated = [r for r in results if r.cache is None]
    assert len(generated) == 1 and len(results) == 20
    assert {r.text for r in results} == {generated[0].text}


async def test_an_l1_entry_of_the_wrong_shape_is_a_miss_and_the_answer_is_made_again(
    make_engine: MakeEngine, tmp_path: Path
) -> None:
    async with make_engine() as engine:
        first = await engine.infer("hello", temperature=0, max_tokens=4)
    key = read_trace_lines(tmp_path / "traces" / "test.jsonl")[-1]["cache"]["l1_key"]
    async with make_engine() as engine:
        assert engine.caches is not None
        await engine.caches.l1.set(key, {"text": 5, "token_ids": "not ids"})  # both tiers
        again = await engine.infer("hello", temperature=0, max_tokens=4)
        healed = await engine.infer("hello", temperature=0, max_tokens=4)
    assert again.cache is None and again.text == first.text  # generated, not an error
    assert healed.cache == "L1"  # the good answer replaced the bad entry
