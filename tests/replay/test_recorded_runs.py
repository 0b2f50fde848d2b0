"""Runs recorded on tiny models replay on the same path (success, stream, L1 hit, load and
inference failures, open breaker, refusals, redaction, a stopped caller); a changed registry
diverges, and `assert_replays` fails with the divergence and the warnings.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from orion_fsm import BreakerConfig, Engine, RequestFailed
from orion_fsm.services.models._loader import ModelLoader
from orion_fsm.services.models._registry import Registry
from orion_fsm.testing.faults import faulty_loader
from orion_fsm.testing.replay import assert_replays, replay

pytestmark = pytest.mark.anyio

MakeEngine = Callable[..., Engine]
Recorded = Callable[[], list[dict[str, Any]]]


async def test_a_success_replays_and_its_text_is_decoded_again(make_engine: MakeEngine,
                                                               recorded: Recorded) -> None:
    async with make_engine() as engine:
        await engine.infer("hello there", max_tokens=6)
    (record,) = recorded()
    report = await assert_replays(record, registry=engine.registry)
    assert report.skipped == ()  # the tiny model's tokenizer is beside it: text is compared
    assert report.replayed is not None
    assert report.replayed["result"]["text"] == record["result"]["text"] != ""
    assert report.summary().startswith(f"PASS {record['request_id']} validating → routing")


async def test_streamed_and_cache_served_requests_replay(make_engine: MakeEngine,
                                                         recorded: Recorded) -> None:
    async with make_engine() as engine:
        async for _ in engine.stream("bonjour", temperature=0, max_tokens=5):
            pass
        hit = await engine.infer("bonjour", temperature=0, max_tokens=5)
    assert hit.cache == "L1"
    for record in recorded():
        await assert_replays(record, registry=engine.registry)


async def test_a_load_failure_replays_through_the_fallback(make_engine: MakeEngine,
                                                           recorded: Recorded) -> None:
    async with make_engine() as engine:
        result = await engine.infer("hi", agent="broken", max_tokens=4)
    assert result.fallback
    (record,) = recorded()
    await assert_replays(record, registry=engine.registry)


async def test_inference_failures_replay_as_recorded(make_engine: MakeEngine,
                                                     tmp_path: Path, recorded: Recorded) -> None:
    def failing(seed: int, rate: float) -> ModelLoader:
        return ModelLoader(tmp_path / "cache", threads=1,
                           load_model=faulty_loader(rate, ("raise",), seed=seed))

    # seed 4: the first generation fails, its retry on the same agent serves; rate 1: every
    # agent fails, each after one retry.
    for loader in (failing(4, 0.5), failing(0, 1.0)):
        async with make_engine(loader=loader) as engine:
            try:
                await engine.infer("def f(): pass  # python", max_tokens=4, cache=False)
            except RequestFailed as exc:
                assert exc.reason == "exhausted"
    records = recorded()
    assert [r["result"]["state"] for r in records] == ["success", "error"]
    events = [[t["event"] for t in r["transitions"]] for r in records]
    assert events[0].count("retry_same") == 1 and "retry" not in events[0]
    assert events[1].count("retry_same") == 2 and events[1].count("retry") == 1
    for record in records:
        await assert_replays(record, registry=engine.registry)


async def test_an_open_breaker_replays_as_the_fallback_it_caused(make_engine: MakeEngine,
                                                                 recorded: Recorded) -> None:
    async with make_engine(breakers=BreakerConfig(window_size=1, minimum_calls=1)) as engine:
        for _ in range(2):  # the first failure opens the breaker the second request meets
            assert (await engine.infer("hi", agent="broken", max_tokens=4)).fallback
    first, second = recorded()
    assert [t["event"] for t in second["transitions"]][3] == "breaker_open"
    for record in (first, second):
        await assert_replays(record, registry=engine.registry)


async def test_refused_requests_replay(make_engine: MakeEngine, recorded: Recorded) -> None:
    async with make_engine() as engine:
        for prompt, options in (("hi", {"temperature": 9.0}), ("", {}),
                                ("word " * 80, {"agent": "short"})):
            with pytest.raises(RequestFailed):
                await engine.infer(prompt, **options)
    records = recorded()
    assert [t["event"] for t in records[-1]["transitions"]][-1] == "invalid"
    for record in records:
        await assert_replays(record, registry=engine.registry)


async def test_a_prompt_the_trace_writer_redacted_replays_with_a_warning(
    make_engine: MakeEngine, recorded: Recorded,
) -> None:
    async with make_engine() as engine:
        await engine.infer("hello, mail the answer to alice@example.com", max_tokens=4)
    (record,) = recorded()
    assert "alice@example.com" not in str(record["request"])
    report = await assert_replays(record, registry=engine.registry)
    assert any("the recorded prompt was redacted" in w for w in report.warnings)


@pytest.mark.parametrize("streaming", [None, True])
async def test_a_generation_the_caller_stopped_replays_to_the_same_token(
    make_engine: MakeEngine, recorded: Recorded, streaming: bool | None,
) -> None:
    async with make_engine() as engine, engine.stream("hello", max_tokens=40) as stream:
        async for _ in stream:
            break  # the caller leaves after the first chunk
    (record,) = recorded()
    assert record["result"]["error_reason"] == "cancelled"
    assert record["transitions"][-1]["source"] == "inferencing"
    # A version 2 writer records that it streamed; without it replay calls infer().
    record["streaming"] = streaming
    report = await assert_replays(record, registry=engine.registry)
    assert report.replayed is not None
    assert report.replayed["result"]["token_ids"] == record["result"]["token_ids"] != []


async def test_a_changed_rule_registry_diverges_and_says_the_registry_differs(
    make_engine: MakeEngine, recorded: Recorded, registry_doc: dict[str, Any],
) -> None:
    async with make_engine() as engine:
        await engine.infer("please write a python function", max_tokens=4)
    (record,) = recorded()
    assert record["result"]["agent"] == "code"
    registry_doc["agents"][1]["routing"]["keywords"] = []
    report = await replay(record, registry=Registry.from_dict(registry_doc))
    assert str(report.first) == "at routing: orion.agent: recorded 'code', replayed 'conversation'"
    assert any("replayed with the given registry" in w for w in report.warnings)


async def test_a_smaller_default_max_tokens_diverges_at_the_generated_tokens(
    make_engine: MakeEngine, recorded: Recorded, registry_doc: dict[str, Any],
) -> None:
    async with make_engine() as engine:
        await engine.infer("hello", temperature=0)  # the agent's default: 8 tokens
    (record,) = recorded()
    assert len(record["result"]["token_ids"]) == 8
    registry_doc["agents"][0]["generation"]["max_tokens"] = 5
    report = await replay(record, registry=Registry.from_dict(registry_doc))
    fields = [d.field for d in report.divergences]
    assert "result.token_ids: length" in fields
    tokens = next(d for d in report.divergences if d.field == "result.token_ids: length")
    assert (tokens.state, tokens.recorded, tokens.replayed) == ("inferencing", 8, 5)


async def test_assert_replays_fails_with_the_divergence_and_the_warnings(
    make_engine: MakeEngine, recorded: Recorded, registry_doc: dict[str, Any],
) -> None:
    async with make_engine() as engine:
        await engine.infer("please write a python function", max_tokens=4)
    (record,) = recorded()
    registry_doc["agents"][1]["routing"]["keywords"] = []
    with pytest.raises(AssertionError, match=r"(?s)FAIL .* at routing: orion\.agent.*warning"):
        await assert_replays(record, registry=Registry.from_dict(registry_doc))
