"""`orion-fsm models list|show|validate|convert|compare`: the model registry, and two agents
scored side by side on a labelled answer set."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import anyio

from orion_fsm import (
    AgentSpec,
    Comparison,
    EvaluationError,
    ModelCache,
    Registry,
    compare,
    resolve_cache_dir,
)

from ._common import Progress
from ._eval import add_sampling_options, questions_for, run_evaluation, score_lines


def add_parser(sub: Any) -> None:
    models = sub.add_parser("models", help="the model registry")
    msub = models.add_subparsers(dest="models_command", required=True)
    lst = msub.add_parser("list", help="list agents")
    lst.add_argument("--json", action="store_true")
    show = msub.add_parser("show", help="show one agent")
    show.add_argument("agent")
    msub.add_parser("validate", help="validate the registry and exit")
    convert = msub.add_parser("convert", help="convert model files for the runtime now")
    convert.add_argument("--agent", help="only this agent's model")
    versus = msub.add_parser(
        "compare", help="score agents A and B on a labelled answer set: is B better?",
        description="Both agents answer every question of the --eval FILE (eval/answers.jsonl "
                    "format); prints both accuracies, B minus A with its 95 % interval "
                    "(Newcombe) and the verdict: B better, B worse or no significant difference.")
    versus.add_argument("a", metavar="A", help="agent id (in --registry)")
    versus.add_argument("b", metavar="B", help="agent id (in --b-registry if given)")
    versus.add_argument("--eval", required=True, metavar="FILE", dest="eval_file",
                        help="the labelled answer set, e.g. eval/answers.jsonl")
    versus.add_argument("--b-registry", metavar="FILE",
                        help="registry that holds B, e.g. a tuned variant's (default: A's)")
    versus.add_argument("--temperature", type=float,
                        help="for both (default: each agent's registry default)")
    add_sampling_options(versus)
    versus.add_argument("--json", action="store_true", help="print one JSON object")
    models.set_defaults(handler=_models)


def _agent_row(spec: AgentSpec) -> dict[str, Any]:
    return {"id": spec.id, "role": spec.role, "model": spec.model.describe(),
            "context_length": spec.context_length, "fallback": spec.fallback,
            "ram_estimate_mb": spec.ram_estimate_mb}


def _models(args: argparse.Namespace) -> int:
    if args.models_command == "compare":
        code: int = anyio.run(_compare, args)
        return code
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
    cache = ModelCache(resolve_cache_dir(args.cache_dir))
    progress = Progress(enabled=sys.stderr.isatty())
    seen: set[Path] = set()
    for spec in registry.agents.values():
        if args.agent and spec.id != args.agent:
            continue
        source = spec.model.locate()
        if source in seen:
            continue
        seen.add(source)
        converted = cache.convert(source, progress=progress)
        print(f"{spec.id}: {converted.model_path} (source sha256 {converted.source_sha256[:16]})")
    progress.close()
    return 0


async def _compare(args: argparse.Namespace) -> int:
    registry_b = args.b_registry or args.registry
    if args.a == args.b and registry_b == args.registry:
        raise EvaluationError(f"A and B are the same agent {args.a!r}: name another agent, or "
                              f"give B's registry with --b-registry")
    for agent, registry in ((args.a, args.registry), (args.b, registry_b)):
        Registry.load(registry).get(agent)  # an unknown agent fails before any model loads
    questions = questions_for(args, args.eval_file)
    temperatures = [args.temperature]
    if registry_b == args.registry:
        report = await run_evaluation(args, args.registry, questions, [args.a, args.b],
                                      temperatures)
        a, b = report.score(args.a), report.score(args.b)
    else:
        a = (await run_evaluation(args, args.registry, questions, [args.a],
                                  temperatures)).score(args.a)
        b = (await run_evaluation(args, registry_b, questions, [args.b],
                                  temperatures)).score(args.b)
    result = compare(a, b)
    if args.json:
        print(json.dumps({"file": args.eval_file, "registry_a": args.registry,
                          "registry_b": registry_b, **result.as_dict()}, indent=2))
    else:
        print(comparison_text(result, args.registry, registry_b))
    return 0


def comparison_text(result: Comparison, registry_a: str | None, registry_b: str | None) -> str:
    """Both scores, B minus A with its interval, and the verdict, as `models compare` prints."""
    shown = {"better": "B better", "worse": "B worse",
             "no significant difference": "no significant difference"}
    lines = [*score_lines(result.a, f"A {result.a.agent} ({registry_a or 'default registry'})"),
             *score_lines(result.b, f"B {result.b.agent} ({registry_b or 'default registry'})"),
             f"B - A: {result.difference * 100:+.1f} points, 95 % interval "
             f"[{result.low * 100:+.1f}, {result.high * 100:+.1f}] (Newcombe)",
             f"verdict: {shown[result.verdict]}"]
    return "\n".join(lines)
