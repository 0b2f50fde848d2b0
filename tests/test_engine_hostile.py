"""Hostile and careless callers: a failing trace sink, wrong types at the API boundary.
Nothing a caller passes or a disk does may stop the Engine or lose a request."""

from __future__ import annotations

import contextlib
import copy
import json
import math
import threading
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import hypothesis.strategies as st
import pytest
from hypothesis import HealthCheck, given, settings

from orion_fsm import (
    ConfigurationError,
    Engine,
    GenerationParams,
    Registry,
    RegistryError,
    RequestFailed,
    Result,
    RuleRouter,
)
from orion_fsm._resources import data_file
from orion_fsm.services.resilience._admission import AdmissionController
from tests.conftest import assert_no_thread_leaked, read_trace_lines

pytestmark = pytest.mark.anyio

_PROMPTS = ["hello there", "caf\udce9 au lait", "bonjour", "def f(): pass", "\udcff\udcfe"]


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


async def _serve_300(engine: Engine) -> list[tuple[str, Result]]:
    results: list[tuple[str, Result]] = []

    async def one(i: int) -> None:
        prompt = _PROMPTS[i % len(_PROMPTS)]
        try:
            results.append((prompt, await engine.infer(prompt, max_tokens=2)))
        except RequestFailed as exc:
            results.append((prompt, exc.result))

    async with anyio.create_task_group() as tg:
        for i in range(300):
            tg.start_soon(one, i)
    return results


@pytest.mark.parametrize("sink", ["full-disk", "became-a-directory"])
async def test_300_concurrent_requests_are_all_served_when_the_trace_sink_fails(
        make_engine: Callable[..., Engine], tmp_path: Path, sink: str) -> None:
    path = Path("/dev/full") if sink == "full-disk" else tmp_path / "t.jsonl"
    async with make_engine(trace_path=path, max_queue=300) as engine:
        if sink == "became-a-directory":
            path.mkdir()
        results = await _serve_300(engine)
        # The engine still serves after the failures.
        assert (await engine.infer("hello again", max_tokens=2)).ok
    assert len(results) == 300
    # Text that cannot be UTF-8 is refused as invalid; every other request is served.
    assert all(r.ok for prompt, r in results if _utf8(prompt))
    stats = engine.trace_stats()
    assert stats["dropped"] == 301 and stats["written"] == 0


async def test_records_with_lone_surrogates_are_written_among_300_concurrent_ones(
        make_engine: Callable[..., Engine], tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    async with make_engine(trace_path=path, max_queue=300) as engine:
        results = await _serve_300(engine)
    assert len(results) == 300
    lines = read_trace_lines(path)
    assert len(lines) == 300
    assert {line["request_id"] for line in lines} == {r.request_id for _, r in results}
    assert engine.trace_stats()["dropped"] == 0
    assert any("\ufffd" in str(line["request"]["messages"]) for line in lines)


# --- types at the API boundary ------------------------------------------------------------

_ANY = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8), st.binary(max_size=4),
    st.lists(st.one_of(st.text(max_size=4), st.integers()), max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
    st.builds(object),
)
_ARGUMENTS = st.fixed_dictionaries({}, optional={
    "agent": st.one_of(_ANY, st.sampled_from(["conversation", "code", "nope"])),
    "system": _ANY,
    "params": st.one_of(_ANY, st.builds(GenerationParams, max_tokens=st.integers(1, 4))),
    "max_tokens": st.one_of(_ANY, st.integers(1, 4)),
    "temperature": _ANY, "top_k": _ANY, "top_p": _ANY, "repetition_penalty": _ANY,
    "seed": _ANY,
    "stop": st.one_of(_ANY, st.lists(_ANY, max_size=3)),
    "cache": _ANY,
    "priority": st.one_of(_ANY, st.integers(-2000, 2000)),
})
_PROMPT = st.one_of(_ANY, st.text(min_size=1, max_size=20), st.lists(
    st.one_of(_ANY, st.fixed_dictionaries({"role": _ANY, "content": _ANY}),
              st.fixed_dictionaries({"role": st.sampled_from(["user", "system"]),
                                     "content": st.text(max_size=10)})), max_size=3))
