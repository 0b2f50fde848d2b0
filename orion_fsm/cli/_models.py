"""`orion-fsm models list|show|validate|convert|compare|quantize|merge|shard|tune`: the
model registry, two agents scored side by side on a labelled answer set, model files made
from its models (`_modelops`), and fine-tuning an agent on feedback into a variant agent."""

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
    ModelLoadError,
    Registry,
    TuneConfig,
    VirtualSpec,
    compare,
    resolve_cache_dir,
    tune_agent,
    user_registry_path,
)

from . import _modelops
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
    _modelops.add_parsers(msub)
    _add_tune(msub)
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


def _add_tune(msub: Any) -> None:
    d = TuneConfig()
    tune = msub.add_parser("tune", help="LoRA fine-tune an agent on training JSONL (`orion-fsm "
                           "feedback export`) and register the result as a variant agent")
    tune.add_argument("agent", help="the agent whose model is tuned")
    tune.add_argument("--data", required=True, help='JSONL, one {"input", "target", '
                      '"system"} per line')
    tune.add_argument("--epochs", type=int, default=d.epochs, help=f"default {d.epochs}")
    tune.add_argument("--lr", type=float, default=d.lr, help=f"default {d.lr:g} (the seed's; "
                      "LoRA on a few hundred examples learns faster with 1e-4 to 1e-3)")
    tune.add_argument("--batch", type=int, default=d.batch, help=f"default {d.batch}")
    tune.add_argument("--rank", type=int, default=d.rank, help=f"LoRA rank (default {d.rank})")
    tune.add_argument("--layers", type=int, default=d.layers, help="LoRA on the last N blocks "
                      f"(default {d.layers}; 0: all)")
    tune.add_argument("--held-out", type=float, default=d.held_out,
                      help=f"share kept aside for the loss and the answer check ({d.held_out})")
    tune.add_argument("--patience", type=int, default=d.patience, help="epochs without a "
                      f"better held-out loss before stopping (default {d.patience})")
    tune.add_argument("--min-examples", type=int, default=d.min_examples,
                      help=f"refuse fewer examples than this (default {d.min_examples})")
    tune.add_argument("--max-tokens", type=int, default=d.max_tokens,
                      help=f"leave out longer examples (default {d.max_tokens})")
    tune.add_argument("--threads", type=int, default=d.threads,
                      help="torch threads (default: the cores other processes leave free, "
                      "read again at every step)")
    tune.add_argument("--seed", type=int, default=d.seed)
    tune.add_argument("--output", help="registry file the variant is added to (default: "
                      "models.user.json in the cache dir, a copy of --registry the first time)")
    tune.add_argument("--json", action="store_true", help="print the report as JSON")


def _tune(args: argparse.Namespace) -> int:
    registry = Registry.load(args.registry)
    cache_dir = resolve_cache_dir(args.cache_dir)
    target = Path(args.output) if args.output else user_registry_path(cache_dir)
    config = TuneConfig(
        epochs=args.epochs, lr=args.lr, batch=args.batch, rank=args.rank,
        layers=args.layers or None, held_out=args.held_out, patience=args.patience,
        min_examples=args.min_examples, max_tokens=args.max_tokens, threads=args.threads,
        seed=args.seed)
    progress = Progress(enabled=sys.stderr.isatty())
    try:
        report = tune_agent(registry, args.agent, Path(args.data), cache_dir=cache_dir,
                            registry_out=target, config=config, progress=progress)
    finally:
        progress.close()
    if args.json:
        print(json.dumps(report.as_dict(), indent=2))
        return 0
    losses = report.held_out_loss
    print(f"{report.variant}: held-out accuracy {report.accuracy_before:.0%} -> "
          f"{report.accuracy_after:.0%}, loss {losses[0]:.3f} -> {min(losses):.3f} (epoch "
          f"{report.best_epoch} of {report.epochs_run}"
          f"{', stopped early' if report.stopped_early else ''}), "
          f"{report.train_examples} train / {report.held_out_examples} held-out examples, "
          f"{report.seconds['total']:.0f} s")
    print(f"model: {report.model_path}")
    print(f"registry: {report.registry_path}; try it with: orion-fsm --registry "
          f"{report.registry_path} run --agent {report.variant} PROMPT")
    return 0


