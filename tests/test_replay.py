"""Replay of recorded traces: the shipped traces replay without models, runs recorded on tiny
models replay on the same path, and a changed statechart, threshold, registry or model diverges.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest

from orion_fsm import BreakerConfig, Engine, RequestFailed
from orion_fsm._resources import data_file
from orion_fsm.backends import LoadedModel
from orion_fsm.services.models._loader import ModelLoader
from orion_fsm.services.models._registry import ModelSource, Registry
from orion_fsm.testing import make_tiny_llama_gguf
from orion_fsm.testing.faults import faulty_loader
from orion_fsm.testing.replay import assert_replays, replay, replay_cases
from tests.conftest import agent, read_trace_lines

pytestmark = pytest.mark.anyio

MakeEngine = Callable[..., Engine]
TRACES = Path(__file__).parents[1] / "traces"
SHIPPED = [TRACES / f"{name}.jsonl" for name in ("success", "cache-hit", "fallback", "invalid")]


@pytest.fixture
def no_model_files(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to find or load a model file fails loudly."""

    def refuse(*args: object, **kwargs: object) -> Any:
        raise AssertionError("replay touched a model file")

    monkeypatch.setattr(ModelSource, "locate", refuse)
    monkeypatch.setattr(LoadedModel, "load", refuse)


def trace_of(tmp_path: Path) -> list[dict[str, Any]]:
    from orion_fsm.services.observability._tracefile import upgrade_record

    return [upgrade_record(r) for r in read_trace_lines(tmp_path / "traces" / "test.jsonl")]


# --- the shipped traces ---------------------------------------------------------------------


def test_the_shipped_traces_cover_success_cache_hit_fallback_and_bad_input() -> None:
    records = {path.stem: [case.values[0] for case in replay_cases(path)] for path in SHIPPED}
    assert records["success"][0]["result"]["state"] == "success"
    assert records["cache-hit"][-1]["result"]["cache"] == "L1"
    fallback = records["fallback"][0]["result"]
    assert fallback["state"] == "success" and fallback["fallback"] is True
    assert {r["result"]["error_reason"] for r in records["invalid"]} == {"invalid"}


@pytest.mark.parametrize("record", replay_cases(*SHIPPED))
async def test_shipped_traces_replay_without_any_model_file(
    record: dict[str, Any], tmp_path: Path, no_model_files: None,
) -> None:
    report = await assert_replays(record, cache_dir=tmp_path)  # an empty model cache
    assert report.mode == "recorded" and report.warnings == ()
    assert report.replayed is not None
    assert report.replayed["result"]["token_ids"] == record["result"]["token_ids"]


async def test_a_changed_routing_threshold_diverges_at_routing(tmp_path: Path) -> None:
    (record,) = [case.values[0] for case in replay_cases(TRACES / "success.jsonl")]
    assert record["result"]["routing"]["source"] == "embedding"
    report = await replay(record, thresholds={"code": 0.99}, cache_dir=tmp_path)
    assert not report.ok
    assert str(report.first) == (
        "at routing: orion.agent: recorded 'code', replayed 'conversation'")


async def test_a_changed_statechart_diverges_with_both_transitions_named(
    tmp_path: Path,
) -> None:
    chart = tmp_path / "request.scxml"
    text = data_file("machines", "request.scxml").read_text(encoding="utf-8")
    # The regression: a failed inference no longer falls back, it ends the request.
    chart.write_text(re.sub(r'(event="inference_failed[^"]*") target="fallback"',
                            r'\1 target="error"', text), encoding="utf-8")
    (record,) = [case.values[0] for case in replay_cases(TRACES / "fallback.jsonl")]
    report = await replay(record, machine=chart, cache_dir=tmp_path)
    assert str(report.first) == (
        "at inferencing: transition 4: recorded inferencing --inference_failed--> fallback, "
        "replayed inferencing --inference_failed--> error")
    assert report.summary().startswith(f"FAIL {record['request_id']} at inferencing")


# --- recorded on tiny models, then replayed -------------------------------------------------