_REASONS = {"invalid", "exhausted", "overloaded", "timeout", "internal"}


@settings(max_examples=30, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(prompt=_PROMPT, arguments=_ARGUMENTS, streaming=st.booleans())
async def test_any_arguments_end_in_a_result_or_request_failed_with_a_trace_line(
        make_engine: Callable[..., Engine], tmp_path: Path, prompt: Any,
        arguments: dict[str, Any], streaming: bool) -> None:
    path = tmp_path / f"{uuid.uuid4().hex}.jsonl"
    async with make_engine(trace_path=path, cache_dir=None) as engine:
        try:
            if streaming:
                async with engine.stream(prompt, **arguments) as stream:
                    async for _ in stream:
                        pass
                result = stream.result
            else:
                result = await engine.infer(prompt, **arguments)
        except RequestFailed as exc:
            assert exc.reason in _REASONS, exc
            assert isinstance(exc.result, Result) and exc.result.state == "error"
            assert "\n" not in str(exc)
            result = exc.result
        # Nothing the caller passed corrupts the shared admission state.
        assert engine.admission.snapshot()["in_flight"] == 0
        assert engine.admission.snapshot()["queued"] == 0
        assert (await engine.infer("hello", max_tokens=1)).ok
    lines = read_trace_lines(path)
    assert len(lines) == 2 and lines[0]["request_id"] == result.request_id


@pytest.mark.parametrize(("arguments", "field"), [
    ({"stop": 5}, "stop"), ({"stop": [1]}, "stop"), ({"stop": b"xy"}, "stop"),
    ({"params": {"max_tokens": 1}}, "params"), ({"agent": ["x"]}, "agent"),
    ({"agent": 5}, "agent"), ({"priority": "high"}, "priority"),
    ({"priority": math.nan}, "priority"), ({"priority": True}, "priority"),
    ({"priority": 10**9}, "priority"), ({"cache": "yes"}, "cache"), ({"cache": 1}, "cache"),
    ({"params": GenerationParams(max_tokens=2), "max_tokens": 3}, "params"),
    ({"params": GenerationParams(max_tokens=2), "stop": "x"}, "params"),
    ({"temperature": "hot"}, "temperature"), ({"seed": 1.5}, "seed"),
    ({"system": 5}, "messages[0]"),
])
async def test_arguments_of_the_wrong_type_are_refused_naming_the_field(
        make_engine: Callable[..., Engine], arguments: dict[str, Any], field: str) -> None:
    async with make_engine() as engine:
        with pytest.raises(RequestFailed) as caught:
            await engine.infer("hello", **arguments)
        assert caught.value.reason == "invalid"
        message = str(caught.value)
        assert field.split("[")[0] in message, message
        if field == "params" and len(arguments) > 1:
            other = next(k for k in arguments if k != "params")
            assert f"{other}=" in message  # both are named
        assert engine.admission.snapshot()["in_flight"] == 0
        assert engine.admission.snapshot()["queued"] == 0


async def test_a_bad_priority_never_corrupts_the_admission_queue(
        make_engine: Callable[..., Engine]) -> None:
    async with make_engine(max_in_flight=1) as engine:
        async with anyio.create_task_group() as tg:
            for priority in ["high", 3, None, 2.5, -1, 10**6, 0]:
                tg.start_soon(_quietly, engine.infer("hello", max_tokens=1, priority=priority))
        assert engine.admission.snapshot()["in_flight"] == 0
        assert engine.admission.snapshot()["queued"] == 0
        with anyio.fail_after(30):
            assert (await engine.infer("hello", max_tokens=1)).ok


async def test_the_admission_controller_refuses_a_priority_it_cannot_order() -> None:
    admission = AdmissionController(max_in_flight=1)
    await admission.acquire(0)
    with pytest.raises(ConfigurationError, match="priority"):
        await admission.acquire("high")  # type: ignore[arg-type]
    admission.release()
    assert admission.snapshot()["in_flight"] == 0 and admission.snapshot()["queued"] == 0


async def _quietly(call: Awaitable[Result]) -> None:
    with contextlib.suppress(RequestFailed):
        await call


# --- L1 keys on everything that shapes the prompt -----------------------------------------


async def test_an_edited_chat_template_never_serves_an_answer_cached_before_it(
        make_engine: Callable[..., Engine], registry_doc: dict[str, Any]) -> None:
    async with make_engine() as engine:
        first = await engine.infer("hello", max_tokens=2)
        assert (await engine.infer("hello", max_tokens=2)).cache == "L1"
    edited = copy.deepcopy(registry_doc)
    edited["agents"][0]["chat_template"] = {
        "system": "<|im_start|>system\n{content}<|im_end|>\n",
        "user": "<|im_start|>user (edited)\n{content}<|im_end|>\n",
        "assistant": "<|im_start|>assistant\n{content}<|im_end|>\n",
        "assistant_prefix": "<|im_start|>assistant\n",
    }
    async with make_engine(edited) as engine:
        again = await engine.infer("hello", max_tokens=2)
    assert first.agent == again.agent == "conversation"
    assert again.cache is None


# --- routing never blocks the event loop; deadlines hold ------------------------------------

# What the default registry's `logic` rule was before it was made linear: quadratic on a run
# of digits. Registries may still hold such patterns (only exponential ones are refused).
_QUADRATIC = r"\d+\s*[-+*/]\s*\d+"
_HOSTILE_PROMPTS = ["7" * 32_000, "if " * 12_000, "1 " * 20_000, "a." * 30_000 + "@",
                    "eyJ" * 15_000, "password = " * 5_000]


def _hostile_doc(registry_doc: dict[str, Any]) -> dict[str, Any]:
    doc = copy.deepcopy(registry_doc)
    logic = json.loads(data_file("models.json").read_text(encoding="utf-8"))
    patterns = next(a for a in logic["agents"] if a["id"] == "logic")["routing"]["patterns"]
    doc["agents"][1]["routing"]["patterns"] += [*patterns, _QUADRATIC]
    return doc


class _Heartbeat:
    """Ticks on the event loop; `max_gap` is the longest the loop left it waiting."""

    def __init__(self) -> None:
        self.max_gap = 0.0

    async def run(self, *, task_status: Any = anyio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        last = anyio.current_time()
        while True:
            await anyio.sleep(0.005)
            now = anyio.current_time()
            self.max_gap = max(self.max_gap, now - last)
            last = now


async def test_hostile_prompts_end_in_a_final_state_with_a_trace_line(
        make_engine: Callable[..., Engine], registry_doc: dict[str, Any], tmp_path: Path) -> None:
    async with make_engine(_hostile_doc(registry_doc)) as engine:
        for prompt in _HOSTILE_PROMPTS:
            with pytest.raises(RequestFailed) as caught:  # all longer than the context
                await engine.infer(prompt, max_tokens=1)
            assert caught.value.reason == "invalid"
    assert len(read_trace_lines(tmp_path / "traces" / "test.jsonl")) == len(_HOSTILE_PROMPTS)


async def test_a_slow_routing_rule_runs_off_the_event_loop(
        make_engine: Callable[..., Engine], registry_doc: dict[str, Any]) -> None:
    # The quadratic rule on a long run of digits: the routing phase takes a while; the
    # heartbeat shows whether the loop kept running meanwhile (it stops dead on the loop).
    before = set(threading.enumerate())
    async with make_engine(_hostile_doc(registry_doc), guardrails=False) as engine:
        heartbeat = _Heartbeat()
        async with anyio.create_task_group() as tg:
            await tg.start(heartbeat.run)
            with pytest.raises(RequestFailed) as caught:
                await engine.infer("7" * 32_000, max_tokens=1)
            tg.cancel_scope.cancel()
    phases = caught.value.result.phases
    routing_s = sum(p.ms for p in phases if p.state == "routing") / 1e3
    assert heartbeat.max_gap < routing_s, (heartbeat.max_gap, routing_s)
    await assert_no_thread_leaked(before, within_s=30)


async def test_a_slow_routing_rule_never_holds_the_caller_past_its_deadline(
        make_engine: Callable[..., Engine], registry_doc: dict[str, Any]) -> None:
    before = set(threading.enumerate())
    doc = copy.deepcopy(registry_doc)
    # Quadratic on a run of digits: seconds on the old uncapped text, a fraction of one on
    # the capped text, still longer than this deadline.
    doc["agents"][1]["routing"]["patterns"] = [_QUADRATIC, _QUADRATIC + "x"]
    async with make_engine(doc, guardrails=False, timeout_s=0.05) as engine:
        with pytest.raises(RequestFailed) as caught:
            await engine.infer("9" * 40_000, max_tokens=1)
    assert caught.value.reason == "timeout"
    assert [p.state for p in caught.value.result.phases][-1] == "routing"
    await assert_no_thread_leaked(before, within_s=60)


@pytest.mark.parametrize("pattern", [r"(a+)+$", r"(\w+\s?)*!", r"((ab)*c)+", r"(?:x|(y+))*z"])
def test_patterns_that_backtrack_exponentially_are_refused_at_load(
        registry_doc: dict[str, Any], pattern: str) -> None:
    doc = copy.deepcopy(registry_doc)
    doc["agents"][1]["routing"]["patterns"] = [r"\bdef\b", pattern]
    with pytest.raises(RegistryError, match=r"agents\[1\]\.routing\.patterns\[1\]") as caught:
        Registry.from_dict(doc)
    assert "exponential" in str(caught.value)


def test_the_default_registry_routing_rules_are_linear() -> None:
    registry = Registry.load(None)
    router = RuleRouter(registry)
    for text in ("what is 12 * 7?", "3.5 + 2 is", "if it rains then stay", "50 % off"):
        assert router.decide(text).agent == "logic", text


# Request ids drawn at random that the sanitiser once took for secrets (about one id in
# 15,000: a 300-request run lost one in 50 runs, which looked like a flake under load).
_SECRET_LOOKING_IDS = ["4093609377352800", "af65fa0f00390009"]


@pytest.mark.parametrize("request_id", _SECRET_LOOKING_IDS)
async def test_a_request_id_that_reads_as_a_card_or_an_iban_is_written_as_it_is(
        make_engine: Callable[..., Engine], tmp_path: Path, request_id: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    import orion_fsm._engine

    monkeypatch.setattr(orion_fsm._engine.random, "getrandbits", lambda bits: int(request_id, 16))
    path = tmp_path / "t.jsonl"
    async with make_engine(trace_path=path) as engine:
        result = await engine.infer("hello there", max_tokens=2)
    assert result.request_id == request_id
    (line,) = read_trace_lines(path)
    assert line["request_id"] == line["request"]["id"] == line["result"]["request_id"] \
        == request_id


def test_engine_ids_are_kept_but_secrets_under_id_like_keys_are_not() -> None:
    from orion_fsm.services.observability._sanitize import sanitize

    record = {"request_id": "4093609377352800", "trace_id": "af65fa0f00390009" * 2,
              "request": {"id": "af65fa0f00390009"}, "cache": {"l1_key": "4093609377352800"},
              "spans": [{"span_id": "af65fa0f00390009", "parent_span_id": "4093609377352800"}],
              "model": {"sha256": "4093609377352800" * 4}, "registry_digest": "af65fa0f" * 8}
    assert sanitize(record) == record
    # Not hex, or not an id key: scanned as any text.
    assert sanitize({"request_id": "card 4093 6093 7735 2800"})["request_id"] == \
        "card [REDACTED:card]"
    assert sanitize({"note": "4093609377352800"})["note"] == "[REDACTED:card]"
    assert sanitize({"session_id": "my password is Hunter2024!"})["session_id"] == \
        "my password is [REDACTED:spoken_secret]"


@settings(max_examples=300, deadline=None)
@given(ids=st.lists(st.integers(0, 2**64 - 1), min_size=1, max_size=20))
def test_no_random_request_id_is_ever_redacted(ids: list[int]) -> None:
    from orion_fsm.services.observability._sanitize import sanitize

    records = [{"request_id": f"{i:016x}", "result": {"request_id": f"{i:016x}"}} for i in ids]
    assert sanitize(records) == records
