"""`orion-fsm models list|show|validate|convert`: the model registry."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from orion_fsm import AgentSpec, ModelCache, ModelLoadError, Registry, resolve_cache_dir

from ._common import Progress


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
    models.set_defaults(handler=_models)


def _agent_row(spec: AgentSpec) -> dict[str, Any]:
    return {"id": spec.id, "role": spec.role, "model": spec.model.describe(),
            "context_length": spec.context_length, "fallback": spec.fallback,
            "ram_estimate_mb": spec.ram_estimate_mb}


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
    registry = Registry.load(args.registry)
    if args.models_command == "validate":
        problems = _missing_models(registry)
        for problem in problems:
            print(f"orion-fsm: {problem}", file=sys.stderr)
        if problems:
            return 2
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
