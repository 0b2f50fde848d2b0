"""The shipped traces (traces/*.jsonl) replay without any model file, and a changed routing
threshold or statechart diverges where it changes the path.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from orion_fsm._resources import data_file
from orion_fsm.backends import LoadedModel
from orion_fsm.services.models._registry import ModelSource
from orion_fsm.testing.replay import assert_replays, replay, replay_cases

pytestmark = pytest.mark.anyio

TRACES = Path(__file__).parents[2] / "traces"
SHIPPED = [TRACES / f"{name}.jsonl"
           for name in ("success", "cache-hit", "fallback", "invalid", "aborts")]


@pytest.fixture
def no_model_files(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to find or load a model file fails loudly."""

    def refuse(*args: object, **kwargs: object) -> Any:
        raise AssertionError("replay touched a model file")

    monkeypatch.setattr(ModelSource, "locate", refuse)
    monkeypatch.setattr(LoadedModel, "load", refuse)


def test_the_shipped_traces_cover_success_cache_hit_fallback_bad_input_and_aborts() -> None:
    records = {path.stem: [case.values[0] for case in replay_cases(path)] for path in SHIPPED}
    assert records["success"][0]["result"]["state"] == "success"
    assert records["cache-hit"][-1]["result"]["cache"] == "L1"
    fallback = records["fallback"][0]["result"]
    assert fallback["state"] == "success" and fallback["fallback"] is True
    assert {r["result"]["error_reason"] for r in records["invalid"]} == {"invalid"}
    aborts = [(r["abort"]["reason"], r["abort"]["await"]) for r in records["aborts"]]
    assert aborts == [("cancelled", "generate"), ("overloaded", "admission"),
                      ("timeout", "generate")]


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