async def test_a_success_replays_and_its_text_is_decoded_again(make_engine: MakeEngine,
                                                               tmp_path: Path) -> None:
    async with make_engine() as engine:
        await engine.infer("hello there", max_tokens=6)
    (record,) = trace_of(tmp_path)
    report = await assert_replays(record, registry=engine.registry)
    assert report.skipped == ()  # the tiny model's tokenizer is beside it: text is compared
    assert report.replayed is not None
    assert report.replayed["result"]["text"] == record["result"]["text"] != ""
    assert report.summary().startswith(f"PASS {record['request_id']} validating → routing")


async def test_streamed_and_cache_served_requests_replay(make_engine: MakeEngine,
                                                         tmp_path: Path) -> None:
    async with make_engine() as engine:
        async for _ in engine.stream("bonjour", temperature=0, max_tokens=5):
            pass
        hit = await engine.infer("bonjour", temperature=0, max_tokens=5)
    assert hit.cache == "L1"
    for record in trace_of(tmp_path):
        await assert_replays(record, registry=engine.registry)


async def test_a_load_failure_replays_through_the_fallback(make_engine: MakeEngine,
                                                           tmp_path: Path) -> None:
    async with make_engine() as engine:
        result = await engine.infer("hi", agent="broken", max_tokens=4)
    assert result.fallback
    (record,) = trace_of(tmp_path)
    await assert_replays(record, registry=engine.registry)


async def test_inference_failures_replay_as_recorded(make_engine: MakeEngine,
                                                     tmp_path: Path) -> None:
    def failing(seed: int, rate: float) -> ModelLoader:
        return ModelLoader(tmp_path / "cache", threads=1,
                           load_model=faulty_loader(rate, ("raise",), seed=seed))

    # seed 4: the first generation fails, its fallback serves; rate 1: every agent fails.
    for loader in (failing(4, 0.5), failing(0, 1.0)):
        async with make_engine(loader=loader) as engine:
            try:
                await engine.infer("def f(): pass  # python", max_tokens=4)
            except RequestFailed as exc:
                assert exc.reason == "exhausted"
    records = trace_of(tmp_path)
    assert [r["result"]["state"] for r in records] == ["success", "error"]
    for record in records:
        await assert_replays(record, registry=engine.registry)


async def test_an_open_breaker_replays_as_the_fallback_it_caused(make_engine: MakeEngine,
                                                                 tmp_path: Path) -> None:
    async with make_engine(breakers=BreakerConfig(failure_threshold=1)) as engine:
        for _ in range(2):  # the first failure opens the breaker the second request meets
            assert (await engine.infer("hi", agent="broken", max_tokens=4)).fallback
    first, second = trace_of(tmp_path)
    assert [t["event"] for t in second["transitions"]][3] == "breaker_open"
    for record in (first, second):
        await assert_replays(record, registry=engine.registry)


async def test_refused_requests_replay(make_engine: MakeEngine, tmp_path: Path) -> None:
    async with make_engine() as engine:
        for prompt, options in (("hi", {"temperature": 9.0}), ("", {}),
                                ("word " * 80, {"agent": "short"})):
            with pytest.raises(RequestFailed):
                await engine.infer(prompt, **options)
    records = trace_of(tmp_path)
    assert [t["event"] for t in records[-1]["transitions"]][-1] == "invalid"
    for record in records:
        await assert_replays(record, registry=engine.registry)


async def test_a_prompt_the_trace_writer_redacted_replays_with_a_warning(
    make_engine: MakeEngine, tmp_path: Path,
) -> None:
    async with make_engine() as engine:
        await engine.infer("hello, mail the answer to alice@example.com", max_tokens=4)
    (record,) = trace_of(tmp_path)
    assert "alice@example.com" not in str(record["request"])
    report = await assert_replays(record, registry=engine.registry)
    assert any("the recorded prompt was redacted" in w for w in report.warnings)


@pytest.mark.parametrize("streaming", [None, True])
async def test_a_generation_the_caller_stopped_replays_to_the_same_token(
    make_engine: MakeEngine, tmp_path: Path, streaming: bool | None,
) -> None:
    async with make_engine() as engine, engine.stream("hello", max_tokens=40) as stream:
        async for _ in stream:
            break  # the caller leaves after the first chunk
    (record,) = trace_of(tmp_path)
    assert record["result"]["error_reason"] == "cancelled"
    assert record["transitions"][-1]["source"] == "inferencing"
    # A version 2 writer records that it streamed; without it replay calls infer().
    record["streaming"] = streaming
    report = await assert_replays(record, registry=engine.registry)
    assert report.replayed is not None
    assert report.replayed["result"]["token_ids"] == record["result"]["token_ids"] != []


