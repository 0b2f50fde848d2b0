"""The request machine end to end, through the public API, on tiny real models."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from orion_fsm import ConfigurationError, Engine, Message, OrionError, RequestFailed, Result
from orion_fsm.services.observability._tracefile import TRACE_VERSION
from tests.conftest import agent, assert_no_thread_leaked, read_trace_lines

pytestmark = pytest.mark.anyio

MakeEngine = Callable[..., Engine]
HAPPY_PATH = ["validating", "routing", "loading_agent", "inferencing"]


def states(result: Result) -> list[str]:
    return [p.state for p in result.phases]


async def test_infer_walks_the_happy_path_and_reports_usage(make_engine: MakeEngine) -> None:
    async with make_engine() as engine:
        result = await engine.infer("hello there", max_tokens=6)
    assert result.state == "success"
    assert states(result) == HAPPY_PATH
    assert result.agent == "conversation" and not result.fallback
    assert result.tokens.output == len(result.token_ids) > 0
    assert result.tokens.input > 10  # the chat template and system prompt are in the prompt
    assert result.ttft_ms is None or 0 < result.ttft_ms <= result.total_ms
    assert result.finish_reason in ("length", "stop")
    assert len(result.trace_id) == 32


async def test_greedy_generation_is_deterministic(make_engine: MakeEngine) -> None:
    async with make_engine() as engine:
        first = await engine.infer("hello", temperature=0, max_tokens=8, cache=False)
        second = await engine.infer("hello", temperature=0, max_tokens=8, cache=False)
    assert first.token_ids == second.token_ids
    assert first.text == second.text


async def test_max_tokens_bounds_the_output(make_engine: MakeEngine) -> None:
    async with make_engine() as engine:
        result = await engine.infer("hello", max_tokens=3)
    assert result.tokens.output <= 3


async def test_stream_yields_the_same_text_as_the_result(make_engine: MakeEngine) -> None:
    async with make_engine() as engine:
        stream = engine.stream("hello", max_tokens=8)
        chunks = [chunk async for chunk in stream]
        result = stream.result
    assert "".join(chunks) == result.text
    assert result.state == "success"


async def test_a_stream_interval_groups_the_chunks_not_the_text(
        make_engine: MakeEngine) -> None:
    chunks: dict[float, list[str]] = {}
    for interval_ms in (0.0, 150.0):
        async with make_engine(stream_interval_ms=interval_ms) as engine:
            expected = await engine.infer("hello", agent="long", max_tokens=64, cache=False)
            stream = engine.stream("hello", agent="long", max_tokens=64, cache=False)
            chunks[interval_ms] = [chunk async for chunk in stream]
        assert "".join(chunks[interval_ms]) == stream.result.text == expected.text
    # What the tiny model made within 150 ms comes as one chunk.
    assert len(chunks[150.0]) < len(chunks[0.0])


def test_a_negative_stream_interval_is_refused(make_engine: MakeEngine) -> None:
    with pytest.raises(ConfigurationError, match="stream_interval_ms"):
        make_engine(stream_interval_ms=-1)


async def test_explicit_agent_wins_over_rules(make_engine: MakeEngine) -> None:
    async with make_engine() as engine:
        routed = await engine.infer("please write a python function")
        forced = await engine.infer("please write a python function", agent="conversation")
    assert routed.agent == "code" and routed.routing["source"] == "rules"
    assert forced.agent == "conversation" and forced.routing["source"] == "explicit"


@pytest.mark.parametrize(
    ("kwargs", "field_words"),
    [
        ({"prompt": ""}, "empty"),
        ({"prompt": "   \n\t"}, "whitespace"),
        ({"prompt": [Message("wizard", "hi")]}, "role"),
        ({"prompt": [{"role": "user"}]}, "text"),
        ({"prompt": "hi", "temperature": -1.0}, "temperature"),
        ({"prompt": "hi", "temperature": float("nan")}, "temperature"),
        ({"prompt": "hi", "max_tokens": 0}, "max_tokens"),
        ({"prompt": "hi", "top_p": 0.0}, "top_p"),
        ({"prompt": "hi", "top_k": 2.5}, "top_k"),
        ({"prompt": "hi", "stop": [""]}, "stop"),
        ({"prompt": "hi", "agent": "nobody"}, "unknown agent"),
        ({"prompt": "word " * 400, "agent": "short"}, "context"),
    ],
)
async def test_bad_requests_end_in_error_without_touching_a_model(
    make_engine: MakeEngine, kwargs: dict[str, Any], field_words: str
) -> None:
    kwargs = dict(kwargs)
    prompt = kwargs.pop("prompt")
    async with make_engine() as engine:
        with pytest.raises(RequestFailed) as info:
            await engine.infer(prompt, **kwargs)
        assert engine.loader.loaded() == []
    failure = info.value
    assert failure.reason == "invalid"
    assert field_words in failure.message
    assert isinstance(failure.result, Result) and failure.result.state == "error"
    assert "inferencing" not in states(failure.result)


async def test_load_failure_falls_back_to_the_next_agent(make_engine: MakeEngine) -> None:
    async with make_engine() as engine:
        result = await engine.infer("hello", agent="broken")
    assert result.state == "success"
    assert result.fallback and result.requested_agent == "broken"
    assert result.agent == "conversation"
    assert result.agents_tried == ("broken", "conversation")
    assert states(result) == ["validating", "routing", "loading_agent", "fallback",
                              "loading_agent", "inferencing"]


async def test_exhausted_fallback_chain_ends_in_error(
    make_engine: MakeEngine, tmp_path: Path
) -> None:
    doc = {"version": 1, "default_agent": "a", "agents": [
        agent("a", tmp_path / "nope-a.gguf", fallback="b"),
        agent("b", tmp_path / "nope-b.gguf"),
    ]}
    async with make_engine(doc) as engine:
        with pytest.raises(RequestFailed) as info:
            await engine.infer("hello")
    assert info.value.reason == "exhausted"
    assert "nope-a.gguf" in info.value.message and "nope-b.gguf" in info.value.message
    result = info.value.result
    assert isinstance(result, Result)
    assert states(result) == ["validating", "routing", "loading_agent", "fallback",
                              "loading_agent", "fallback"]


async def test_breaking_out_of_a_stream_cancels_the_request(
    make_engine: MakeEngine, tmp_path: Path
) -> None:
    async with make_engine() as engine:
        stream = engine.stream("hello", max_tokens=200)
        async with stream:
            async for _ in stream:
                break
        # The model is free again: the next request is served.
        after = await engine.infer("hello", max_tokens=2)
    assert after.state == "success"
    records = read_trace_lines(tmp_path / "traces" / "test.jsonl")
    assert records[0]["result"]["state"] == "error"
    assert records[0]["result"]["error_reason"] == "cancelled"
    assert records[0]["transitions"][-1]["event"] == "abort"


async def test_cancelling_the_caller_ends_the_request_in_error(
    make_engine: MakeEngine, tmp_path: Path
) -> None:
    async with make_engine() as engine:
        await engine.infer("hello", agent="long", max_tokens=1)  # load before the clock runs
        # 0.1 s: some tokens even on a loaded machine (0.02 s gave none there), far from 4000.
        with anyio.move_on_after(0.1):
            await engine.infer("hello", agent="long", max_tokens=4000)
        after = await engine.infer("hello", max_tokens=2)
    assert after.state == "success"
    records = read_trace_lines(tmp_path / "traces" / "test.jsonl")
    assert [r["result"]["state"] for r in records] == ["success", "error", "success"]
    cancelled = records[1]["result"]
    assert cancelled["error_reason"] == "cancelled"
    assert 0 < cancelled["tokens"]["output"] < 4000  # generation stopped early


async def test_hundreds_of_concurrent_requests_all_reach_a_final_state(
    make_engine: MakeEngine, tmp_path: Path
) -> None:
    outcomes: list[str] = []

    async def one(i: int) -> None:
        kwargs: dict[str, Any] = {"max_tokens": 2}
        if i % 10 == 0:
            kwargs["temperature"] = -1  # invalid
        if i % 10 == 1:
            kwargs["agent"] = "broken"  # falls back
        try:
            outcomes.append((await engine.infer(f"hello {i}", **kwargs)).state)
        except RequestFailed as exc:
            assert isinstance(exc.result, Result)
            outcomes.append(exc.result.state)

    async with make_engine() as engine, anyio.create_task_group() as tg:
        for i in range(200):
            tg.start_soon(one, i)
    assert len(outcomes) == 200
    assert outcomes.count("error") == 20 and outcomes.count("success") == 180
    assert len(read_trace_lines(tmp_path / "traces" / "test.jsonl")) == 200


async def test_every_phase_is_a_child_span_of_the_request_span(
    make_engine: MakeEngine, spans: tuple[Any, InMemorySpanExporter]
) -> None:
    async with make_engine() as engine:
        result = await engine.infer("hello", max_tokens=4)
    finished = spans[1].get_finished_spans()
    root = next(s for s in finished if s.name == "orion.request")
    children = [s for s in finished if s.parent is not None]
    assert [s.name for s in children] == HAPPY_PATH
    assert all(s.parent.span_id == root.context.span_id for s in children)  # type: ignore[union-attr]
    assert format(root.context.trace_id, "032x") == result.trace_id
    inference = next(s for s in children if s.name == "inferencing")
    attrs = dict(inference.attributes or {})
    assert attrs["gen_ai.request.model"] == "conversation"
    assert attrs["gen_ai.usage.input_tokens"] == result.tokens.input
    assert attrs["gen_ai.usage.output_tokens"] == result.tokens.output
    assert "gen_ai.server.time_to_first_token" in attrs


async def test_each_request_appends_a_versioned_trace_line(
    make_engine: MakeEngine, tmp_path: Path, registry_doc: dict[str, Any]
) -> None:
    async with make_engine() as engine:
        result = await engine.infer("hello", max_tokens=3)
    (record,) = read_trace_lines(tmp_path / "traces" / "test.jsonl")
    assert record["format"] == "orion-fsm.trace" and record["version"] == TRACE_VERSION
    assert record["request_id"] == result.request_id
    assert record["registry_digest"] == engine.registry.digest
    assert len(record["model"]["sha256"]) == 64
    assert [(t["source"], t["target"]) for t in record["transitions"]] == [
        ("idle", "validating"), ("validating", "routing"), ("routing", "loading_agent"),
        ("loading_agent", "inferencing"), ("inferencing", "success")]
    assert record["result"]["token_ids"] == list(result.token_ids)
    assert [s["name"] for s in record["spans"]] == ["orion.request", *HAPPY_PATH]


async def test_engine_refuses_requests_outside_its_block(make_engine: MakeEngine) -> None:
    engine = make_engine()
    with pytest.raises(OrionError, match="async with"):
        await engine.infer("hello")


@pytest.mark.slow
async def test_default_model_answers_a_real_question(tmp_path: Path) -> None:
    async with Engine(trace_path=tmp_path / "t.jsonl", embeddings=False) as engine:
        result = await engine.infer("What is the capital of France?", agent="conversation",
                                    temperature=0, max_tokens=16)
    assert "Paris" in result.text


async def test_an_unusable_trace_path_fails_at_start_and_leaks_nothing(
    make_engine: MakeEngine, tmp_path: Path
) -> None:
    (tmp_path / "file").write_text("a file where a directory should be")
    engine = make_engine(trace_path=tmp_path / "file" / "t.jsonl")
    threads_before = set(threading.enumerate())
    tasks_before = {task.id for task in anyio.get_running_tasks()}
    with pytest.raises(OrionError, match="trace directory"):
        async with engine:
            pass
    assert {task.id for task in anyio.get_running_tasks()} == tasks_before
    await assert_no_thread_leaked(threads_before)
    assert engine.loader.loaded() == [] and engine.loader.stats.loads == 0
    assert all(b["state"] == "closed" and b["consecutive_failures"] == 0
               and b["last_transition"] is None for b in engine.breakers.snapshot().values())
    assert (tmp_path / "file").read_text() == "a file where a directory should be"

    # Nothing was left held: an engine on the same cache folder, given a usable trace path,
    # serves at once, writes its trace line, and leaves the model's slot free.
    fixed = make_engine(trace_path=tmp_path / "traces" / "fixed.jsonl")
    async with fixed:
        result = await fixed.infer("hello", agent="conversation", max_tokens=2, cache=False)
        assert [s.running for s in fixed.stats().models] == [0]
        lease = await fixed.loader.acquire(fixed.registry.get("conversation"))
        assert lease.load_info.slot_wait_ms == 0  # the slot was free: no wait
        lease.release()
    assert result.state == "success"
    (line,) = read_trace_lines(tmp_path / "traces" / "fixed.jsonl")
    assert line["request_id"] == result.request_id
    assert fixed.breakers.breaker("conversation").last_transition is None


async def test_cache_memory_and_breaker_figures_are_opentelemetry_metrics(
    make_engine: MakeEngine,
) -> None:
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    reader = InMemoryMetricReader()
    async with make_engine(meter_provider=MeterProvider(metric_readers=[reader])) as engine:
        await engine.infer("hello", max_tokens=2)
        await engine.infer("hello", max_tokens=2)  # an L1 hit
        await engine.memory.poll()
        data = reader.get_metrics_data()
    assert data is not None
    points = {m.name: m.data.data_points for rm in data.resource_metrics
              for sm in rm.scope_metrics for m in sm.metrics}
    assert {"orion.cache.hits", "orion.memory.process.rss", "orion.breaker.state"} <= set(points)
    l1_hits = sum(p.value for p in points["orion.cache.hits"]
                  if p.attributes.get("cache.level") == "l1")
    assert l1_hits >= 1


async def test_a_stream_abandoned_without_closing_still_frees_the_model(
    make_engine: MakeEngine, tmp_path: Path
) -> None:
    async with make_engine() as engine:
        async for _ in engine.stream("hello", agent="long", max_tokens=400, cache=False):
            break  # no aclose(), no `async with`: the event loop finalizes the generator
        after = await engine.infer("hello", agent="long", max_tokens=2, cache=False)
    assert after.state == "success"
    first = read_trace_lines(tmp_path / "traces" / "test.jsonl")[0]["result"]
    assert (first["state"], first["error_reason"]) == ("error", "cancelled")
    assert first["tokens"]["output"] < 400
