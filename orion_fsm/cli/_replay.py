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

from orion_fsm import OrionError, find_traces
from orion_fsm.replay import ReplayReport, replay, steps


def add_parser(sub: Any) -> None:
    command = sub.add_parser(
        "replay", help="replay recorded requests and check they take the same path "
        "(PASS, or the first divergence; exit 1 if any diverged)")
    command.add_argument("file", nargs="?", help="JSONL trace file (default: the latest "
                         "records of the default trace file, see `trace show`; with --request, "
                         "its rotated files too)")
    command.add_argument("--request", help="only this request (an id or its first characters)")
    command.add_argument("--live", action="store_true", help="generate with the real models "
                         "(recorded seeds) and compare the outputs token by token")
    command.add_argument("--machine", help="replay on this statechart instead of "
                         "machines/request.scxml (to see what a change would do)")
    command.add_argument("--threshold", action="append", default=[], metavar="AGENT=SCORE",
                         type=_threshold,
                         help="embedding routing threshold of an agent (repeatable)")
    command.add_argument("--json", action="store_true", help="one JSON object per request")
    command.add_argument("--step", action="store_true", help="phase by phase, what each phase "
                         "received and decided, and whether the replay agreed")
    command.add_argument("--until", metavar="STATE", help="with --step: stop after this state")
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


def step_lines(report: ReplayReport, *, until: str | None = None) -> list[str]:
    """The request's header, each phase as a step, then the replay's verdict."""
    record = report.recorded
    result = record.get("result") or {}
    reason = f" ({result['error_reason']})" if result.get("error_reason") else ""
    how = "streamed" if record.get("streaming") else "infer"
    lines = [f"request {report.request_id} · recorded {result.get('state')}{reason} · agent "
             f"{result.get('agent') or '-'} · {how}"]
    shown = steps(report, until=until)
    for step in shown:
        lines += step.lines()
    if until is not None and not any(step.state == until for step in shown):
        lines.append(f"(the request never entered {until})")
    lines += report_lines(report)
    return lines


async def _replay(args: argparse.Namespace) -> int:
    if args.until and not args.step:
        raise OrionError("--until needs --step: `orion-fsm replay FILE --step --until STATE`")
    path = Path(args.file) if args.file else None
    records = await anyio.to_thread.run_sync(find_traces, path, args.request)
    thresholds = dict(args.threshold) or None
    failed = 0
    for record in records:
        report = await replay(record, registry=args.registry, machine=args.machine,
                              thresholds=thresholds, live=args.live, cache_dir=args.cache_dir)
        failed += not report.ok
        if args.step:
            print("\n".join(step_lines(report, until=args.until)))
        elif args.json:
            print(json.dumps(report.as_dict(), ensure_ascii=False))
        else:
            print("\n".join(report_lines(report)))
        sys.stdout.flush()
    if not args.json and len(records) > 1:
        print(f"{len(records) - failed} of {len(records)} requests replayed identically")
    return 1 if failed else 0
