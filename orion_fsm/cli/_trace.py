"""`orion-fsm trace show`: each request of a trace file as a waterfall of its phases, to scale,
and a summary (final states, p50/p99 per phase). The REPL's `/trace` uses the same renderer.
"""

from __future__ import annotations

import argparse
import math
import re
import shutil
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Final

from orion_fsm import find_traces

_LABEL: Final = 16  # phase names: serving_virtual is the longest
_MS: Final = 11
_MIN_BAR: Final = 10
_FULL, _THIN = "█", "▏"


def add_parser(sub: Any) -> None:
    trace = sub.add_parser("trace", help="read trace files (see README: Trace files)")
    commands = trace.add_subparsers(dest="trace_command", required=True)
    show = commands.add_parser("show", help="waterfall of each request's phases and a summary")
    show.add_argument("file", nargs="?", help="JSONL trace file (default: the latest "
                      "records of $ORION_FSM_TRACE_FILE, else "
                      "$XDG_STATE_HOME/orion-fsm/traces/orion-fsm.jsonl, and its rotated files)")
    show.add_argument("--request", help="only this request (an id or its first characters)")
    show.add_argument("--last", type=int, metavar="N", help="waterfalls of the last N requests "
                      "only (the summary still covers them all)")
    show.add_argument("--width", type=int, help="bar width in columns (default: the terminal's)")
    show.add_argument("--summary", action="store_true", help="the summary only")
    show.set_defaults(handler=_show)


def _show(args: argparse.Namespace) -> int:
    records = find_traces(Path(args.file) if args.file else None, args.request)
    width = args.width or bar_width()
    shown = records if args.last is None else records[-args.last:] if args.last > 0 else []
    if not args.summary:
        for record in shown:
            print(terminal_safe(waterfall(record, width)))
            print()
    print(terminal_safe(summary(records)))
    return 0


# Control characters (escape sequences: cursor moves, colours, a terminal title...) other
# than newline: a trace holds what callers sent, and must not drive the reader's terminal.
_CONTROL: Final = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def terminal_safe(text: str) -> str:
    """`text` with control characters shown as escapes (\\x1b), never sent raw."""
    return _CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)


def bar_width(columns: int | None = None) -> int:
    """The bar width that fits the terminal beside the phase name and duration columns."""
    total = columns or shutil.get_terminal_size((100, 24)).columns
    return max(_MIN_BAR, total - _LABEL - _MS - 22)


def _total_ms(record: Mapping[str, Any]) -> float:
    result = record.get("result") or {}
    phases = record.get("phases") or []
    ends = [float(p.get("start_ms", 0)) + float(p.get("ms", 0)) for p in phases]
    return float(result.get("total_ms") or max(ends, default=0.0))


def waterfall(record: Mapping[str, Any], width: int = 60) -> str:
    """One request: a header line, then each phase as a bar placed and sized to scale, with
    the event that left it; a phase too short to fill a column still shows as a thin bar."""
    result: Mapping[str, Any] = record.get("result") or {}
    phases: Sequence[Mapping[str, Any]] = record.get("phases") or []
    transitions: Sequence[Mapping[str, Any]] = record.get("transitions") or []
    total = _total_ms(record)
    tokens = result.get("tokens") or {}
    agent = result.get("agent") or "-"
    if result.get("fallback") and result.get("agent"):
        agent += f" (fallback from {result.get('requested_agent')})"
    via = f" · {result['cache']}" if result.get("cache") else ""
    lines = [f"request {record.get('request_id', '?')} · {result.get('state', '?')} · {agent}"
             f"{via} · {total:.1f} ms · {tokens.get('input', 0)} in / "
             f"{tokens.get('output', 0)} out"]
    scale = width / total if total > 0 else 0.0
    # A parallel state's regions move on their own: their transitions are drawn as lanes.
    transitions = [t for t in transitions if t.get("region") is None]
    for k, phase in enumerate(phases):
        start, ms = float(phase.get("start_ms", 0)), float(phase.get("ms", 0))
        left = min(width - 1, int(start * scale))
        cells = ms * scale
        bar = _FULL * min(width - left, round(cells)) if cells >= 0.5 else _THIN
        event = transitions[k + 1].get("event") if k + 1 < len(transitions) else ""
        lines.append(f"  {phase.get('state')!s:<{_LABEL}}{ms:>{_MS}.1f} ms "
                     f"|{' ' * left}{bar:<{width - left}}| {event}")
        if phase.get("state") == "serving_virtual":
            members = (record.get("virtual") or {}).get("members") or []
            lines += lanes(members, total, width)
    if result.get("error"):
        lines.append(f"  error ({result.get('error_reason')}): {result['error']}")
    return "\n".join(lines)