def _agent_row(spec: AgentSpec) -> dict[str, Any]:
    return {"id": spec.id, "role": spec.role, "model": spec.model.describe(),
            "runtime": spec.runtime,
            "context_length": spec.context_length, "fallback": spec.fallback,
            "ram_estimate_mb": spec.ram_estimate_mb}


def _virtual_row(spec: VirtualSpec) -> dict[str, Any]:
    return {"id": spec.id, "virtual": True, "description": spec.description,
            "members": [{"agent": m.agent, "role": m.role, "weight": round(m.weight, 4),
                         "instruction": m.instruction} for m in spec.members],
            "fusion": {"strategy": spec.strategy, "weights": spec.weights,
                       "min_weight": spec.min_weight},
            "early_stop": {"policy": spec.early_stop, "threshold": spec.threshold,
                           "max_tokens": spec.early_stop_max_tokens, "leader": spec.leader,
                           "code_within": spec.code_within},
            "fallback": spec.fallback, "routing": {"patterns": list(spec.routing.patterns)}}


def _missing_models(registry: Registry) -> list[str]:
    """One line per model file (or variant) of the registry that cannot be found: a registry
    whose agents cannot load is not valid, however well-formed its JSON."""
    problems = []
    for spec in registry.agents.values():
        sources = [("model", spec.model)]
        sources += [(f"quantization variant {q.name!r}", q.source) for q in spec.quantization]
        for what, source in sources:
            try:
                source.locate()
            except ModelLoadError as exc:
                problems.append(f"agent {spec.id!r} {what}: {exc}")
    return problems


def _models(args: argparse.Namespace) -> int:
    if args.models_command in ("quantize", "merge", "shard"):
        return _modelops.run(args)
    if args.models_command == "tune":
        return _tune(args)
    if args.models_command == "compare":
        code: int = anyio.run(_compare, args)
        return code
    registry = Registry.load(args.registry)
    if args.models_command == "validate":
        problems = _missing_models(registry)
        for problem in problems:
            print(f"orion-fsm: {problem}", file=sys.stderr)
        if problems:
            return 2
        extra = f", {len(registry.virtual)} virtual" if registry.virtual else ""
        print(f"ok: {len(registry.agents)} agents{extra}, default "
              f"{registry.default_agent!r}, digest {registry.digest[:16]}")
        return 0
    if args.models_command == "list":
        rows = [_agent_row(s) for s in registry.agents.values()]
        virtual = [_virtual_row(v) for v in registry.virtual.values()]
        if args.json:
            print(json.dumps(rows + virtual, indent=2))
        else:
            for r in rows:
                default = "*" if r["id"] == registry.default_agent else " "
                print(f"{default} {r['id']:<14} {r['role']:<14} ctx {r['context_length']:<6} "
                      f"fallback {r['fallback'] or '-':<14} {r['runtime']:<13} {r['model']}")
            for v in virtual:
                members = " + ".join(f"{m['agent']} ({m['role']} {m['weight']:.2f})"
                                     for m in v["members"])
                print(f"  {v['id']:<14} {'virtual':<14} {members}; early stop "
                      f"{v['early_stop']['policy']} at {v['early_stop']['threshold']}; "
                      f"fallback {v['fallback'] or '-'}")
        return 0
    if args.models_command == "show" and args.agent in registry.virtual:
        shown = {**_virtual_row(registry.virtual[args.agent]),
                 "fallback_chain": list(registry.fallback_chain(args.agent))}
        print(json.dumps(shown, indent=2, ensure_ascii=False))
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
        converted = cache.convert(source, progress=progress, runtime=spec.runtime)
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
