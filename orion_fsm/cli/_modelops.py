"""`orion-fsm models quantize|merge|shard`: make model files from models (orion_fsm.modelops)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from orion_fsm import ModelFileError, OrionError, Registry, models_dir, resolve_cache_dir
from orion_fsm.modelops import (
    MERGE_METHODS,
    QUANT_TYPES,
    MergedModel,
    MergeRecipe,
    load_recipe,
    merge_models,
    quantize_model,
    register_variant,
    shard_model,
)

from ._common import Progress


def add_parsers(msub: Any) -> None:
    """The three subcommands, under `orion-fsm models`."""
    quant = msub.add_parser("quantize", help="rewrite a model with its matrices in one type")
    quant.add_argument("source", metavar="SRC", help="a GGUF file or an agent id")
    # Checked by quantize_model (one-line error), not by argparse's multi-line usage error.
    quant.add_argument("--type", required=True, help=f"one of {', '.join(QUANT_TYPES)}")
    _output_options(quant)

    merge = msub.add_parser("merge", help="merge models of one architecture")
    merge.add_argument("--recipe", metavar="FILE.yaml", help="a mergekit-style recipe "
                       "(models, parameters, merge_method, base_model, dtype)")
    merge.add_argument("--method", help=f"one of {', '.join(MERGE_METHODS)}")
    merge.add_argument("--models", nargs="+", metavar="MODEL", help="GGUF files or agent ids")
    merge.add_argument("--weights", nargs="+", type=float, help="one per model (default 1)")
    merge.add_argument("--base", help="ties/dare/task_arithmetic: the model the task "
                       "vectors are taken from")
    merge.add_argument("--density", type=float, default=1.0,
                       help="ties: fraction of each task vector kept; dare: kept at random")
    merge.add_argument("--t", type=float, default=0.5, help="slerp: 0 = first, 1 = second")
    merge.add_argument("--seed", type=int, default=0, help="dare: seed of the random drop")
    merge.add_argument("--dtype", help="stored type of merged matrices (default: per tensor, "
                       "the finest type an input holds it in)")
    _output_options(merge)

    shard = msub.add_parser("shard", help="split a model into parts with a JSON manifest")
    shard.add_argument("source", metavar="SRC", help="a GGUF file or an agent id")
    shard.add_argument("--shards", type=int, required=True, help="number of parts, 1 to 16")
    shard.add_argument("--output", required=True, metavar="DIR", help="a new folder")


def _output_options(parser: Any) -> None:
    parser.add_argument("--output", metavar="DST.gguf",
                        help="where to write it (default: the cache's models folder)")
    parser.add_argument("--register", nargs=2, metavar=("AGENT", "NAME"),
                        help="add the result to AGENT in --registry as variant NAME")


def run(args: argparse.Namespace) -> int:
    progress = Progress(enabled=sys.stderr.isatty())
    try:
        if args.models_command == "quantize":
            source = _locate(args, args.source)
            output = _output(args, f"{source.stem}.{args.type.lower()}.gguf")
            result = quantize_model(source, output, args.type, progress=progress)
        elif args.models_command == "merge":
            recipe = _recipe(args)
            output = _output(args, f"merged-{recipe.method}.gguf")
            result = merge_models(recipe, output, progress=progress)
        else:
            source = _locate(args, args.source)
            result, manifest = shard_model(source, args.shards, Path(args.output))
            print(f"{result.describe()}: {len(manifest.shards)} parts, model sha256 "
                  f"{manifest.sha256[:16]}")
            return 0
    finally:
        progress.close()
    print(result.describe())
    if args.register:
        if not args.registry:
            raise ModelFileError("--register needs --registry FILE: the packaged registry is "
                                 "not changed; copy it and pass the copy")
        agent, name = args.register
        register_variant(Path(args.registry), agent, name, result.path)
        print(f"registered {result.path} as variant {name!r} of agent {agent!r} in "
              f"{args.registry}")
    return 0


def _locate(args: argparse.Namespace, name: str) -> Path:
    """A model file, or the model of the agent with that id."""
    path = Path(name)
    if path.exists() or path.suffix in (".gguf", ".json") or "/" in name:
        if not path.is_file():
            raise ModelFileError(f"model file {path} does not exist; check the path")
        return path
    try:
        registry = Registry.load(args.registry)
    except OrionError as exc:
        raise ModelFileError(f"{name!r} is not a file and the registry cannot be read to "
                             f"look it up as an agent: {exc}") from None
    if name not in registry.agents:
        raise ModelFileError(f"{name!r} is neither a model file nor an agent id (agents: "
                             f"{', '.join(registry.agents)})")
    return registry.agents[name].model.locate()


def _output(args: argparse.Namespace, default_name: str) -> Path:
    if args.output:
        return Path(args.output)
    return models_dir(resolve_cache_dir(args.cache_dir)) / default_name


def _recipe(args: argparse.Namespace) -> MergeRecipe:
    if args.recipe:
        if args.models or args.method:
            raise ModelFileError("give either --recipe or --method with --models, not both")
        return load_recipe(Path(args.recipe), resolve=lambda name: _locate(args, name))
    if not args.method or not args.models:
        raise ModelFileError("merge needs --method and --models A B (or --recipe FILE.yaml)")
    weights = args.weights or [1.0] * len(args.models)
    if len(weights) != len(args.models):
        raise ModelFileError(f"--weights gives {len(weights)} values for "
                             f"{len(args.models)} models; give one per model")
    models = tuple(MergedModel(_locate(args, m), w)
                   for m, w in zip(args.models, weights, strict=True))
    return MergeRecipe(method=args.method, models=models,
                       base=None if args.base is None else _locate(args, args.base),
                       t=args.t, density=args.density, seed=args.seed,
                       dtype=args.dtype).check()
