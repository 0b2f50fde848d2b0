"""Fault injection against the real tiny model: raising, hanging, malformed output, refused
loads, broken model files, malformed registries and unwritable paths."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from orion_fsm import (
    ConfigurationError,
    Engine,
    InferenceError,
    ModelLoadError,
    OrionError,
    RegistryError,
    RequestFailed,
)
from orion_fsm.backends import GenerationEvent, LoadedModel, SamplingParams, ensure_converted
from orion_fsm.services.models._loader import ModelLoader
from orion_fsm.services.models._registry import Registry
from orion_fsm.services.resilience._admission import TimeoutPolicy
from orion_fsm.services.resilience._guardrails import Guardrails
from orion_fsm.testing.faults import (
    FaultPlan,
    FaultyLoader,
    FaultyModel,
    break_model_file,
    faulty_loader,
    occupy_path,
    write_broken_registry,
)
from tests.conftest import agent, read_trace_lines

PROMPT = "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"
GREEDY = SamplingParams(max_tokens=8, temperature=0)


@pytest.fixture
def tiny_path(tiny_models: dict[str, Path]) -> Path:
    return tiny_models["small"]


def load(loader: Callable[..., LoadedModel], path: Path) -> LoadedModel:
    return loader(path, path.parent / "tokenizer.json", context_length=128, threads=1)


@pytest.fixture
def real(tiny_path: Path) -> Iterator[LoadedModel]:
    with load(LoadedModel.load, tiny_path) as model:
        yield model


def faulty(tiny_path: Path, kind: Any, **kwargs: Any) -> FaultyModel:
    model = load(faulty_loader(1.0, (kind,), **kwargs), tiny_path)
    assert isinstance(model, FaultyModel)
    return model


def collect(model: LoadedModel, ids: list[int],
            should_stop: Callable[[], bool] = lambda: False) -> tuple[Any, list[GenerationEvent]]:
    events: list[GenerationEvent] = []
    outcome = model.generate(ids, GREEDY, on_event=events.append, should_stop=should_stop)
    return outcome, events


def test_no_fault_drawn_means_the_real_model_answers(tiny_path: Path, real: LoadedModel) -> None:
    ids = real.tokenizer.encode(PROMPT)
    with load(faulty_loader(0.0), tiny_path) as model:
        assert isinstance(model, FaultyModel)
        assert collect(model, ids)[0] == collect(real, ids)[0]
        stream = model.open_stream(ids, GREEDY)
        while stream.next_event() is not None:
            pass
        assert stream.outcome.token_ids == collect(real, ids)[0].token_ids
        assert model.context_length == 128 and model.eos_token_ids == real.eos_token_ids
    assert model.closed


def test_raise_fault_fails_the_generation_with_inference_error(tiny_path: Path) -> None:
    with faulty(tiny_path, "raise") as model:
        with pytest.raises(InferenceError, match="injected fault"):
            collect(model, model.tokenizer.encode(PROMPT))
        stream = model.open_stream(model.tokenizer.encode(PROMPT), GREEDY)
        with pytest.raises(InferenceError, match="injected fault"):
            stream.next_event()
        assert model.plan.injected["raise"] == 2


def test_late_faults_strike_after_the_first_real_tokens(tiny_path: Path,
                                                         real: LoadedModel) -> None:
    ids = real.tokenizer.encode(PROMPT)
    first_two = collect(real, ids)[0].token_ids[:2]
    with faulty(tiny_path, "raise", after_tokens=2) as model:
        events: list[GenerationEvent] = []
        with pytest.raises(InferenceError, match="after 2 tokens"):
            model.generate(ids, GREEDY, on_event=events.append, should_stop=lambda: False)
        assert tuple(t for e in events for t in e.token_ids) == first_two
    with faulty(tiny_path, "hang", after_tokens=2, hang_s=0.05) as model:
        stream = model.open_stream(ids, GREEDY)
        while stream.next_event() is not None:
            pass  # two real tokens, then a hang that gives up by itself
        assert stream.outcome.token_ids == first_two
        assert stream.outcome.finish_reason == "cancelled"


def test_malformed_fault_returns_ids_outside_the_vocabulary_and_garbage_text(
        tiny_path: Path) -> None:
    with faulty(tiny_path, "malformed") as model:
        outcome, events = collect(model, model.tokenizer.encode(PROMPT))
        vocab = model.tokenizer.vocab_size
        assert outcome.token_ids == events[0].token_ids
        assert any(not 0 <= t < vocab for t in outcome.token_ids)
        verdict = Guardrails().check_output(outcome.token_ids, outcome.text, vocab_size=vocab)
        assert verdict.blocked is not None and verdict.blocked.code == "malformed_output"

        stream = model.open_stream(model.tokenizer.encode(PROMPT), GREEDY)
        first = stream.next_event()
        assert first is not None and "\x00" in first.text
        assert stream.next_event() is None
        assert stream.outcome.finish_reason == "stop"


def test_hang_fault_blocks_until_should_stop(tiny_path: Path) -> None:
    stop = threading.Event()
    threading.Timer(0.05, stop.set).start()
    with faulty(tiny_path, "hang") as model:
        start = time.monotonic()
        outcome, events = collect(model, model.tokenizer.encode(PROMPT), stop.is_set)
    assert 0.04 < time.monotonic() - start < 2
    assert outcome.finish_reason == "cancelled" and events == []


def test_hung_stream_is_ended_by_close_from_another_thread(tiny_path: Path) -> None:
    with faulty(tiny_path, "hang") as model:
        stream = model.open_stream(model.tokenizer.encode(PROMPT), GREEDY)
        threading.Timer(0.05, stream.close).start()
        assert stream.next_event() is None
        assert stream.outcome.finish_reason == "cancelled"


def test_hang_gives_up_by_itself_after_hang_s(tiny_path: Path) -> None:
    with faulty(tiny_path, "hang", hang_s=0.05) as model:
        outcome, _ = collect(model, model.tokenizer.encode(PROMPT))
    assert outcome.finish_reason == "cancelled"


@pytest.mark.anyio
async def test_timeout_cancels_a_hung_generation_and_frees_its_thread(tiny_path: Path) -> None:
    with faulty(tiny_path, "hang") as model:
        ids = model.tokenizer.encode(PROMPT)
        stop, finished = threading.Event(), threading.Event()

        def work() -> Any:
            try:
                return model.generate(ids, GREEDY, on_event=lambda e: None,
                                      should_stop=stop.is_set)
            finally:
                finished.set()

        deadline = TimeoutPolicy(timeout_s=0.05).start()
        with deadline.scope() as scope:
            try:
                await anyio.to_thread.run_sync(work, abandon_on_cancel=True)
            except anyio.get_cancelled_exc_class():
                stop.set()  # what the engine's inferencing phase does on cancellation
                with anyio.CancelScope(shield=True):
                    await anyio.to_thread.run_sync(finished.wait)
                raise
        # The worker thread left the hung generation: none stays blocked after the timeout.
        assert scope.cancelled_caught and finished.is_set()


def test_load_error_fault_refuses_the_load(tiny_path: Path) -> None:
    loader = faulty_loader(1.0, ("load_error",))
    with pytest.raises(ModelLoadError, match="injected fault"):
        load(loader, tiny_path)
    assert loader.plan.injected == {"load_error": 1}


def test_fault_plan_is_seeded_and_injects_at_the_requested_rate() -> None:
    kinds = frozenset({"raise", "hang", "malformed"})
    a = FaultPlan(0.1, seed=42)
    b = FaultPlan(0.1, seed=42)
    draws = [a.draw(kinds) for _ in range(5000)]
    assert draws == [b.draw(kinds) for _ in range(5000)]
    injected = sum(a.injected.values())
    assert 400 < injected < 600
    assert set(a.injected) == {"raise", "hang", "malformed"}
    assert a.calls == 5000


@pytest.mark.parametrize(("rate", "kinds"), [(1.5, ("raise",)), (0.1, ()), (0.1, ("boom",))])
def test_fault_plan_refuses_nonsense(rate: float, kinds: Any) -> None:
    with pytest.raises(ConfigurationError, match="fault"):
        FaultPlan(rate, kinds)


@pytest.mark.anyio
async def test_model_loader_seam_loads_faulty_models(tiny_path: Path, tmp_path: Path,
                                                     registry_doc: dict[str, Any]) -> None:
    injector = faulty_loader(1.0, ("raise",))
    loader = ModelLoader(tmp_path / "cache", threads=1, load_model=injector)
    spec = Registry.from_dict(registry_doc).get("conversation")
    lease = await loader.acquire(spec)
    try:
        assert isinstance(lease.model, FaultyModel)
        with pytest.raises(InferenceError):
            lease.model.generate(lease.prepared.tokenizer.encode(PROMPT), GREEDY,
                                 on_event=lambda e: None, should_stop=lambda: False)
    finally:
        lease.release()
        await loader.aclose()


def with_faults(engine: Engine, injector: FaultyLoader) -> Engine:
    # The loader's `load_model=` seam; the Engine does not take it as an argument yet.
    engine.loader._load_model = injector
    return engine


@pytest.mark.anyio
async def test_engine_falls_back_when_one_agents_model_raises(
        make_engine: Callable[..., Engine], registry_doc: dict[str, Any],
        tiny_models: dict[str, Path], tmp_path: Path) -> None:
    doc = {**registry_doc, "default_agent": "first", "agents": [
        agent("first", tiny_models["medium"], fallback="second"),
        agent("second", tiny_models["small"])]}
    injector = faulty_loader(1.0, ("raise",), only=("tiny-medium",))
    async with with_faults(make_engine(doc, caches=False), injector) as engine:
        result = await engine.infer("hello", max_tokens=4)
        injector.plan.kinds = ("raise", "load_error")  # nothing left to load: no effect
    assert result.ok and result.fallback and result.agent == "second"
    assert injector.plan.injected == {"raise": 2}  # retried once on the same agent first
    (record,) = read_trace_lines(tmp_path / "traces" / "test.jsonl")
    assert [(t["event"], t["target"]) for t in record["transitions"]][2:] == [
        ("routed", "loading_agent"), ("loaded", "inferencing"), ("inference_failed", "fallback"),
        ("retry_same", "loading_agent"), ("loaded", "inferencing"),
        ("inference_failed", "fallback"), ("retry", "loading_agent"), ("loaded", "inferencing"),
        ("completed", "success")]


@pytest.mark.anyio
async def test_engine_reports_exhausted_when_every_agent_raises(
        make_engine: Callable[..., Engine], registry_doc: dict[str, Any],
        tiny_models: dict[str, Path]) -> None:
    doc = {**registry_doc, "default_agent": "first", "agents": [
        agent("first", tiny_models["medium"], fallback="second"),
        agent("second", tiny_models["small"])]}
    async with with_faults(make_engine(doc, caches=False),
                           faulty_loader(1.0, ("raise",))) as engine:
        with pytest.raises(RequestFailed) as info:
            await engine.infer("hello", max_tokens=4)
    assert info.value.reason == "exhausted"
    assert "injected fault" in info.value.message


# --- broken files ---------------------------------------------------------------------------


@pytest.mark.parametrize(("kind", "message"), [
    ("missing", "does not exist"), ("truncated", "truncated"),
    ("corrupt", "not a usable GGUF model file")])
def test_broken_model_files_fail_to_load_with_a_clear_error(
        tiny_path: Path, tmp_path: Path, kind: Any, message: str) -> None:
    broken = break_model_file(tiny_path, tmp_path / "broken", kind)
    assert broken.exists() == (kind != "missing")
    with pytest.raises(ModelLoadError, match=message):
        files = ensure_converted(broken, tmp_path / "cache")
        LoadedModel.load(files.model_path, files.tokenizer_path, context_length=64, threads=1)


@pytest.mark.anyio
@pytest.mark.parametrize("kind", ["missing", "truncated", "corrupt"])
async def test_request_to_an_agent_with_a_broken_file_falls_back(
        make_engine: Callable[..., Engine], registry_doc: dict[str, Any], tmp_path: Path,
        tiny_models: dict[str, Path], kind: Any) -> None:
    broken = break_model_file(tiny_models["small"], tmp_path / "broken", kind)
    doc = {**registry_doc, "agents": [*registry_doc["agents"],
                                      agent("damaged", broken, fallback="conversation")]}
    async with make_engine(doc, caches=False) as engine:
        result = await engine.infer("hello", agent="damaged", max_tokens=4)
    assert result.ok and result.fallback
    assert result.agents_tried == ("damaged", "conversation")


@pytest.mark.parametrize(("kind", "where"), [
    ("empty", "$"), ("not_json", "$"), ("not_an_object", "$"),
    ("missing_field", "agents[0]"), ("bad_value", "context_length"),
    ("unknown_fallback", "fallback")])
def test_malformed_registries_are_refused_naming_the_problem(
        tmp_path: Path, kind: Any, where: str) -> None:
    path = write_broken_registry(tmp_path / "models.json", kind)
    with pytest.raises(RegistryError) as info:
        Registry.load(path)
    assert where in str(info.value)


def test_a_file_where_the_trace_directory_should_be_stops_the_engine_at_start(
        make_engine: Callable[..., Engine], tmp_path: Path) -> None:
    blocked = occupy_path(tmp_path / "traces")
    engine = make_engine(trace_path=blocked / "orion.jsonl")

    async def start() -> None:
        async with engine:
            pass

    with pytest.raises(OrionError, match="cannot create the trace directory"):
        anyio.run(start)


def test_a_file_where_the_model_cache_should_be_fails_the_load(tiny_path: Path,
                                                                tmp_path: Path) -> None:
    blocked = occupy_path(tmp_path / "cache")
    with pytest.raises(ModelLoadError, match="cannot create model cache"):
        ensure_converted(tiny_path, blocked)


@pytest.mark.anyio
async def test_a_file_where_the_disk_cache_tier_should_be_still_serves_requests(
        make_engine: Callable[..., Engine], tmp_path: Path) -> None:
    (tmp_path / "cache").mkdir()
    occupy_path(tmp_path / "cache" / "caches")
    async with make_engine(cache_dir=tmp_path / "cache") as engine:
        first = await engine.infer("hello", max_tokens=4, temperature=0)
        second = await engine.infer("hello", max_tokens=4, temperature=0)
    assert first.ok and second.ok and second.text == first.text
    assert len(read_trace_lines(tmp_path / "traces" / "test.jsonl")) == 2
