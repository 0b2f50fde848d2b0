"""A virtual agent's request replays: each member's region, its early stop and the fusion;
a member that answers otherwise is named by its region."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from orion_fsm import Engine, Registry
from orion_fsm.testing.faults import faulty_loader
from orion_fsm.testing.replay import assert_replays, replay

pytestmark = pytest.mark.anyio
MakeEngine = Callable[..., Engine]
Recorded = Callable[[], list[dict[str, Any]]]


def _with_virtual(doc: dict[str, Any], *, solution: str = "conversation",
                  policy: str = "none") -> dict[str, Any]:
    return {**doc, "virtual_agents": [{
        "id": "duo", "description": "two members",
        "members": [{"agent": solution, "role": "solution"},
                    {"agent": "code", "role": "explanation"}],
        "early_stop": {"policy": policy, "threshold": 0.0}}]}


async def test_both_members_replay_region_by_region(
    make_engine: MakeEngine, registry_doc: dict[str, Any], recorded: Recorded,
) -> None:
    doc = _with_virtual(registry_doc)
    async with make_engine(doc) as engine:
        await engine.infer("hello", agent="duo")
    (record,) = recorded()
    report = await assert_replays(record, registry=Registry.from_dict(doc))
    assert report.replayed is not None
    assert report.replayed["result"]["text"] == record["result"]["text"]


async def test_an_early_stop_replays_with_the_recorded_confidence(
    make_engine: MakeEngine, registry_doc: dict[str, Any], recorded: Recorded,
) -> None:
    doc = _with_virtual(registry_doc, policy="first_confident")
    doc["agents"][0]["generation"] = {"max_tokens": 8, "temperature": 0, "top_k": 1,
                                      "stop": ["/"]}
    hang = faulty_loader(1.0, kinds=("hang",), only=("medium",))
    async with make_engine(doc, load_model=hang) as engine:
        result = await engine.infer("hello", agent="duo")
    assert [m.state for m in result.members] == ["done", "stopped"]
    (record,) = recorded()
    report = await assert_replays(record, registry=Registry.from_dict(doc))
    assert report.replayed is not None
    replayed = report.replayed["virtual"]["early_stop"]
    assert replayed["taken"] and replayed["confidence"] == pytest.approx(
        record["virtual"]["early_stop"]["confidence"], abs=1e-3)


async def test_a_member_fallback_replays(
    make_engine: MakeEngine, registry_doc: dict[str, Any], recorded: Recorded,
) -> None:
    doc = _with_virtual(registry_doc, solution="broken")
    async with make_engine(doc) as engine:
        await engine.infer("hello", agent="duo")
    (record,) = recorded()
    await assert_replays(record, registry=Registry.from_dict(doc))


async def test_a_member_that_answers_otherwise_is_named_by_its_region(
    make_engine: MakeEngine, registry_doc: dict[str, Any], recorded: Recorded,
    tmp_path: Path,
) -> None:
    doc = _with_virtual(registry_doc)
    async with make_engine(doc) as engine:
        await engine.infer("hello", agent="duo")
    (record,) = recorded()
    # The explanation's model failed to load this time: its region takes another path.
    edited = json.loads(json.dumps(record))
    for span in edited["spans"]:
        if span["name"] == "explanation_loading":
            span["attributes"]["orion.load_error"] = "model file not found: gone"
            span["attributes"].pop("orion.model.sha256", None)
    report = await replay(edited, registry=Registry.from_dict(doc))
    assert report.first is not None and report.first.state == "explanation"
    assert "region explanation" in report.first.field


@pytest.mark.parametrize(("threshold", "max_tokens", "generation", "joined"), [
    (0.0, 96, {"max_tokens": 8, "temperature": 0, "top_k": 1, "stop": ["/"]}, None),
    (1.0, 96, {"max_tokens": 8, "temperature": 0, "top_k": 1, "stop": ["/"]}, "leader done"),
    (0.0, 4, {"max_tokens": 60, "temperature": 0, "top_k": 1}, "leader past 4 tokens"),
], ids=["stopped-before-joining", "joined-at-leader-end", "joined-mid-leader"])
async def test_a_leader_first_schedule_replays_with_its_joins(
    make_engine: MakeEngine, registry_doc: dict[str, Any], recorded: Recorded,
    threshold: float, max_tokens: int, generation: dict[str, Any], joined: str | None,
) -> None:
    doc = _with_virtual(registry_doc, policy="leader_first")
    doc["virtual_agents"][0]["early_stop"].update(threshold=threshold, max_tokens=max_tokens)
    doc["agents"][0]["generation"] = generation
    async with make_engine(doc) as engine:
        await engine.infer("hello", agent="duo")
    (record,) = recorded()
    assert (record["virtual"]["joins"].get("explanation") or {}).get("why") == joined
    report = await assert_replays(record, registry=Registry.from_dict(doc))
    assert report.replayed is not None
    assert report.replayed["virtual"]["joins"].keys() == record["virtual"]["joins"].keys()
    assert [m["state"] for m in report.replayed["virtual"]["members"]] == [
        m["state"] for m in record["virtual"]["members"]]


@pytest.mark.parametrize(("prompt", "solution", "max_tokens", "joined"), [
    ("```", "code", 40, "leader opened a code block at token"),
    ("hello", "conversation", 6, None),
], ids=["joined-on-a-code-block", "stopped-when-cut-before-any-follower"])
async def test_a_leader_first_verdict_replays_with_when_it_was_taken(
    make_engine: MakeEngine, registry_doc: dict[str, Any], recorded: Recorded,
    prompt: str, solution: str, max_tokens: int, joined: str | None,
) -> None:
    doc = _with_virtual(registry_doc, solution=solution, policy="leader_first")
    doc["virtual_agents"][0]["members"][1]["agent"] = (
        "conversation" if solution == "code" else "code")
    doc["virtual_agents"][0]["early_stop"]["code_within"] = 32
    leader = next(a for a in doc["agents"] if a["id"] == solution)
    leader["generation"] = {"max_tokens": max_tokens, "temperature": 0, "top_k": 1}
    async with make_engine(doc) as engine:
        await engine.infer(prompt, agent="duo")
    (record,) = recorded()
    why = (record["virtual"]["joins"].get("explanation") or {}).get("why")
    assert (why is None) if joined is None else why.startswith(joined)
    report = await assert_replays(record, registry=Registry.from_dict(doc))
    assert report.replayed is not None
    replayed, original = report.replayed["virtual"], record["virtual"]
    assert replayed["joins"].keys() == original["joins"].keys()
    for key in ("taken", "at_token", "code_at"):
        assert replayed["early_stop"][key] == original["early_stop"][key]
