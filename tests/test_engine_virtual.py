"""Virtual agents: members answer in parallel regions of the request machine, on real tiny
GGUF models; early stop, member fallback, fusion, cancellation, trace."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest

from orion_fsm import Engine, Registry, RegistryError, RequestFailed
from orion_fsm.testing.faults import faulty_loader
from tests.conftest import agent, assert_no_thread_leaked, read_trace_lines

pytestmark = pytest.mark.anyio
MakeEngine = Callable[..., Engine]

# The small model's greedy answer to "hello" starts "f/": stopping at "/" ends it at once
# with finish reason "stop", a well-formed answer for the early-stop checks.
_STOPS_EARLY = {"max_tokens": 8, "temperature": 0, "top_k": 1, "stop": ["/"]}
_LONG = {"max_tokens": 200, "temperature": 0, "top_k": 1}


def _virtual(solution: str = "conversation", explanation: str = "code", *,
             policy: str = "none", threshold: float = 0.0, fallback: str | None = None,
             **extra: Any) -> dict[str, Any]:
    return {"id": "duo", "description": "two members",
            "members": [{"agent": solution, "role": "solution", "weight": 0.6},
                        {"agent": explanation, "role": "explanation", "weight": 0.4}],
            "early_stop": {"policy": policy, "threshold": threshold},
            "fallback": fallback, **extra}


@pytest.fixture
def doc(registry_doc: dict[str, Any]) -> dict[str, Any]:
    return {**registry_doc, "virtual_agents": [_virtual()]}


def _trace(tmp_path: Path) -> list[dict[str, Any]]:
    return read_trace_lines(tmp_path / "traces" / "test.jsonl")


async def test_both_members_generate_in_their_own_regions(
    make_engine: MakeEngine, doc: dict[str, Any], tmp_path: Path,
) -> None:
    async with make_engine(doc) as engine:
        result = await engine.infer("hello", agent="duo")
    assert (result.state, result.agent) == ("success", "duo")
    solution, explanation = result.members
    assert [(m.role, m.agent, m.state) for m in result.members] == [
        ("solution", "conversation", "done"), ("explanation", "code", "done")]
    assert solution.tokens.output > 0 and explanation.tokens.output > 0
    assert result.tokens.output == solution.tokens.output + explanation.tokens.output
    assert [p.state for p in solution.phases] == ["solution_loading", "solution_generating"]
    assert [p.state for p in result.phases] == ["validating", "routing", "serving_virtual",
                                                "fusing"]
    (record,) = _trace(tmp_path)
    moves = {(t["source"], t["target"]) for t in record["transitions"]}
    assert {("solution_loading", "solution_generating"), ("solution_generating", "solution_done"),
            ("explanation_generating", "explanation_done"),
            ("serving_virtual", "fusing"), ("fusing", "success")} <= moves
    assert [m["state"] for m in record["virtual"]["members"]] == ["done", "done"]
    assert all(m["token_ids"] for m in record["virtual"]["members"])


async def test_region_spans_nest_under_the_parallel_phase(
    make_engine: MakeEngine, doc: dict[str, Any], spans: Any,
) -> None:
    async with make_engine(doc) as engine:
        await engine.infer("hello", agent="duo")
    finished = {s.name: s for s in spans[1].get_finished_spans()}
    parallel = finished["serving_virtual"].context.span_id
    for region in ("solution", "explanation"):
        span = finished[region]
        assert span.parent is not None and span.parent.span_id == parallel
        generating = finished[f"{region}_generating"]
        assert generating.parent is not None and generating.parent.span_id == span.context.span_id
    assert finished["explanation_generating"].attributes["gen_ai.request.model"] == "code"


async def test_fused_answer_is_the_solution_then_the_explanation(
    make_engine: MakeEngine, doc: dict[str, Any],
) -> None:
    async with make_engine(doc) as engine:
        result = await engine.infer("hello", agent="duo")
        chunks = [c async for c in engine.stream("hello", agent="duo")]
    solution, explanation = result.members
    assert result.text == f"{solution.text.strip()}\n\n{explanation.text.strip()}"
    assert (solution.used, explanation.used) == (True, True)
    assert (solution.weight, explanation.weight) == pytest.approx((0.6, 0.4))
    # Streaming: the solution is sent whole as soon as it is final, the explanation after.
    assert chunks == [solution.text.strip(), f"\n\n{explanation.text.strip()}"]


async def test_a_light_member_is_left_out_of_the_answer(
    make_engine: MakeEngine, registry_doc: dict[str, Any],
) -> None:
    doc = {**registry_doc, "virtual_agents": [_virtual(fusion={"min_weight": 0.5})]}
    async with make_engine(doc) as engine:
        result = await engine.infer("hello", agent="duo")
    assert [m.used for m in result.members] == [True, False]
    assert result.text == result.members[0].text.strip()


async def test_early_stop_ends_the_other_region_and_frees_its_slot(
    make_engine: MakeEngine, registry_doc: dict[str, Any], tmp_path: Path,
) -> None:
    doc = {**registry_doc, "virtual_agents": [_virtual(policy="first_confident")]}
    doc["agents"][0]["generation"] = _STOPS_EARLY
    hang = faulty_loader(1.0, kinds=("hang",), only=("medium",))  # the explanation's model
    threads_before = set(threading.enumerate())
    async with make_engine(doc, load_model=hang) as engine:
        result = await engine.infer("hello", agent="duo")
        assert all(s.running == 0 for s in engine.stats().models)
    await assert_no_thread_leaked(threads_before)
    solution, explanation = result.members
    assert (solution.state, explanation.state) == ("done", "stopped")
    assert solution.finish_reason == "stop" and solution.confidence is not None
    assert result.text == solution.text.strip() and not explanation.used
    (record,) = _trace(tmp_path)
    early = record["virtual"]["early_stop"]
    assert (early["by"], early["taken"]) == ("solution", True)
    assert early["confidence"] == pytest.approx(solution.confidence, abs=1e-4)
    assert {"event": "early_stop", "target": "explanation_stopped"}.items() <= next(
        t for t in record["transitions"] if t["event"] == "early_stop").items()
    parallel = next(p for p in record["phases"] if p["state"] == "serving_virtual")
    assert parallel["attributes"]["orion.virtual.early_stop.taken"] is True


async def test_an_unsure_first_answer_does_not_stop_the_other(
    make_engine: MakeEngine, registry_doc: dict[str, Any], tmp_path: Path,
) -> None:
    doc = {**registry_doc, "virtual_agents": [_virtual(policy="first_confident",
                                                       threshold=1.0)]}
    doc["agents"][0]["generation"] = _STOPS_EARLY
    async with make_engine(doc) as engine:
        result = await engine.infer("hello", agent="duo")
    assert [m.state for m in result.members] == ["done", "done"]
    (record,) = _trace(tmp_path)
    early = record["virtual"]["early_stop"]
    # Whichever member finished first: short of the threshold or not finished by a stop.
    assert early["taken"] is False
    assert "below 1.0" in early["why"] or "answer not finished" in early["why"]


async def test_leader_first_stops_the_follower_before_it_loads(
    make_engine: MakeEngine, registry_doc: dict[str, Any], tmp_path: Path,
) -> None:
    doc = {**registry_doc, "virtual_agents": [_virtual(policy="leader_first")]}
    doc["agents"][0]["generation"] = _STOPS_EARLY
    async with make_engine(doc) as engine:
        result = await engine.infer("hello", agent="duo")
        loaded = [s.model for s in engine.stats().models]
    solution, explanation = result.members
    assert (solution.state, explanation.state) == ("done", "stopped")
    # The follower never rendered its prompt nor took a slot of its model.
    assert explanation.tokens.input == 0 and explanation.joined_ms is None
    assert loaded and not any("medium" in model for model in loaded)
    (record,) = _trace(tmp_path)
    assert record["virtual"]["early_stop"]["taken"] is True
    assert record["virtual"]["joins"] == {}
    parallel = next(p for p in record["phases"] if p["state"] == "serving_virtual")
    assert parallel["attributes"]["orion.virtual.joins"] == ["explanation: never"]


async def test_leader_first_lets_the_follower_in_when_the_leader_is_unsure(
    make_engine: MakeEngine, registry_doc: dict[str, Any], tmp_path: Path,
) -> None:
    doc = {**registry_doc, "virtual_agents": [_virtual(policy="leader_first", threshold=1.0)]}
    doc["agents"][0]["generation"] = _STOPS_EARLY
    async with make_engine(doc) as engine:
        result = await engine.infer("hello", agent="duo")
    solution, explanation = result.members
    assert (solution.state, explanation.state) == ("done", "done")
    assert solution.total_ms is not None and explanation.joined_ms is not None
    assert explanation.joined_ms >= solution.start_ms + solution.total_ms - 1e-6
    assert explanation.tokens.output > 0 and result.text.startswith(solution.text.strip())
    (record,) = _trace(tmp_path)
    assert record["virtual"]["joins"]["explanation"]["why"] == "leader done"


async def test_leader_first_lets_the_follower_in_once_the_leader_is_too_long(
    make_engine: MakeEngine, registry_doc: dict[str, Any], tmp_path: Path,
) -> None:
    doc = {**registry_doc, "virtual_agents": [
        {**_virtual(policy="leader_first"),
         "early_stop": {"policy": "leader_first", "threshold": 0.0, "max_tokens": 4}}]}
    doc["agents"][0]["generation"] = _LONG
    async with make_engine(doc) as engine:
        result = await engine.infer("hello", agent="duo")
    solution, explanation = result.members
    assert (solution.state, explanation.state) == ("done", "done")
    assert solution.tokens.output > 4
    (record,) = _trace(tmp_path)
    assert record["virtual"]["joins"]["explanation"]["why"] == "leader past 4 tokens"
    # Let in while the leader still generated: the follower never waited for its end.
    assert explanation.joined_ms is not None and solution.total_ms is not None
    assert explanation.joined_ms < solution.start_ms + solution.total_ms
    assert not (record["virtual"]["early_stop"] or {}).get("taken")


def _code_leads(registry_doc: dict[str, Any], generation: dict[str, Any]) -> dict[str, Any]:
    """`duo` led by the code agent under leader_first, a follower let in at a code block within
    32 tokens. The medium model's greedy answer to "```" runs into a fence of tildes
    (CommonMark's other fence) after a few tokens: a composite answer showing itself early."""
    doc = {**registry_doc, "virtual_agents": [
        {**_virtual("code", "conversation"),
         "early_stop": {"policy": "leader_first", "threshold": 0.0, "code_within": 32}}]}
    doc["agents"][1]["generation"] = generation
    return doc


async def test_leader_first_lets_the_follower_in_when_the_leader_opens_a_code_block(
    make_engine: MakeEngine, registry_doc: dict[str, Any], tmp_path: Path,
) -> None:
    doc = _code_leads(registry_doc, {"max_tokens": 40, "temperature": 0, "top_k": 1})
    async with make_engine(doc) as engine:
        result = await engine.infer("```", agent="duo")
    solution, explanation = result.members
    assert (solution.state, explanation.state) == ("done", "done")
    assert solution.code_at is not None and solution.code_at <= 32
    (record,) = _trace(tmp_path)
    assert record["virtual"]["joins"]["explanation"]["why"] == (
        f"leader opened a code block at token {solution.code_at}")
    assert record["virtual"]["members"][0]["code_at"] == solution.code_at
    assert explanation.joined_ms is not None and explanation.tokens.output > 0
    assert solution.verdict is not None and solution.verdict.startswith("not taken")
    assert not record["virtual"]["early_stop"]["taken"]


async def test_leader_first_gives_its_verdict_after_a_follower_already_answered(
    make_engine: MakeEngine, registry_doc: dict[str, Any], tmp_path: Path,
) -> None:
    # The follower (its model already loaded), let in at the leader's early code fence,
    # answers one token and is done long before the leader's 200: the leader's verdict is
    # still given when it ends.
    doc = _code_leads(registry_doc, _LONG)
    doc["agents"][0]["generation"] = {"max_tokens": 1, "temperature": 0, "top_k": 1}
    async with make_engine(doc) as engine:
        await engine.infer("hello", agent="conversation")
        result = await engine.infer("```", agent="duo")
    solution, explanation = result.members
    assert (solution.state, explanation.state) == ("done", "done")
    assert explanation.joined_ms is not None and explanation.tokens.output == 1
    assert solution.verdict is not None and solution.verdict.startswith("not taken")
    record = _trace(tmp_path)[-1]
    assert record["virtual"]["early_stop"]["by"] == "solution"
    assert not record["virtual"]["early_stop"]["taken"]


async def test_leader_first_without_code_within_waits_for_the_leaders_end(
    make_engine: MakeEngine, registry_doc: dict[str, Any], tmp_path: Path,
) -> None:
    doc = {**registry_doc, "virtual_agents": [
        {**_virtual("code", "conversation"),
         "early_stop": {"policy": "leader_first", "threshold": 1.0}}]}
    doc["agents"][1]["generation"] = {"max_tokens": 40, "temperature": 0, "top_k": 1}
    async with make_engine(doc) as engine:
        result = await engine.infer("```", agent="duo")
    solution, explanation = result.members
    assert solution.code_at is not None  # seen, but not a reason to join here
    assert explanation.joined_ms is not None
    (record,) = _trace(tmp_path)
    assert record["virtual"]["joins"]["explanation"]["why"] == "leader done"


async def test_leader_first_ends_the_request_with_an_answer_cut_at_max_tokens(
    make_engine: MakeEngine, registry_doc: dict[str, Any], tmp_path: Path, spans: Any,
) -> None:
    # No follower started (no fence, within early_stop.max_tokens): the leader's answer,
    # cut at the caller's max_tokens, ends the request; a follower's would be cut as well.
    doc = {**registry_doc, "virtual_agents": [
        {**_virtual(), "early_stop": {"policy": "leader_first", "threshold": 0.0,
                                      "code_within": 32}}]}
    doc["agents"][0]["generation"] = {"max_tokens": 6, "temperature": 0, "top_k": 1}
    async with make_engine(doc) as engine:
        result = await engine.infer("hello", agent="duo")
    solution, explanation = result.members
    assert (solution.state, explanation.state) == ("done", "stopped")
    assert solution.finish_reason == "length" and explanation.tokens.input == 0
    (record,) = _trace(tmp_path)
    early = record["virtual"]["early_stop"]
    assert early["taken"] is True and early["at_token"] == 6
    assert early["why"].endswith("cut at 6 tokens before any follower started")
    assert early["at_ms"] == pytest.approx(solution.start_ms + (solution.total_ms or 0),
                                           abs=1e-2)
    assert solution.verdict == f"taken: {early['why']}"
    assert solution.verdict_ms == pytest.approx(early["at_ms"], abs=1e-2)
    parallel = next(s for s in spans[1].get_finished_spans() if s.name == "serving_virtual")
    assert parallel.attributes["orion.virtual.early_stop.at_token"] == 6
    assert parallel.attributes["orion.virtual.early_stop.at_ms"] == early["at_ms"]


async def test_first_confident_does_not_stop_on_an_answer_cut_at_max_tokens(
    make_engine: MakeEngine, registry_doc: dict[str, Any], tmp_path: Path,
) -> None:
    doc = {**registry_doc, "virtual_agents": [_virtual(policy="first_confident")]}
    for agent_doc in doc["agents"][:2]:
        agent_doc["generation"] = {"max_tokens": 6, "temperature": 0, "top_k": 1}
    async with make_engine(doc) as engine:
        result = await engine.infer("hello", agent="duo")
    assert [m.state for m in result.members] == ["done", "done"]
    (record,) = _trace(tmp_path)
    assert record["virtual"]["early_stop"]["why"] == "answer not finished (length)"


async def test_leader_first_starts_both_on_a_composite_request(
    make_engine: MakeEngine, registry_doc: dict[str, Any], tmp_path: Path,
) -> None:
    doc = {**registry_doc, "virtual_agents": [_virtual(
        policy="leader_first", routing={"patterns": [r"\bwrite\b.+\band explain\b"]})]}
    async with make_engine(doc) as engine:
        result = await engine.infer("write a loop and explain it", agent="duo")
    assert [m.state for m in result.members] == ["done", "done"]
    assert result.members[1].joined_ms is None
    (record,) = _trace(tmp_path)
    assert record["virtual"]["joins"]["explanation"]["why"].startswith("composite request")


async def test_leader_first_with_the_explanation_leading(
    make_engine: MakeEngine, registry_doc: dict[str, Any], tmp_path: Path,
) -> None:
    doc = {**registry_doc, "virtual_agents": [
        {**_virtual("code", "conversation"),
         "early_stop": {"policy": "leader_first", "threshold": 0.0, "leader": "explanation"}}]}
    doc["agents"][0]["generation"] = _STOPS_EARLY  # the explanation's agent: conversation
    async with make_engine(doc) as engine:
        result = await engine.infer("hello", agent="duo")
    solution, explanation = result.members
    assert (solution.state, explanation.state) == ("stopped", "done")
    assert solution.tokens.input == 0
    assert result.text == explanation.text.strip()
    (record,) = _trace(tmp_path)
    assert record["virtual"]["early_stop"]["by"] == "explanation"


async def test_a_failing_member_follows_its_fallback_while_the_other_serves(
    make_engine: MakeEngine, registry_doc: dict[str, Any], tmp_path: Path,
) -> None:
    # `broken` has no model file; its fallback chain goes on to `conversation`.
    doc = {**registry_doc, "virtual_agents": [_virtual(solution="broken")]}
    async with make_engine(doc) as engine:
        result = await engine.infer("hello", agent="duo")
    solution, explanation = result.members
    assert (solution.agent, solution.state) == ("conversation", "done")
    assert solution.agents_tried == ("broken", "conversation")
    assert explanation.state == "done" and not result.fallback
    (record,) = _trace(tmp_path)
    moves = [(t["source"], t["target"]) for t in record["transitions"]]
    assert ("solution_loading", "solution_loading") in moves  # its own retry


async def test_all_members_failing_is_an_error_naming_each_reason(
    make_engine: MakeEngine, registry_doc: dict[str, Any], tmp_path: Path,
) -> None:
    registry_doc["agents"] += [agent("gone1", tmp_path / "gone1.gguf"),
                               agent("gone2", tmp_path / "gone2.gguf")]
    doc = {**registry_doc, "virtual_agents": [_virtual("gone1", "gone2")]}
    async with make_engine(doc) as engine:
        with pytest.raises(RequestFailed) as caught:
            await engine.infer("hello", agent="duo")
    failed = caught.value.result
    assert failed is not None and failed.error_reason == "exhausted"
    assert "gone1" in (failed.error or "") and "gone2" in (failed.error or "")
    assert [m.state for m in failed.members] == ["failed", "failed"]
    (record,) = _trace(tmp_path)
    assert record["result"]["state"] == "error"
    assert [p["state"] for p in record["phases"]][-2:] == ["fusing", "fallback"]


async def test_the_virtual_agents_own_fallback_serves_when_no_member_did(
    make_engine: MakeEngine, registry_doc: dict[str, Any], tmp_path: Path,
) -> None:
    registry_doc["agents"] += [agent("gone1", tmp_path / "gone1.gguf"),
                               agent("gone2", tmp_path / "gone2.gguf")]
    doc = {**registry_doc, "virtual_agents": [_virtual("gone1", "gone2",
                                                       fallback="conversation")]}
    async with make_engine(doc) as engine:
        result = await engine.infer("hello", agent="duo")
    assert (result.agent, result.requested_agent, result.fallback) == (
        "conversation", "duo", True)
    assert result.agents_tried == ("duo", "conversation")


async def test_cancelling_the_caller_stops_every_member(
    make_engine: MakeEngine, doc: dict[str, Any], tmp_path: Path,
) -> None:
    hang = faulty_loader(1.0, kinds=("hang",))  # both members' generations hang
    threads_before = set(threading.enumerate())
    async with make_engine(doc, load_model=hang) as engine:
        with anyio.move_on_after(1.0) as scope:
            await engine.infer("hello", agent="duo")
        assert scope.cancelled_caught
        async with engine.stream("hello", agent="duo") as stream:
            with anyio.move_on_after(1.0):
                async for _ in stream:
                    pass
        assert all(s.running == 0 for s in engine.stats().models)
    await assert_no_thread_leaked(threads_before)
    records = _trace(tmp_path)
    assert [r["result"]["error_reason"] for r in records] == ["cancelled", "cancelled"]
    assert all(r["result"]["state"] == "error" for r in records)


async def test_the_deadline_ends_a_virtual_request_in_timeout(
    make_engine: MakeEngine, doc: dict[str, Any], tmp_path: Path,
) -> None:
    hang = faulty_loader(1.0, kinds=("hang",))
    threads_before = set(threading.enumerate())
    async with make_engine(doc, load_model=hang, timeout_s=1.0) as engine:
        with pytest.raises(RequestFailed) as caught:
            await engine.infer("hello", agent="duo")
        assert all(s.running == 0 for s in engine.stats().models)
    await assert_no_thread_leaked(threads_before)
    assert caught.value.reason == "timeout"
    (record,) = _trace(tmp_path)
    assert record["result"]["state"] == "error"
    assert len(record["virtual"]["members"]) == 2


async def test_a_machine_that_served_a_virtual_agent_serves_a_plain_request(
    make_engine: MakeEngine, doc: dict[str, Any],
) -> None:
    async with make_engine(doc) as engine:
        await engine.infer("hello", agent="duo")
        plain = await engine.infer("hello", agent="conversation")
    assert [p.state for p in plain.phases] == ["validating", "routing", "loading_agent",
                                               "inferencing"]
    assert plain.members == ()


async def test_a_virtual_agent_refuses_an_output_format(
    make_engine: MakeEngine, doc: dict[str, Any],
) -> None:
    async with make_engine(doc) as engine:
        with pytest.raises(RequestFailed) as caught:
            await engine.infer("hello", agent="duo", response_format={"type": "json_object"})
    assert caught.value.reason == "invalid"
    assert caught.value.result is not None
    assert caught.value.result.error_field == "response_format"


async def test_routing_patterns_claim_a_request_for_a_virtual_agent(
    make_engine: MakeEngine, registry_doc: dict[str, Any],
) -> None:
    doc = {**registry_doc, "virtual_agents": [_virtual(
        routing={"patterns": [r"\bwrite\b.{1,80}\band explain\b"]})]}
    async with make_engine(doc) as engine:
        result = await engine.infer("write a python function and explain it")
        plain = await engine.infer("write a python function")
    assert result.agent == "duo" and result.routing["runner_up"] == "code"
    assert plain.agent == "code"


def test_the_shipped_registry_has_code_plus_logic() -> None:
    spec = Registry.load().virtual["code+logic"]
    assert [(m.agent, m.role) for m in spec.members] == [("code", "solution"),
                                                         ("logic", "explanation")]
    assert sum(m.weight for m in spec.members) == pytest.approx(1.0)


@pytest.mark.parametrize(("change", "path", "message"), [
    ({"members": [{"agent": "nope", "role": "solution"},
                  {"agent": "code", "role": "explanation"}]},
     "$.virtual_agents[0].members[0].agent", "not an agent"),
    ({"members": [{"agent": "code", "role": "solution"},
                  {"agent": "code", "role": "solution"}]},
     "$.virtual_agents[0].members", "share the role"),
    ({"id": "code"}, "$.virtual_agents[0].id", "duplicate agent id"),
    ({"fallback": "nope"}, "$.virtual_agents[0].fallback", "not an agent"),
    ({"early_stop": {"policy": "leader_first", "code_within": -1}},
     "$.virtual_agents[0].early_stop.code_within", "an integer ≥ 0"),
])
def test_a_bad_virtual_agent_is_refused_with_its_path(
    registry_doc: dict[str, Any], change: dict[str, Any], path: str, message: str,
) -> None:
    doc = {**registry_doc, "virtual_agents": [{**_virtual(), **change}]}
    with pytest.raises(RegistryError, match=message) as caught:
        Registry.from_dict(doc)
    assert caught.value.json_path == path


async def test_a_members_instruction_ends_its_system_turn_whoever_serves_it(
    make_engine: MakeEngine, registry_doc: dict[str, Any],
) -> None:
    plain = {**registry_doc, "virtual_agents": [_virtual()]}
    told = _virtual()
    told["members"][0]["instruction"] = "Give only the result; the other member explains it."
    instructed = {**registry_doc, "virtual_agents": [told]}
    async with make_engine(plain) as engine:
        before = await engine.infer("hello", agent="duo", system="Be brief.")
    async with make_engine(instructed) as engine:
        after = await engine.infer("hello", agent="duo", system="Be brief.")
        spec = engine.registry.virtual["duo"]
    assert [m.instruction for m in spec.members] == [told["members"][0]["instruction"], None]
    # The solution's prompt grew by the instruction (after the caller's own system text);
    # the explanation member, told nothing, saw the same prompt as before.
    assert after.members[0].tokens.input > before.members[0].tokens.input + 8
    assert after.members[1].tokens.input == before.members[1].tokens.input
    assert after.members[1].text == before.members[1].text


def test_a_members_instruction_must_not_be_empty(registry_doc: dict[str, Any]) -> None:
    told = _virtual()
    told["members"][1]["instruction"] = ""
    with pytest.raises(RegistryError, match="instruction"):
        Registry.from_dict({**registry_doc, "virtual_agents": [told]})
