"""`orion-fsm replay`: drive a fresh request machine with a trace's recorded effects and check
that it takes the same path to the same output; `--live` generates with the real models.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import anyio

from orion_fsm import find_traces
from orion_fsm.replay import ReplayReport, replay


def add_parser(sub: Any) -> None:
    command = sub.add_parser(
        "replay", help="replay recorded requests and check they take the same path "
        "(PASS, or the first divergence; exit 1 if any diverged)")
    command.add_argument("file", help="JSONL trace file")
    command.add_argument("--request", help="only this request (an id or its first characters)")
    command.add_argument("--live", action="store_true", help="generate with the real models "
                         "(recorded seeds) and compare the outputs token by token")
    command.add_argument("--machine", help="replay on this statechart instead of "
                         "machines/request.scxml (to see what a change would do)")
    command.add_argument("--threshold", action="append", default=[], metavar="AGENT=SCORE",
                         type=_threshold,
                         help="embedding routing threshold of an agent (repeatable)")
    command.add_argument("--json", action="store_true", help="one JSON object per request")
    command.set_defaults(handler=lambda args: anyio.run(_replay, args))


def _threshold(pair: str) -> tuple[str, float]:
    agent, _, value = pair.partition("=")
    try:
        return agent, float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected AGENT=SCORE, got {pair!r}") from None


def report_lines(report: ReplayReport) -> list[str]:
    """PASS or FAIL with the first divergence, then what may explain it or was not compared."""
    lines = [report.summary()]
    lines += [f"  warning: {w}" for w in report.warnings]
    lines += [f"  not compared: {s}" for s in report.skipped]
    return lines


async def _replay(args: argparse.Namespace) -> int:
    path = Path(args.file)
    records = await anyio.to_thread.run_sync(find_traces, path, args.request)
    thresholds = dict(args.threshold) or None
    failed = 0
    for record in records:
        report = await replay(record, registry=args.registry, machine=args.machine,
                              thresholds=thresholds, live=args.live, cache_dir=args.cache_dir)
        failed += not report.ok
        if args.json:
            print(json.dumps(report.as_dict(), ensure_ascii=False))
        else:
            print("\n".join(report_lines(report)))
        sys.stdout.flush()
    if not args.json and len(records) > 1:
        print(f"{len(records) - failed} of {len(records)} requests replayed identically")
    return 1 if failed else 0