async def test_a_changed_rule_registry_diverges_and_says_the_registry_differs(
    make_engine: MakeEngine, tmp_path: Path, registry_doc: dict[str, Any],
) -> None:
    async with make_engine() as engine:
        await engine.infer("please write a python function", max_tokens=4)
    (record,) = trace_of(tmp_path)
    assert record["result"]["agent"] == "code"
    registry_doc["agents"][1]["routing"]["keywords"] = []
    report = await replay(record, registry=Registry.from_dict(registry_doc))
    assert str(report.first) == "at routing: orion.agent: recorded 'code', replayed 'conversation'"
    assert any("replayed with the given registry" in w for w in report.warnings)


async def test_a_smaller_default_max_tokens_diverges_at_the_generated_tokens(
    make_engine: MakeEngine, tmp_path: Path, registry_doc: dict[str, Any],
) -> None:
    async with make_engine() as engine:
        await engine.infer("hello", temperature=0)  # the agent's default: 8 tokens
    (record,) = trace_of(tmp_path)
    assert len(record["result"]["token_ids"]) == 8
    registry_doc["agents"][0]["generation"]["max_tokens"] = 5
    report = await replay(record, registry=Registry.from_dict(registry_doc))
    fields = [d.field for d in report.divergences]
    assert "result.token_ids: length" in fields
    tokens = next(d for d in report.divergences if d.field == "result.token_ids: length")
    assert (tokens.state, tokens.recorded, tokens.replayed) == ("inferencing", 8, 5)


async def test_assert_replays_fails_with_the_divergence_and_the_warnings(
    make_engine: MakeEngine, tmp_path: Path, registry_doc: dict[str, Any],
) -> None:
    async with make_engine() as engine:
        await engine.infer("please write a python function", max_tokens=4)
    (record,) = trace_of(tmp_path)
    registry_doc["agents"][1]["routing"]["keywords"] = []
    with pytest.raises(AssertionError, match=r"(?s)FAIL .* at routing: orion\.agent.*warning"):
        await assert_replays(record, registry=Registry.from_dict(registry_doc))


# --- live replay ----------------------------------------------------------------------------


@pytest.fixture
def own_model(tmp_path: Path, registry_doc: dict[str, Any]) -> Path:
    """A model file of this test's own, so that the test may change it."""
    path = make_tiny_llama_gguf(tmp_path / "own" / "model.gguf", n_layers=2, n_embd=32, seed=5)
    registry_doc["agents"][0] = agent("conversation", path,
                                      routing={"keywords": ["hello"], "patterns": [],
                                               "examples": []})
    return path


async def test_live_replay_regenerates_greedy_and_seeded_outputs_exactly(
    make_engine: MakeEngine, tmp_path: Path, own_model: Path,
) -> None:
    async with make_engine() as engine:
        await engine.infer("hello", temperature=0, max_tokens=8)
        await engine.infer("hello", temperature=0.9, top_k=40, seed=7, max_tokens=8)
    for record in trace_of(tmp_path):
        report = await assert_replays(record, registry=engine.registry, live=True,
                                      cache_dir=tmp_path / "cache")
        assert report.mode == "live" and report.skipped == ()


async def test_live_replay_reports_the_first_drifting_token_of_a_changed_model(
    make_engine: MakeEngine, tmp_path: Path, own_model: Path,
) -> None:
    async with make_engine() as engine:
        await engine.infer("hello", temperature=0, max_tokens=8)
    (record,) = trace_of(tmp_path)
    await anyio.sleep(0.01)  # a new modification time, as any rewrite of the file would have
    make_tiny_llama_gguf(own_model, n_layers=2, n_embd=32, seed=6)  # other weights
    report = await replay(record, registry=engine.registry, live=True,
                          cache_dir=tmp_path / "cache")
    assert report.first is not None and report.first.state == "inferencing"
    assert report.first.field.startswith("result.token_ids[")
    assert any("the model file changed since the recording" in w for w in report.warnings)
