"""Recorded traces as regression tests: `replay_cases` parametrizes a test with the requests of
trace files, `assert_replays` fails it with the first divergence from the recording.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from orion_fsm import read_traces
from orion_fsm.replay import Divergence, ReplayReport, compare, replay

__all__ = ["Divergence", "ReplayReport", "assert_replays", "compare", "replay", "replay_cases"]


def replay_cases(*paths: str | Path) -> list[Any]:
    """One `pytest.param` per recorded request of the trace files, with ids `file:request`:

        @pytest.mark.parametrize("record", replay_cases("traces/success.jsonl"))
        async def test_recorded_requests_replay(record: dict[str, Any]) -> None:
            await assert_replays(record)
    """
    cases: list[Any] = []
    for path in map(Path, paths):
        cases += [pytest.param(record, id=f"{path.stem}:{record.get('request_id')}")
                  for record in read_traces(path)]
    return cases


async def assert_replays(record: Mapping[str, Any], **options: Any) -> ReplayReport:
    """Replay `record` (options as for `replay`) and fail with the first divergence, the
    warnings that may explain it and what was not compared; return the report if it passed."""
    report = await replay(record, **options)
    if not report.ok:
        lines = [report.summary(), *(f"  then: {d}" for d in report.divergences[1:]),
                 *(f"  warning: {w}" for w in report.warnings),
                 *(f"  not compared: {s}" for s in report.skipped)]
        raise AssertionError("\n".join(lines))
    return report
