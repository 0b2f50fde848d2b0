"""`orion-fsm breakers`: each circuit breaker, as the latest trace record saw it.

A breaker guards one model instance (file, variant, context) and is shared by the agents it
serves. A CLI process has no live engine, so the states come from the newest trace line that
carries a `breakers` field (`BreakerBoard.snapshot()`, keyed by model instance with its
`agents`); agents no recorded breaker names are shown with the configured defaults.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio

from orion_fsm import TRACE_FILE_ENV, BreakerConfig, Registry, default_trace_path

from ._remote import add_server_options, connect

_BLOCK = 1 << 16
# Older lines than this are history, not "the latest state": stop looking.
_MAX_LINES_SCANNED = 10_000


def add_parser(sub: Any) -> None:
    breakers = sub.add_parser("breakers", help="circuit breaker of each model instance and "
                              "the agents it serves (from the latest trace record)")
    breakers.add_argument("--trace-file", default=os.environ.get(TRACE_FILE_ENV),
                          help="JSONL trace file (default: $ORION_FSM_TRACE_FILE, else "
                          "$XDG_STATE_HOME/orion-fsm/traces/orion-fsm.jsonl)")
    breakers.add_argument("--json", action="store_true", help="print one JSON object")
    add_server_options(breakers)
    breakers.set_defaults(handler=_breakers)


def _lines_backwards(path: Path) -> Iterator[bytes]:
    """The file's lines, newest first, reading blocks from the end: trace files grow large."""
    with path.open("rb") as fh:
        fh.seek(0, os.SEEK_END)
        position = fh.tell()
        tail = b""
        while position > 0:
            step = min(_BLOCK, position)
            position -= step
            fh.seek(position)
            chunk = fh.read(step) + tail
            lines = chunk.split(b"\n")
            tail = lines.pop(0)  # may continue in the previous block
            yield from reversed(lines)
        yield tail


def latest_breakers(path: Path) -> dict[str, Any] | None:
    """The newest trace record with a `breakers` field, or None."""
    if not path.is_file():
        return None
    for scanned, line in enumerate(_lines_backwards(path)):
        if scanned >= _MAX_LINES_SCANNED:
            break
        if b'"breakers"' not in line:
            continue
        try:
            record = json.loads(line)
        except ValueError:  # a line cut short by a crash mid-write
            continue
        if isinstance(record, dict) and isinstance(record.get("breakers"), dict):
            return record
    return None


def _defaults(agents: list[str]) -> dict[str, dict[str, Any]]:
    config = BreakerConfig().as_dict()
    return {a: {"state": "closed", "consecutive_failures": 0, "window_calls": 0,
                "window_failures": 0, "failure_rate": 0.0, "opened_count": 0,
                "recovered_count": 0, "last_failure": None, "retry_at": None,
                "config": config, "agents": [a]} for a in agents}


async def _live(args: argparse.Namespace) -> dict[str, Any]:
    async with connect(args) as server:
        states: dict[str, Any] = (await server.get("/v1/orion/breakers"))["breakers"]
    return states


def _breakers(args: argparse.Namespace) -> int:
    if args.server is not None:  # the server's breakers, live
        live = anyio.run(_live, args)
        if args.json:
            print(json.dumps({"source": {"server": args.server}, "breakers": live},
                             indent=2, ensure_ascii=False))
        else:
            print(f"live from {args.server}")
            _table(live)
        return 0
    registry = Registry.load(args.registry)
    path = Path(args.trace_file) if args.trace_file else default_trace_path()
    record = latest_breakers(path)
    agents = list(registry.agents)
    states: dict[str, dict[str, Any]] = {}
    if record is not None:
        recorded: dict[str, Any] = record["breakers"]
        # Before trace version 3 breakers were keyed by agent: each served that one agent.
        states = {key: {**s, "agents": s.get("agents") or [key]}
                  for key, s in recorded.items() if isinstance(s, dict)}
        source = {"trace_file": str(path), "request_id": record.get("request_id"),
                  "recorded_at": record.get("started_at")}
    else:
        source = {"trace_file": str(path), "request_id": None, "recorded_at": None}
    served = {a for s in states.values() for a in s["agents"]}
    states.update(_defaults([a for a in agents if a not in served]))
    if args.json:
        print(json.dumps({"source": source, "breakers": states}, indent=2, ensure_ascii=False))
        return 0
    if record is None:
        config = BreakerConfig()
        print(f"no breaker state recorded in {path}; configured defaults: open when "
              f"{config.failure_rate_threshold:.0%} of the last {config.window_size} calls "
              f"failed (at least {config.minimum_calls} judged), "
              f"{config.half_open_probes} probe request(s) after {config.reset_after_s:g} s")
    else:
        when = record.get("started_at")
        shown = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(when)) if when else "?"
        print(f"as recorded in {path} by request {record.get('request_id')} at {shown}")
    _table(states)
    return 0


def _table(states: dict[str, Any]) -> None:
    # failed: failures / calls in the breaker's window (older records: consecutive failures)
    print(f"  {'breaker (model)':<28} {'state':<10} {'failed':>8} {'opened':>7} "
          f"{'recovered':>9}  {'retry at':<10} {'last failure':<18} agents")
    now = time.time()
    for key, s in states.items():
        retry_at = s.get("retry_at")
        retry = "-"
        if isinstance(retry_at, int | float):
            retry = "due" if retry_at <= now else time.strftime("%H:%M:%S",
                                                                time.localtime(retry_at))
        failed = (f"{s['window_failures']}/{s['window_calls']}" if "window_calls" in s
                  else str(s.get("consecutive_failures", 0)))
        print(f"  {key:<28} {s.get('state', '?'):<10} {failed:>8} "
              f"{s.get('opened_count', 0):>7} {s.get('recovered_count', 0):>9}  {retry:<10} "
              f"{s.get('last_failure') or '-':<18} {', '.join(s.get('agents') or [key])}")
