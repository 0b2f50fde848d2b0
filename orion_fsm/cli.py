"""`orion-fsm`: the command line on top of the public API (run, models)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anyio

from . import Engine, OrionError, Registry, RequestFailed, Result
from .services._registry import AgentSpec

_BAR_WIDTH = 40


class _Progress:
    """Conversion/load progress as tqdm bars on stderr, one per stage."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._bars: dict[str, Any] = {}

    def __call__(self, stage: str, done: int, total: int) -> None:
        if not self.enabled:
            return
        from tqdm import tqdm  # only the CLI draws bars

        bar = self._bars.get(stage)
        if bar is None:
            bar = self._bars[stage] = tqdm(total=total or None, desc=stage, unit="B",
                                           unit_scale=True, leave=False, file=sys.stderr)
        bar.update(done - bar.n)
        if total and done >= total:
            bar.close()

    def close(self) -> None:
        for bar in self._bars.values():
            bar.close()


def _timeline(result: Result) -> str:
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
    if result.error:
        lines.append(f"  error ({result.error_reason}): {result.error}")
    return "\n".join(lines)


async def _run(args: argparse.Namespace) -> int:
    progress = _Progress(enabled=not args.json and sys.stderr.isatty())
    engine = Engine(registry=args.registry, trace_path=args.trace_file, progress=progress,
                    cache_dir=args.cache_dir)
    params: dict[str, Any] = {"agent": args.agent, "max_tokens": args.max_tokens,
                              "temperature": args.temperature, "seed": args.seed,
                              "stop": args.stop or None, "system": args.system}
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
                print(_timeline(failed), file=sys.stderr)
            print(f"orion-fsm: error ({exc.reason}): {exc.message}", file=sys.stderr)
            return 1
    progress.close()
    if args.json:
        print(json.dumps(result.as_dict(), ensure_ascii=False))
    else:
        print(_timeline(result))
    return 0


def _agent_row(spec: AgentSpec) -> dict[str, Any]:
    return {"id": spec.id, "role": spec.role, "model": spec.model.describe(),
            "context_length": spec.context_length, "fallback": spec.fallback,
            "ram_estimate_mb": spec.ram_estimate_mb}


def _models(args: argparse.Namespace) -> int:
    registry = Registry.load(args.registry)
    if args.models_command == "validate":
        print(f"ok: {len(registry.agents)} agents, default {registry.default_agent!r}, "
              f"digest {registry.digest[:16]}")
        return 0
    if args.models_command == "list":
        rows = [_agent_row(s) for s in registry.agents.values()]
        if args.json:
            print(json.dumps(rows, indent=2))
        else:
            for r in rows:
                default = "*" if r["id"] == registry.default_agent else " "
                print(f"{default} {r['id']:<14} {r['role']:<14} ctx {r['context_length']:<6} "
                      f"fallback {r['fallback'] or '-':<14} {r['model']}")
        return 0
    if args.models_command == "show":
        spec = registry.get(args.agent)
        shown = {**_agent_row(spec), "description": spec.description,
                 "capabilities": list(spec.capabilities), "system_prompt": spec.system_prompt,
                 "generation": {k: getattr(spec.generation, k) for k in
                                ("max_tokens", "temperature", "top_k", "top_p",
                                 "repetition_penalty", "seed", "stop")},
                 "quantization": [{"name": q.name, "bits": q.bits, "source": q.source.describe()}
                                  for q in spec.quantization],
                 "fallback_chain": list(registry.fallback_chain(spec.id)),
                 "routing": {"keywords": list(spec.routing.keywords),
                             "patterns": list(spec.routing.patterns),
                             "examples": len(spec.routing.examples)}}
        print(json.dumps(shown, indent=2, ensure_ascii=False))
        return 0
    # convert: prepare every distinct model file now, with a progress bar.
    from ._engine import default_cache_dir
    from .backends import ensure_converted

    cache = Path(args.cache_dir) if args.cache_dir else default_cache_dir()
    progress = _Progress(enabled=sys.stderr.isatty())
    seen: set[Path] = set()
    for spec in registry.agents.values():
        if args.agent and spec.id != args.agent:
            continue
        source = spec.model.locate()
        if source in seen:
            continue
        seen.add(source)
        converted = ensure_converted(source, cache, progress=progress)
        print(f"{spec.id}: {converted.model_path} (source sha256 {converted.source_sha256[:16]})")
    progress.close()
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="orion-fsm", description=__doc__)
    parser.add_argument("--registry", help="models.json to use (default: the packaged one)")
    parser.add_argument("--cache-dir", help="where converted models are kept "
                        "(default: $ORION_FSM_CACHE or ~/.cache/orion-fsm)")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="answer one prompt, streaming, then print the phase timeline")
    run.add_argument("prompt")
    run.add_argument("--agent", help="serve with this agent instead of routing")
    run.add_argument("--system", help="system prompt (default: the agent's)")
    run.add_argument("--max-tokens", type=int)
    run.add_argument("--temperature", type=float)
    run.add_argument("--seed", type=int)
    run.add_argument("--stop", action="append", help="stop sequence (repeatable)")
    run.add_argument("--json", action="store_true", help="print one JSON object, no streaming")
    run.add_argument("--trace-file", default=os.environ.get("ORION_FSM_TRACE_FILE"),
                     help="JSONL trace file (default: traces/orion-fsm.jsonl)")

    models = sub.add_parser("models", help="the model registry")
    msub = models.add_subparsers(dest="models_command", required=True)
    lst = msub.add_parser("list", help="list agents")
    lst.add_argument("--json", action="store_true")
    show = msub.add_parser("show", help="show one agent")
    show.add_argument("agent")
    msub.add_parser("validate", help="validate the registry and exit")
    convert = msub.add_parser("convert", help="convert model files for the runtime now")
    convert.add_argument("--agent", help="only this agent's model")

    diagram = sub.add_parser("diagram", help="render the request statechart as Mermaid")
    diagram.add_argument("--output", help="write to this file instead of stdout")
    return parser


def _diagram(args: argparse.Namespace) -> int:
    from statemachine.contrib.diagram import formatter

    from ._machine import request_chart

    text = formatter.render(request_chart(), "mermaid")
    if args.output:
        Path(args.output).write_text(text, encoding="utf-8")
        print(f"wrote {args.output}")
    else:
        print(text)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "run":
            return anyio.run(_run, args)
        if args.command == "diagram":
            return _diagram(args)
        return _models(args)
    except OrionError as exc:
        print(f"orion-fsm: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
