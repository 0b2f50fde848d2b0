"""Replay stays cheap: every shipped trace replayed (recorded mode) with no model loaded, its
time per request against the recorded request's own duration (timeouts included).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio

from bench._common import check, percentile
from orion_fsm import read_traces
from orion_fsm.backends import LoadedModel
from orion_fsm.replay import replay

TRACES = Path(__file__).parents[1] / "traces"


def replay_cost(quick: bool = False) -> dict[str, Any]:
    records = [r for path in sorted(TRACES.glob("*.jsonl")) for r in read_traces(path)]
    rounds = 3 if quick else 10
    loads = 0
    real_load = LoadedModel.load

    def counting_load(*args: Any, **kwargs: Any) -> LoadedModel:
        nonlocal loads
        loads += 1
        return real_load(*args, **kwargs)

    LoadedModel.load = counting_load  # type: ignore[method-assign]
    try:
        async def run() -> tuple[list[float], int]:
            took: list[float] = []
            passed = 0
            for record in records:  # warm: the tokenizers are read once per process
                await replay(record)
            for _ in range(rounds):
                for record in records:
                    started = time.perf_counter()
                    report = await replay(record)
                    took.append((time.perf_counter() - started) * 1e3)
                    passed += report.ok
            return took, passed

        took, passed = anyio.run(run)
    finally:
        LoadedModel.load = real_load  # type: ignore[method-assign]
    recorded = [float((r.get("result") or {}).get("total_ms") or 0.0) for r in records]
    p50 = percentile(took, 0.5)
    aborts = sum(1 for r in records if r.get("abort"))
    return {
        "records": len(records), "of_which_aborted": aborts, "rounds": rounds,
        "replay_ms_p50": round(p50, 2), "replay_ms_p95": round(percentile(took, 0.95), 2),
        "recorded_ms_median": round(statistics.median(recorded), 1),
        "recorded_ms_max": round(max(recorded), 1),
        "models_loaded": loads,
        "checks": [
            check("shipped trace records replayed identically (%)",
                  100.0 * passed / len(took), "100", passed == len(took)),
            check("models loaded by a recorded-mode replay", loads, "0", loads == 0),
            check("replay p50 per request (ms)", p50, "<= 50", p50 <= 50),
            check("recorded median / replay p50 (x faster)",
                  statistics.median(recorded) / p50 if p50 else 0.0, ">= 1",
                  statistics.median(recorded) >= p50),
        ],
    }


BENCHMARKS: dict[str, Callable[..., dict[str, Any]]] = {"replay_cost": replay_cost}
