"""`python -m bench`: run every benchmark and write bench/results/report.{json,md}.

Each benchmark returns a dict of figures and the target it checks; the report says
whether the target was met on this machine.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

from bench import (
    answers,
    batching,
    caches,
    context,
    embeddings,
    hostile,
    http,
    llama_cpp,
    loader,
    modelops,
    replay,
    resilience,
    routing,
    slots,
    spine,
    structured,
    tune,
    virtual,
)

RESULTS = Path(__file__).parent / "results"


def _markdown(report: dict[str, Any]) -> str:
    lines = [f"# orion_fsm benchmarks — {report['date']}", "",
             f"Machine: {report['machine']}", "",
             "| benchmark | figure | value | target | met |", "|---|---|---|---|---|"]
    for name, bench in report["benchmarks"].items():
        for check in bench.get("checks", []):
            lines.append(f"| {name} | {check['figure']} | {check['value']} | {check['target']} "
                         f"| {'yes' if check['met'] else 'NO'} |")
    lines.append("")
    for name, bench in report["benchmarks"].items():
        lines += [f"## {name}", "", "```json", json.dumps(bench, indent=2), "```", ""]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench")
    parser.add_argument("--only", help="run only the benchmarks whose name contains this")
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    args = parser.parse_args()
    every = {**spine.BENCHMARKS, **caches.BENCHMARKS, **loader.BENCHMARKS,
             **embeddings.BENCHMARKS, **routing.BENCHMARKS, **resilience.BENCHMARKS,
             **http.BENCHMARKS, **structured.BENCHMARKS, **replay.BENCHMARKS,
             **hostile.BENCHMARKS, **slots.BENCHMARKS,
             **context.BENCHMARKS, **modelops.BENCHMARKS, **tune.BENCHMARKS,
             **virtual.BENCHMARKS, **llama_cpp.BENCHMARKS, **answers.BENCHMARKS,
             **batching.BENCHMARKS}
    benchmarks = {name: fn for name, fn in every.items() if not args.only or args.only in name}
    report: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": f"{platform.machine()} {platform.processor() or ''} python "
                   f"{platform.python_version()}",
        "benchmarks": {},
    }
    for name, fn in benchmarks.items():
        print(f"[bench] {name} ...", file=sys.stderr, flush=True)
        try:
            report["benchmarks"][name] = fn(quick=args.quick)
        except Exception as exc:  # one broken benchmark must not hide the others' figures
            report["benchmarks"][name] = {"error": f"{type(exc).__name__}: {exc}", "checks": [
                {"figure": "ran", "value": 0, "target": "completes", "met": False}]}
        for check in report["benchmarks"][name].get("checks", []):
            print(f"  {check['figure']}: {check['value']} (target {check['target']}, "
                  f"{'met' if check['met'] else 'NOT met'})", file=sys.stderr)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "report.json").write_text(json.dumps(report, indent=2), encoding="utf-8")
    (RESULTS / "report.md").write_text(_markdown(report), encoding="utf-8")
    print(f"wrote {RESULTS / 'report.md'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