_LANE_MARKS: Final = {"loading": "░", "generating": "█"}
_ENDS: Final = {"done": "✓", "failed": "✗", "stopped": "■"}
_WAITING: Final = "·"  # a follower waiting for the leader (leader_first)
_VERDICT: Final = "◆"  # where the early-stop verdict was taken


def lanes(members: Sequence[Mapping[str, Any]], total_ms: float, width: int,
          lead: int = _LABEL + _MS + 7) -> list[str]:
    """A virtual agent's regions side by side in time, one lane each on the request's scale
    (`lead` columns before its bar): · waiting for the leader, ░ loading, █ generating, then
    how the region ended (✓ done, ✗ failed, ■ stopped); ◆ where the early-stop verdict was
    taken, explained on a line below its lane."""
    scale = width / total_ms if total_ms > 0 else 0.0
    lines = []
    for k, member in enumerate(members):
        cells = [" "] * width
        last = 0
        for phase in member.get("phases") or []:
            kind = str(phase.get("state", "")).rsplit("_", 1)[-1]
            start = float(phase.get("start_ms", 0))
            left = min(width - 1, int(start * scale))
            right = min(width, max(left + 1, round((start + float(phase.get("ms", 0))) * scale)))
            for i in range(left, right):
                cells[i] = _LANE_MARKS.get(kind, "▒")
            last = right
        if member.get("joined_ms") is not None:  # leader_first: waited for the leader
            start = float(member.get("start_ms") or 0)
            left = min(width - 1, int(start * scale))
            for i in range(left, min(width, round(float(member["joined_ms"]) * scale))):
                cells[i] = _WAITING
        state = str(member.get("state", "?"))
        if last < width:
            cells[last] = _ENDS.get(state, "?")
        if member.get("verdict_ms") is not None:  # where its early-stop verdict was taken
            at = min(width - 1, int(float(member["verdict_ms"]) * scale))
            if cells[at] not in _ENDS.values():
                cells[at] = _VERDICT
        confidence = member.get("confidence")
        sure = "" if confidence is None else f" · confidence {float(confidence):.3f}"
        used = " · in answer" if member.get("used") else ""
        tree = "└" if k == len(members) - 1 else "├"
        label = f"   {tree} {member.get('role', '?')}"
        lines.append(f"{label:<{lead - 1}}|{''.join(cells)}| {state} · "
                     f"{member.get('agent', '?')} · "
                     f"{(member.get('tokens') or {}).get('output', 0)} tokens"
                     f" · weight {float(member.get('weight', 0)):.2f}{sure}{used}")
        if member.get("error"):
            lines.append(f"{'':<{lead}}{member['error']}")
        if member.get("verdict"):
            decided = member.get("verdict_ms")
            when = "" if decided is None else f" at {float(decided):.0f} ms"
            lines.append(f"{'':<{lead}}◆ early stop{when}, "
                         f"{(member.get('tokens') or {}).get('output', 0)} tokens: "
                         f"{member['verdict']}")
    return lines


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100) of a non-empty sequence."""
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[rank - 1]


def summary(records: Iterable[Mapping[str, Any]]) -> str:
    """Counts by final state (and error reason), then count, p50 and p99 of each phase."""
    records = list(records)
    if not records:
        return "no requests"
    results = [r.get("result") or {} for r in records]
    states = Counter(str(r.get("state")) for r in results)
    reasons = Counter(str(r.get("error_reason")) for r in results if r.get("state") == "error")
    parts = []
    for state in sorted(states, key=lambda s: (s != "success", s)):
        part = f"{states[state]} {state}"
        if state == "error":
            part += " (" + ", ".join(f"{n} {why}" for why, n in reasons.most_common()) + ")"
        parts.append(part)
    extra = []
    cached = sum(1 for r in results if r.get("cache"))
    fallbacks = sum(1 for r in results if r.get("fallback"))
    if cached:
        extra.append(f"{cached} served from cache")
    if fallbacks:
        extra.append(f"{fallbacks} after a fallback")
    lines = [f"{len(records)} request{'s' if len(records) != 1 else ''}: " + ", ".join(parts)
             + ("" if not extra else " · " + ", ".join(extra))]
    durations: dict[str, list[float]] = {}
    for record in records:
        for phase in record.get("phases") or []:
            durations.setdefault(str(phase.get("state")), []).append(float(phase.get("ms", 0)))
    durations["total"] = [_total_ms(r) for r in records]
    lines.append(f"  {'phase':<{_LABEL}}{'count':>7}{'p50 ms':>{_MS}}{'p99 ms':>{_MS}}")
    for state, values in durations.items():
        lines.append(f"  {state:<{_LABEL}}{len(values):>7}{percentile(values, 50):>{_MS}.1f}"
                     f"{percentile(values, 99):>{_MS}.1f}")
    return "\n".join(lines)
