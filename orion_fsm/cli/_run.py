"""`orion-fsm run`: answer one prompt, streaming, then print the phase timeline."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

import anyio

from orion_fsm import TRACE_FILE_ENV, Engine, RequestFailed, Result

from ._common import Progress, add_format_options, add_rerank_option, format_request
from ._remote import add_server_options, connect
from ._trace import lanes

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
    run.add_argument("--context-top-k", type=int, metavar="K",
                     help="chunks to retrieve with --context (default 8, as many as fit go in): "
                     "fewer make a shorter prompt, read sooner")
    add_rerank_option(run)
    run.add_argument("--router", choices=("embedding", "rules"), default="embedding",
                     help="how to pick the agent when --agent is not given (default: embedding)")
    run.add_argument("--trace-file", default=os.environ.get(TRACE_FILE_ENV),
                     help="JSONL trace file (default: $ORION_FSM_TRACE_FILE, else "
                     "$XDG_STATE_HOME/orion-fsm/traces/orion-fsm.jsonl)")
    add_server_options(run)
    add_format_options(run)
    run.set_defaults(handler=lambda args: anyio.run(_run if args.server is None else _remote,
                                                    args))


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
        lines.append(f"  {p.state:<16} {p.ms:>10.1f} ms  |{bar:<{_BAR_WIDTH}}|")
        if p.state == "serving_virtual":  # the members' regions, side by side in time
            lines += lanes([m.as_dict() for m in result.members], total, _BAR_WIDTH, lead=35)
    lines.append(f"  {'total':<16} {result.total_ms:>10.1f} ms")
    for i, c in enumerate(result.citations, 1):
        lines.append(f"  [{i}] {c.store}: {c.document} #{c.position} (chunk {c.chunk_id})")
    if result.error:
        lines.append(f"  error ({result.error_reason}): {result.error}")
    return "\n".join(lines)


def _failed(exc: RequestFailed, args: argparse.Namespace) -> int:
    failed = exc.result
    if args.json and isinstance(failed, Result):
        print(json.dumps(failed.as_dict(), ensure_ascii=False))
    elif isinstance(failed, Result):
        print(timeline(failed), file=sys.stderr)
    print(f"orion-fsm: error ({exc.reason}): {exc.message}", file=sys.stderr)
    return 1


def _done(result: Result, args: argparse.Namespace) -> int:
    if args.json:
        print(json.dumps(result.as_dict(), ensure_ascii=False))
    else:
        for call in result.tool_calls:
            print(f"\n→ tool call {call.name}({json.dumps(dict(call.arguments))})")
        print(timeline(result))
    return 0


async def _remote(args: argparse.Namespace) -> int:
    """The same request through a running server: its Engine, models and caches are warm."""
    messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
        {"role": "user", "content": args.prompt}]
    body: dict[str, Any] = {"model": args.agent or "auto", "messages": messages}
    body.update({k: v for k, v in (("max_tokens", args.max_tokens),
                                   ("temperature", args.temperature), ("seed", args.seed),
                                   ("stop", args.stop), ("context", args.context),
                                   ("context_top_k", args.context_top_k)) if v is not None})
    body.update(format_request(args))
    async with connect(args) as server:
        try:
            if args.json:
                return _done(await server.chat(body), args)
            result: Result | None = None
            async for item in server.stream_chat(body):
                if isinstance(item, Result):
                    result = item
                else:
                    sys.stdout.write(item)
                    sys.stdout.flush()
        except RequestFailed as exc:
            return _failed(exc, args)
    if result is None:
        print(f"orion-fsm: {args.server} ended the stream without a result", file=sys.stderr)
        return 1
    return _done(result, args)


async def _run(args: argparse.Namespace) -> int:
    progress = Progress(enabled=not args.json and sys.stderr.isatty())
    # A one-shot command: no warm-up of embeddings nobody else will use.
    engine = Engine(registry=args.registry, trace_path=args.trace_file, progress=progress,
                    embeddings=None if args.router == "embedding" else False, warm_up=False,
                    rerank=args.rerank,
                    cache_dir=args.cache_dir)
    params: dict[str, Any] = {"agent": args.agent, "max_tokens": args.max_tokens,
                              "temperature": args.temperature, "seed": args.seed,
                              "stop": args.stop or None, "system": args.system,
                              **format_request(args), "context": args.context,
                              "context_top_k": args.context_top_k}
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
            return _failed(exc, args)
    progress.close()
    return _done(result, args)
