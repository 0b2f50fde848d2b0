"""The `retrieving` phase: a request naming a context store gets its best chunks in the
prompt (within the agent's context), citations in the Result, span and trace, and replays
from the trace without the store."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from orion_fsm import Engine, RequestFailed
from orion_fsm.services.observability import _attributes as attr
from orion_fsm.testing import make_tiny_llama_gguf
from orion_fsm.testing.replay import assert_replays
from tests.conftest import agent, read_trace_lines

pytestmark = pytest.mark.anyio

MakeEngine = Callable[..., Engine]

GUIDE = "\n\n".join([
    "Lighthouse manual\n=================",
    "Keepers\n-------\n\nThe keeper climbs the tower at dusk and lights the lamp.",
    "Fuel\n----\n\nThe lamp burns paraffin; a full tank lasts eleven hours.",
    *(f"Log {i}\n------\n\nEntry {i}: the sea rose {i * 7} cm by {word}."
      for i, word in enumerate(["dawn", "noon", "dusk", "night", "morning", "evening",
                                "midnight"])),
])


async def fill(engine: Engine) -> None:
    store = await engine.context("docs")
    await store.add(GUIDE, name="lighthouse.rst")


async def test_a_context_request_retrieves_cites_and_fits_the_prompt(
        make_engine: MakeEngine, tmp_path: Path,
        spans: tuple[TracerProvider, InMemorySpanExporter]) -> None:
    async with make_engine() as engine:
        await fill(engine)
        result = await engine.infer("How long does the paraffin tank last?", context="docs",
                                    agent="long", max_tokens=4)
    assert [p.state for p in result.phases][:4] == [
        "validating", "routing", "retrieving", "loading_agent"]
    assert result.citations and result.citations[0].document == "lighthouse.rst"
    assert result.citations[0].store == "docs"
    (record,) = read_trace_lines(tmp_path / "traces" / "test.jsonl")
    context = record["context"]
    assert context["store"] == "docs"
    assert "eleven hours" in context["retrieved"][0]["text"]
    assert context["used"] == [c.chunk_id for c in result.citations]
    assert record["result"]["citations"][0]["chunk_id"] == result.citations[0].chunk_id
    loading = next(s for s in spans[1].get_finished_spans()
                   if s.attributes and s.attributes.get(attr.CONTEXT_CHUNKS) is not None)
    chunk_ids = loading.attributes[attr.CONTEXT_CHUNKS]  # type: ignore[index]
    assert [int(c) for c in chunk_ids] == context["used"]  # type: ignore[union-attr]


async def test_chunks_fill_the_context_but_leave_room_for_the_answer(
        make_engine: MakeEngine, tmp_path: Path, registry_doc: dict[str, Any],
        tiny_models: dict[str, Path]) -> None:
    registry_doc["agents"].append(agent("mid", tiny_models["small"], context_length=400))
    async with make_engine(registry_doc) as engine:
        await fill(engine)
        # A 400-token context holds some of the retrieved chunks, not all.
        result = await engine.infer("log entry sea", context="docs", agent="mid",
                                    max_tokens=8)
    (record,) = read_trace_lines(tmp_path / "traces" / "test.jsonl")
    retrieved, used = record["context"]["retrieved"], record["context"]["used"]
    assert 0 < len(used) < len(retrieved)
    assert result.tokens.input + 8 <= 400  # the prompt as counted by the model's tokenizer


async def test_an_unknown_store_is_an_invalid_request(make_engine: MakeEngine) -> None:
    async with make_engine() as engine:
        with pytest.raises(RequestFailed, match="no context store named 'nope'") as caught:
            await engine.infer("hello", context="nope")
    assert caught.value.result is not None
    assert caught.value.result.error_reason == "invalid"
    assert [p.state for p in caught.value.result.phases][-1] == "retrieving"


async def test_a_context_request_replays_from_its_trace_without_the_store(
        make_engine: MakeEngine, tmp_path: Path) -> None:
    async with make_engine() as engine:
        await fill(engine)
        await engine.infer("Who lights the lamp?", context="docs", agent="long", max_tokens=4)
    shutil.rmtree(tmp_path / "cache" / "contexts")
    (record,) = read_trace_lines(tmp_path / "traces" / "test.jsonl")
    report = await assert_replays(record, registry=engine.registry)
    assert report.replayed is not None
    assert report.replayed["context"]["used"] == record["context"]["used"]
    assert report.replayed["prompt_token_ids"] == record["prompt_token_ids"]


async def test_context_top_k_bounds_the_chunks_retrieved_and_replays(
        make_engine: MakeEngine, tmp_path: Path) -> None:
    async with make_engine() as engine:
        await fill(engine)
        result = await engine.infer("log entry sea", context="docs", agent="long",
                                    max_tokens=4, context_top_k=2)
    (record,) = read_trace_lines(tmp_path / "traces" / "test.jsonl")
    assert record["request"]["context_top_k"] == 2
    assert len(record["context"]["retrieved"]) == 2
    assert len(result.citations) <= 2
    report = await assert_replays(record, registry=engine.registry)
    assert report.replayed is not None
    assert report.replayed["request"]["context_top_k"] == 2


@pytest.mark.parametrize(("options", "message"), [
    ({"context": "docs", "context_top_k": 0}, "context_top_k must be between 1 and 64, got 0"),
    ({"context": "docs", "context_top_k": "3"}, "context_top_k must be an integer, got str"),
    ({"context_top_k": 3}, "context_top_k counts the chunks of a context store"),
])
async def test_a_bad_context_top_k_is_refused_naming_it(
        make_engine: MakeEngine, options: dict[str, Any], message: str) -> None:
    async with make_engine() as engine:
        with pytest.raises(RequestFailed, match=message) as caught:
            await engine.infer("hello", agent="long", **options)
    assert caught.value.result is not None
    assert caught.value.result.error_reason == "invalid"
    assert [p.state for p in caught.value.result.phases][-1] == "validating"


async def test_a_reranking_engine_records_the_reranked_chunks_and_replays_them(
        make_engine: MakeEngine, tmp_path: Path,
        spans: tuple[TracerProvider, InMemorySpanExporter]) -> None:
    scorer = make_tiny_llama_gguf(tmp_path / "scorer.gguf", seed=11, llama_cpp_layout=True,
                                  tied_embeddings=False)
    async with make_engine(rerank=scorer) as engine:
        await fill(engine)
        result = await engine.infer("log entry sea", context="docs", agent="long",
                                    max_tokens=4, context_top_k=3)
        reranker = await engine.reranker()
    assert reranker is not None and reranker.model == scorer
    (record,) = read_trace_lines(tmp_path / "traces" / "test.jsonl")
    retrieved = record["context"]["retrieved"]
    assert len(retrieved) == 3  # the best 3 of the reranker's 12
    assert len({h["rerank_rank"] for h in retrieved}) == 3
    assert all(h["likelihood"] < 0 and "reranker #" in h["why"] for h in retrieved)
    assert [c.chunk_id for c in result.citations] == record["context"]["used"]
    (retrieving,) = [s for s in spans[1].get_finished_spans()
                     if s.attributes and attr.CONTEXT_RERANKED in s.attributes]
    assert retrieving.attributes[attr.CONTEXT_RERANKED] is True  # type: ignore[index]
    shutil.rmtree(tmp_path / "cache" / "contexts")
    report = await assert_replays(record, registry=engine.registry)  # no store, no scorer
    assert report.replayed is not None
    assert report.replayed["context"]["retrieved"] == retrieved
