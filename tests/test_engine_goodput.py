"""Resilience around attempts, through the Engine: breakers blame only the model call and are
shared by the agents of one model, a transient failure is retried once on the same agent, and a
chain whose breakers are all open ends at once with a retry-after. Every trace line replays.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest

from orion_fsm import (
    BreakerConfig,
    Engine,
    ManualClock,
    RequestFailed,
    RetryPolicy,
)
from orion_fsm.services.models._loader import ModelLoader
from orion_fsm.testing.faults import faulty_loader
from orion_fsm.testing.replay import assert_replays
from tests.conftest import agent, read_trace_lines

pytestmark = pytest.mark.anyio

MakeEngine = Callable[..., Engine]


def events(record: dict[str, Any]) -> list[str]:
    return [t["event"] for t in record["transitions"]]


async def replay_all(path: Path, engine: Engine) -> list[dict[str, Any]]:
    records = read_trace_lines(path)
    for record in records:
        await assert_replays(record, registry=engine.registry)
    return records


async def test_a_deadline_that_expires_while_queued_gives_the_breaker_no_verdict(
    make_engine: MakeEngine, registry_doc: dict[str, Any], tmp_path: Path,
) -> None:
    doc = {**registry_doc, "agents": [{**a, "parallel": 1} if a["id"] == "code" else a
                                      for a in registry_doc["agents"]]}
    async with make_engine(doc, timeout_s=1.0) as engine:
        assert isinstance(engine.loader, ModelLoader)
        # Another generation holds the model's only slot: this request waits for it, and its
        # deadline passes before its own model call ever starts.
        lease = await engine.loader.acquire(engine.registry.get("code"))
        try:
            with pytest.raises(RequestFailed) as info:
                await engine.infer("hello", agent="code", cache=False)
        finally:
            lease.release()
        breaker = engine.breakers.breaker("code")
        assert info.value.reason == "timeout"
        assert breaker.consecutive_failures == 0 and breaker.state == "closed"
    (record,) = read_trace_lines(tmp_path / "traces" / "test.jsonl")
    assert record["result"]["error_reason"] == "timeout"
    assert "orion.breaker.transition" not in str(record["phases"])


async def test_a_hung_model_call_is_the_models_failure(make_engine: MakeEngine) -> None:
    hang = faulty_loader(1.0, kinds=("hang",), only=("medium",))
    async with make_engine(timeout_s=0.5, load_model=hang, retries=False) as engine:
        with pytest.raises(RequestFailed) as info:
            await engine.infer("hello", agent="code", cache=False)
        breaker = engine.breakers.breaker("code")
        assert info.value.reason == "timeout"
        assert breaker.consecutive_failures == 1 and breaker.last_failure == "timeout"


async def test_agents_served_by_one_model_share_its_breaker(
    make_engine: MakeEngine, registry_doc: dict[str, Any], tiny_models: dict[str, Path],
    tmp_path: Path,
) -> None:
    doc = {**registry_doc, "default_agent": "chat", "agents": [
        agent("chat", tiny_models["medium"], fallback="backup"),
        agent("coder", tiny_models["medium"], fallback="backup"),  # same file and context
        agent("backup", tiny_models["small"])]}
    broken = faulty_loader(1.0, kinds=("raise",), only=("medium",))
    async with make_engine(doc, load_model=broken, retries=False,
                           breakers=BreakerConfig(window_size=2, minimum_calls=2)) as engine:
        board = engine.breakers
        assert board.key_for("chat") == board.key_for("coder") == "tiny-medium:default@256"
        assert board.key_for("backup") == "tiny-small:default@256"
        first = await engine.infer("hello", agent="chat", cache=False)
        second = await engine.infer("hello", agent="coder", cache=False)
        calls = broken.plan.calls
        refused = await engine.infer("hello", agent="chat", cache=False)
        snapshot = board.snapshot()
    assert first.agent == second.agent == refused.agent == "backup"
    assert broken.plan.calls == calls  # refused before touching the shared model
    shared = snapshot["tiny-medium:default@256"]
    assert shared["state"] == "open" and shared["agents"] == ["chat", "coder"]
    records = await replay_all(tmp_path / "traces" / "test.jsonl", engine)
    assert "breaker_open" in events(records[-1])
    assert records[-1]["breakers"]["tiny-medium:default@256"]["agents"] == ["chat", "coder"]
    loading = next(p for p in records[-1]["phases"] if p["state"] == "loading_agent")
    assert loading["attributes"]["orion.breaker.key"] == "tiny-medium:default@256"


async def test_a_transient_failure_is_retried_once_on_the_same_agent_then_served(
    make_engine: MakeEngine, tmp_path: Path,
) -> None:
    # seed 4 at rate 0.5: the first generation raises, the second does not.
    flaky = faulty_loader(0.5, kinds=("raise",), seed=4)
    async with make_engine(load_model=flaky) as engine:
        result = await engine.infer("hello", agent="code", cache=False)
        breaker = engine.breakers.breaker("code")
        assert breaker.consecutive_failures == 0  # the served retry reset the count
    assert flaky.plan.injected == {"raise": 1}
    assert result.agent == "code" and not result.fallback and result.agents_tried == ("code",)
    (record,) = await replay_all(tmp_path / "traces" / "test.jsonl", engine)
    assert events(record)[2:] == ["routed", "loaded", "inference_failed", "retry_same",
                                  "loaded", "completed"]
    retry = next(p for p in record["phases"] if p["state"] == "fallback")
    assert retry["attributes"]["orion.fallback.to"] == "code"
    assert retry["attributes"]["orion.retry.same"] >= 0


async def test_malformed_output_is_retried_once_then_falls_back(
    make_engine: MakeEngine, tmp_path: Path,
) -> None:
    garbage = faulty_loader(1.0, kinds=("malformed",), only=("medium",))
    async with make_engine(load_model=garbage) as engine:
        result = await engine.infer("hello", agent="code", cache=False)
    assert garbage.plan.injected == {"malformed": 2}
    assert result.fallback and result.agent == "conversation"
    (record,) = await replay_all(tmp_path / "traces" / "test.jsonl", engine)
    assert events(record).count("retry_same") == 1 and events(record).count("retry") == 1


async def test_no_retry_when_the_deadline_leaves_no_room(
    make_engine: MakeEngine, tmp_path: Path,
) -> None:
    garbage = faulty_loader(1.0, kinds=("malformed",), only=("medium",))
    no_room = RetryPolicy(min_remaining_s=3600.0)
    async with make_engine(load_model=garbage, retries=no_room) as engine:
        result = await engine.infer("hello", agent="code", cache=False)
    assert garbage.plan.injected == {"malformed": 1}
    assert result.fallback and result.agent == "conversation"
    (record,) = await replay_all(tmp_path / "traces" / "test.jsonl", engine)
    assert "retry_same" not in events(record)
    skipped = next(p for p in record["phases"] if p["state"] == "fallback")
    assert "before the deadline" in skipped["attributes"]["orion.retry.skipped"]


async def test_a_chain_whose_breakers_are_all_open_ends_at_once_with_retry_after(
    make_engine: MakeEngine, tmp_path: Path,
) -> None:
    clock = ManualClock()
    broken = faulty_loader(1.0, kinds=("raise",))
    async with make_engine(clock=clock, load_model=broken, retries=False,
                           breakers=BreakerConfig(window_size=1, minimum_calls=1)) as engine:
        with pytest.raises(RequestFailed) as failed:
            await engine.infer("hello", agent="code", cache=False)  # opens both breakers
        assert failed.value.retry_after_s is None  # the models ran: no breaker refused
        calls = broken.plan.calls
        clock.advance(10)
        with pytest.raises(RequestFailed) as refused:
            await engine.infer("hello", agent="code", cache=False)
    assert broken.plan.calls == calls  # nothing was tried
    assert refused.value.reason == "exhausted"
    assert refused.value.retry_after_s == pytest.approx(20.0)
    result = refused.value.result
    assert result.retry_after_s == pytest.approx(20.0)
    assert "every circuit breaker of its chain is open; retry after 20 s" in result.error
    records = await replay_all(tmp_path / "traces" / "test.jsonl", engine)
    assert events(records[-1])[2:] == ["routed", "breaker_open", "retry", "breaker_open",
                                       "exhausted"]
    assert records[-1]["result"]["retry_after_s"] == pytest.approx(20.0)


async def test_half_open_lets_probes_through_and_fails_the_others_over_at_once(
    make_engine: MakeEngine, registry_doc: dict[str, Any], tmp_path: Path,
) -> None:
    clock = ManualClock()
    flaky = faulty_loader(1.0, kinds=("raise",), only=("medium",))
    doc = {**registry_doc, "agents": [{**a, "parallel": 1} if a["id"] == "code" else a
                                      for a in registry_doc["agents"]]}
    async with make_engine(doc, clock=clock, load_model=flaky, retries=False,
                           breakers=BreakerConfig(window_size=1, minimum_calls=1,
                                                  half_open_probes=2)) as engine:
        code = engine.registry.get("code")
        assert (await engine.infer("hello", agent="code", cache=False)).fallback  # opens
        flaky.plan.rate = 0.0  # the model recovers
        clock.advance(30)
        assert isinstance(engine.loader, ModelLoader)
        results: list[Any] = []

        async def one() -> None:
            results.append(await engine.infer("hello", agent="code", cache=False))

        lease = await engine.loader.acquire(code)  # holds the model's only slot
        try:
            async with anyio.create_task_group() as tg:
                try:
                    for _ in range(2):  # the two probes wait for the held slot
                        tg.start_soon(one)
                    await wait_for(lambda: engine.breakers.snapshot()[
                        "tiny-medium:default@256"]["probes_in_flight"] == 2)
                    extra = await engine.infer("hello", agent="code", cache=False)
                    assert extra.fallback and extra.agent == "conversation"  # at once
                finally:
                    lease.release()
        finally:
            lease.release()
        snapshot = engine.breakers.snapshot()["tiny-medium:default@256"]
    assert [r.agent for r in results] == ["code", "code"]
    assert snapshot["state"] == "closed" and snapshot["recovered_count"] == 1
    await replay_all(tmp_path / "traces" / "test.jsonl", engine)


async def wait_for(condition: Callable[[], bool]) -> None:
    # Polled: the probes take their permits inside the engine, with no event to wait on.
    while not condition():  # noqa: ASYNC110
        await anyio.sleep(0.005)


async def test_agents_on_the_failed_model_are_passed_over_when_no_time_is_left(
    make_engine: MakeEngine, registry_doc: dict[str, Any], tiny_models: dict[str, Path],
    tmp_path: Path,
) -> None:
    doc = {**registry_doc, "default_agent": "chat", "agents": [
        agent("chat", tiny_models["medium"], fallback="coder"),
        agent("coder", tiny_models["medium"], fallback="backup"),  # queues for the same model
        agent("backup", tiny_models["small"])]}
    garbage = faulty_loader(1.0, kinds=("malformed",), only=("medium",))
    no_time = RetryPolicy(min_remaining_s=3600.0)  # as if the deadline were nearly over
    async with make_engine(doc, load_model=garbage, retries=no_time) as engine:
        result = await engine.infer("hello", agent="chat", cache=False)
    assert garbage.plan.injected == {"malformed": 1}  # coder never queued for the model
    assert result.agent == "backup" and result.fallback
    (record,) = await replay_all(tmp_path / "traces" / "test.jsonl", engine)
    fallback = next(p for p in record["phases"] if p["state"] == "fallback")["attributes"]
    assert fallback["orion.fallback.skipped"] == ["coder"]
    assert fallback["orion.fallback.same_model"] == ["skip"]
    assert fallback["orion.fallback.to"] == "backup"


async def test_a_registry_breaker_section_configures_its_models_breaker(
    make_engine: MakeEngine, registry_doc: dict[str, Any],
) -> None:
    doc = {**registry_doc, "agents": [
        {**a, "breaker": {"window_size": 4, "minimum_calls": 2, "half_open_probes": 3}}
        if a["id"] == "code" else a for a in registry_doc["agents"]]}
    broken = faulty_loader(1.0, kinds=("raise",), only=("medium",))
    async with make_engine(doc, load_model=broken, retries=False,
                           breakers=BreakerConfig(reset_after_s=7.0)) as engine:
        config = engine.breakers.breaker("code").config
        assert (config.window_size, config.minimum_calls, config.half_open_probes,
                config.reset_after_s, config.failure_rate_threshold) == (4, 2, 3, 7.0, 0.5)
        assert engine.breakers.breaker("conversation").config.window_size == 40
        for _ in range(2):  # two failed calls of two: the code model's breaker opens
            assert (await engine.infer("hello", agent="code", cache=False)).fallback
        assert engine.breakers.breaker("code").state == "open"


@pytest.mark.parametrize("section", [{"window": 4}, {"minimum_calls": 0},
                                     {"failure_rate_threshold": 1.5}])
def test_a_bad_registry_breaker_section_is_refused_naming_it(
    registry_doc: dict[str, Any], section: dict[str, Any],
) -> None:
    from orion_fsm import Registry, RegistryError

    doc = {**registry_doc, "agents": [{**a, "breaker": section} if a["id"] == "code" else a
                                      for a in registry_doc["agents"]]}
    with pytest.raises(RegistryError, match="breaker"):
        Registry.from_dict(doc)
