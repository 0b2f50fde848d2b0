"""`orion-fsm run`: answer one prompt, streaming, then print the phase timeline."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

import anyio

from orion_fsm import TRACE_FILE_ENV, Engine, RequestFailed, Result

from ._common import Progress

_BAR_WIDTH = 40


def add_parser(sub: Any) -> None:
    run = sub.add_parser("run", help="answer one prompt, streaming, then print the phase timeline")
    run.add_argument("prompt")
    run.add_argument("--agent", help="serve with this agent instead of routing")
    run.add_argument("--system", help="system prompt (default: the agent's)")
    run.add_argument("--max-tokens", type=int)
    run.add_argument("--temperature", type=float)
    run.add_argument("--seed", type=int)
    run.add_argument("--stop", action="append", help="stop sequence (repeatable)")
    run.add_argument("--json", action="store_true", help="print one JSON object, no streaming")
    run.add_argument("--context", metavar="NAME",
                     help="answer from this context store (`orion-fsm context add`): its best "
                     "chunks go into the prompt and are cited")
    run.add_argument("--router", choices=("embedding", "rules"), default="embedding",
                     help="how to pick the agent when --agent is not given (default: embedding)")
    run.add_argument("--trace-file", default=os.environ.get(TRACE_FILE_ENV),
                     help="JSONL trace file (default: traces/orion-fsm.jsonl)")
    run.set_defaults(handler=lambda args: anyio.run(_run, args))


def timeline(result: Result) -> str:
    total = max(result.total_ms, 1e-9)
    lines = [f"\n── {result.state} · agent {result.agent}"
             f"{' (fallback from ' + str(result.requested_agent) + ')' if result.fallback else ''}"
             f" · {result.tokens.input} tokens in, {result.tokens.output} out"
             f" · ttft {'-' if result.ttft_ms is None else f'{result.ttft_ms:.0f} ms'}"
             f" · trace {result.trace_id}"]
    for p in result.phases:
        start = int(p.start_ms / total * _BAR_WIDTH)
        width = max(1, int(p.ms / total * _BAR_WIDTH))
        bar = " " * start + "█" * min(width, _BAR_WIDTH - start)
        lines.append(f"  {p.state:<14} {p.ms:>10.1f} ms  |{bar:<{_BAR_WIDTH}}|")
    lines.append(f"  {'total':<14} {result.total_ms:>10.1f} ms")
    for i, c in enumerate(result.citations, 1):
        lines.append(f"  [{i}] {c.store}: {c.document} #{c.position} (chunk {c.chunk_id})")
    if result.error:
        lines.append(f"  error ({result.error_reason}): {result.error}")
    return "\n".join(lines)


async def _run(args: argparse.Namespace) -> int:
    progress = Progress(enabled=not args.json and sys.stderr.isatty())
    # A one-shot command: no warm-up of embeddings nobody else will use.
    engine = Engine(registry=args.registry, trace_path=args.trace_file, progress=progress,
                    embeddings=None if args.router == "embedding" else False, warm_up=False,
                    cache_dir=args.cache_dir)
    params: dict[str, Any] = {"agent": args.agent, "max_tokens": args.max_tokens,
                              "temperature": args.temperature, "seed": args.seed,
                              "stop": args.stop or None, "system": args.system,
                              "context": args.context}
    async with engine:
        try:
            if args.json:
                result = await engine.infer(args.prompt, **params)
            else:
                stream = engine.stream(args.prompt, **params)
                async for text in stream:
                    sys.stdout.write(text)
                    sys.stdout.flush()
                result = stream.result
        except RequestFailed as exc:
            progress.close()
            failed = exc.result
            if args.json and isinstance(failed, Result):
                print(json.dumps(failed.as_dict(), ensure_ascii=False))
            elif isinstance(failed, Result):
                print(timeline(failed), file=sys.stderr)
            print(f"orion-fsm: error ({exc.reason}): {exc.message}", file=sys.stderr)
            return 1
    progress.close()
    if args.json:
        print(json.dumps(result.as_dict(), ensure_ascii=False))
    else:
        print(timeline(result))
    return 0
