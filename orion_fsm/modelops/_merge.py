"""`merge_models`: linear, SLERP, TIES and DARE merges of GGUF models of one architecture.

A `MergeRecipe` says what to merge (mergekit's models / parameters / merge_method /
base_model / dtype, from YAML or the command line). Tensors are merged one at a time in
float64 from their dequantized values and stored in the finest type an input holds them in
(or `dtype`).
"""

from __future__ import annotations

import contextlib
import math
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from orion_fsm._exceptions import ModelFileError
from orion_fsm.backends._gguf_io import (
    FLOAT_TYPES,
    QUANT_TYPES,
    GGUFFile,
    PlannedTensor,
    ProgressCallback,
    TensorInfo,
    open_gguf,
    quantizable,
    write_gguf,
)

from ._report import ModelOpResult

__all__ = ["MERGE_METHODS", "MergeRecipe", "MergedModel", "load_recipe", "merge_models"]

F64 = npt.NDArray[np.float64]
MERGE_METHODS: Final = ("linear", "slerp", "ties", "dare", "task_arithmetic")
_ALIASES: Final = {"dare_ties": "dare"}
_TASK_VECTORS: Final = ("ties", "dare", "task_arithmetic")  # methods that need a base
_DTYPES: Final = {"float32": "f32", "float16": "f16", "f32": "f32", "f16": "f16",
                  **{q: q for q in QUANT_TYPES}}
# Below this |cos| between two tensors, SLERP interpolates along the arc; above it, the two
# are nearly parallel and the arc is a line (mergekit's threshold).
_SLERP_PARALLEL: Final = 0.9995


@dataclass(frozen=True, slots=True)
class MergedModel:
    """One input of a merge and its own parameters (mergekit's per-model `parameters`)."""

    path: Path
    weight: float = 1.0
    density: float | None = None  # TIES/DARE: None takes the recipe's


@dataclass(frozen=True, slots=True)
class MergeRecipe:
    """What to merge and how; `check()` refuses what cannot be merged, in one line."""

    method: str
    models: tuple[MergedModel, ...]
    base: Path | None = None  # TIES/DARE: the model the task vectors are taken from
    t: float = 0.5  # SLERP: 0 gives the first model, 1 the second
    density: float = 1.0  # TIES: fraction of each task vector kept; DARE: kept at random
    normalize: bool = True  # linear/TIES/DARE: divide by the sum of the weights
    lambda_: float = 1.0  # TIES/DARE: scale of the merged task vector
    seed: int = 0  # DARE's random drop
    dtype: str | None = None  # stored type of merged matrices; None: the first model's
    extra: Mapping[str, Any] = field(default_factory=dict)

    def check(self) -> MergeRecipe:
        method = _ALIASES.get(self.method, self.method)
        if method not in MERGE_METHODS:
            raise ModelFileError(f"unknown merge method {self.method!r}; use one of "
                                 f"{', '.join(MERGE_METHODS)}")
        if len(self.models) < 2:
            raise ModelFileError("a merge needs at least two models (--models A B)")
        if method == "slerp" and len(self.models) != 2:
            raise ModelFileError(f"slerp merges exactly two models, got {len(self.models)}")
        if method == "slerp" and not 0.0 <= self.t <= 1.0:
            raise ModelFileError(f"slerp t must be in [0, 1], got {self.t}")
        if method in _TASK_VECTORS and self.base is None:
            raise ModelFileError(f"{method} merges task vectors: name the model they are "
                                 "taken from with --base (base_model in a recipe)")
        for density in (self.density, *(m.density for m in self.models)):
            if density is not None and not 0.0 < density <= 1.0:
                raise ModelFileError(f"density must be in (0, 1], got {density}")
        if any(not math.isfinite(m.weight) for m in self.models):
            raise ModelFileError("merge weights must be finite numbers")
        if method in ("linear", "ties", "dare") and self.normalize and \
                sum(m.weight for m in self.models) == 0:
            raise ModelFileError("the merge weights sum to 0: they cannot be normalized; "
                                 "change them or set normalize: false")
        dtype = None
        if self.dtype is not None:
            dtype = _DTYPES.get(self.dtype.lower())
            if dtype is None:
                raise ModelFileError(f"unknown dtype {self.dtype!r}; use one of "
                                     f"{', '.join(_DTYPES)}")
        if self.extra:
            raise ModelFileError(f"unknown recipe key(s) {', '.join(sorted(self.extra))}; "
                                 "known: models, merge_method, base_model, parameters, dtype")
        return MergeRecipe(method, self.models, self.base, self.t, self.density,
                           self.normalize, self.lambda_, self.seed, dtype)


def load_recipe(path: Path, resolve: Callable[[str], Path] | None = None) -> MergeRecipe:
    """A mergekit-style YAML recipe: `models` (each `model` and its `parameters`),
    `merge_method`, `base_model`, `parameters` (t, density, weight, normalize, lambda),
    `dtype`, `seed`. Model names are paths relative to the recipe, or what `resolve` makes of
    them (the CLI resolves agent ids)."""
    import yaml

    path = Path(path)
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelFileError(f"recipe {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelFileError(f"cannot read recipe {path}: {exc}") from None
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        raise ModelFileError(f"recipe {path} is not valid YAML"
                             f"{f' (line {where.line + 1})' if where else ''}") from None
    if not isinstance(doc, dict):
        raise ModelFileError(f"recipe {path} must be a mapping with models and merge_method")
    if "slices" in doc:
        raise ModelFileError(f"recipe {path}: slices are not supported; list whole models "
                             "under models:")

    def locate(name: Any, where: str) -> Path:
        if not isinstance(name, str) or not name:
            raise ModelFileError(f"recipe {path}: {where} must be a model path or agent id")
        candidate = Path(name) if Path(name).is_absolute() else path.parent / name
        if candidate.exists() or resolve is None:
            return candidate
        return resolve(name)

    def number(params: Mapping[str, Any], key: str, default: Any, where: str) -> Any:
        value = params.get(key, default)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
            raise ModelFileError(f"recipe {path}: {where}{key} must be a number, got {value!r}")
        return value

    params = doc.get("parameters") or {}
    entries = doc.get("models")
    if not isinstance(params, dict) or not isinstance(entries, list):
        raise ModelFileError(f"recipe {path}: models must be a list and parameters a mapping")
    models = []
    for i, entry in enumerate(entries):
        entry = {"model": entry} if isinstance(entry, str) else entry
        if not isinstance(entry, dict):
            raise ModelFileError(f"recipe {path}: models[{i}] must be a mapping with model:")
        own = entry.get("parameters") or {}
        if not isinstance(own, dict):
            raise ModelFileError(f"recipe {path}: models[{i}].parameters must be a mapping")
        models.append(MergedModel(
            locate(entry.get("model"), f"models[{i}].model"),
            float(number(own, "weight", params.get("weight", 1.0), f"models[{i}].")),
            number(own, "density", None, f"models[{i}].")))
    base = doc.get("base_model")
    known = {"models", "merge_method", "base_model", "parameters", "dtype", "seed", "name"}
    normalize = params.get("normalize", True)
    if not isinstance(normalize, bool):
        raise ModelFileError(f"recipe {path}: parameters.normalize must be true or false")
    seed = doc.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ModelFileError(f"recipe {path}: seed must be an integer")
    return MergeRecipe(
        method=str(doc.get("merge_method", "")),
        models=tuple(models),
        base=None if base is None else locate(base, "base_model"),
        t=float(number(params, "t", 0.5, "parameters.")),
        density=float(number(params, "density", 1.0, "parameters.")),
        normalize=normalize,
        lambda_=float(number(params, "lambda", 1.0, "parameters.")),
        seed=seed,
        dtype=None if doc.get("dtype") is None else str(doc["dtype"]),
        extra={k: v for k, v in doc.items() if k not in known},
    ).check()


def merge_models(recipe: MergeRecipe, output: Path, *,
                 progress: ProgressCallback | None = None) -> ModelOpResult:
    """Merge the recipe's models into `output` (atomically, 0600), one tensor at a time."""
    recipe = recipe.check()
    inputs = [m.path for m in recipe.models] + ([recipe.base] if recipe.base else [])
    if any(Path(output).resolve() == Path(p).resolve() for p in inputs):
        raise ModelFileError(f"the output {output} is one of the inputs; choose another --output")
    with contextlib.ExitStack() as stack:
        files = [stack.enter_context(open_gguf(p)) for p in inputs]
        _check_same_architecture(files)
        models, base = files[: len(recipe.models)], (files[-1] if recipe.base else None)
        first = models[0]
        plan = [_planned(recipe, models, base, index, info)
                for index, info in enumerate(first.tensors.values())]
        sources = ", ".join(p.name for p in inputs)
        write_gguf(Path(output), first, plan, file_type=recipe.dtype,
                   metadata={"orion.merge": f"{recipe.method} of {sources}"},
                   progress=progress)
    return ModelOpResult.of(output, inputs=tuple(inputs), operation=f"merge {recipe.method}")


def _check_same_architecture(files: Sequence[GGUFFile]) -> None:
    """Same architecture, hyperparameters, tensor names and shapes, or a one-line error."""
    first = files[0]
    arch = first.architecture
    hyper = {k: v for k, v in first.metadata.items() if k.startswith(f"{arch}.")}
    for other in files[1:]:
        why = None
        if other.architecture != arch:
            why = f"architecture {arch} vs {other.architecture}"
        elif (theirs := {k: v for k, v in other.metadata.items()
                         if k.startswith(f"{arch}.")}) != hyper:
            key = sorted(k for k in hyper.keys() | theirs.keys()
                         if hyper.get(k) != theirs.get(k))[0]
            why = f"{key} {hyper.get(key)} vs {theirs.get(key)}"
        elif other.tensors.keys() != first.tensors.keys():
            diff = sorted(other.tensors.keys() ^ first.tensors.keys())
            why = f"tensor {diff[0]} is in only one of them"
        else:
            bad = next((n for n, i in first.tensors.items() if other.tensors[n].shape != i.shape),
                       None)
            if bad is not None:
                why = (f"tensor {bad} is {_dims(first.tensors[bad])} vs "
                       f"{_dims(other.tensors[bad])}")
        if why is not None:
            raise ModelFileError(f"cannot merge {first.path.name} with {other.path.name}: {why}; "
                                 "merge models of the same architecture and size")


def _dims(info: TensorInfo) -> str:
    return "x".join(map(str, info.shape))


def _planned(recipe: MergeRecipe, models: Sequence[GGUFFile], base: GGUFFile | None,
             index: int, info: TensorInfo) -> PlannedTensor:
    name = info.name
    if recipe.dtype and quantizable(info, recipe.dtype):
        stored = recipe.dtype
    else:
        # The finest type any input holds the tensor in: a tuned model's float16 projections
        # merged back with its 4-bit base stay float16 (requantized to 4 bits, the small task
        # vector would mostly round away).
        stored = min((m.tensors[name].type for m in models), key=_coarseness)
    if stored not in (*FLOAT_TYPES, *QUANT_TYPES):
        stored = "q8_0" if quantizable(info, "q8_0") else "f32"

    def produce() -> npt.NDArray[Any]:
        values = [m.read(name).astype(np.float64) for m in models]
        merged = _merge_tensor(recipe, values,
                               None if base is None else base.read(name).astype(np.float64),
                               index)
        out = merged.astype(np.float32)
        if stored == info.type and np.array_equal(out, values[0].astype(np.float32)):
            # Unchanged (e.g. merge(A, A)): the stored bytes, not a requantized copy of them.
            raw: npt.NDArray[Any] = models[0].raw(name)
            return raw
        return out

    return PlannedTensor(name, info.shape, stored, produce)


def _coarseness(type_name: str) -> int:
    """0 for f32, growing as the type keeps less; types we do not write rank last."""
    order = (*FLOAT_TYPES, *QUANT_TYPES)  # each list goes from fine to coarse
    return order.index(type_name) if type_name in order else len(order)


def _merge_tensor(recipe: MergeRecipe, values: list[F64], base: F64 | None, index: int) -> F64:
    weights = [m.weight for m in recipe.models]
    if recipe.method == "linear":
        return linear(values, weights, normalize=recipe.normalize)
    if recipe.method == "slerp":
        return slerp(values[0], values[1], recipe.t)
    assert base is not None
    densities = [recipe.density if m.density is None else m.density for m in recipe.models]
    deltas = [v - base for v in values]
    if recipe.method == "task_arithmetic":
        # base + lambda * sum of the weighted task vectors (Ilharco et al.; not normalized).
        return base + recipe.lambda_ * sum((w * d for w, d in zip(weights, deltas, strict=True)),
                                           np.zeros_like(base))
    if recipe.method == "ties":
        deltas = [trim(d, density) for d, density in zip(deltas, densities, strict=True)]
    else:
        deltas = [drop_and_rescale(d, density, _rng(recipe.seed, index, i))
                  for i, (d, density) in enumerate(zip(deltas, densities, strict=True))]
    return base + recipe.lambda_ * sign_consensus(deltas, weights, normalize=recipe.normalize)


def linear(values: Sequence[F64], weights: Sequence[float], *, normalize: bool = True) -> F64:
    """The weighted mean (normalize) or sum of the tensors. Written as the first plus the
    weighted differences, so equal inputs give the first back exactly."""
    if not normalize:
        return sum((w * v for w, v in zip(weights, values, strict=True)), np.zeros_like(values[0]))
    total = sum(weights)
    first = values[0]
    moved = np.zeros_like(first)
    for w, v in zip(weights[1:], values[1:], strict=True):
        moved += (w / total) * (v - first)
    # Where nothing moved, the first value itself: -0.0 + 0.0 would turn it into +0.0.
    return np.where(moved == 0.0, first, first + moved)


def slerp(a: F64, b: F64, t: float) -> F64:
    """Spherical interpolation of two tensors (as mergekit's slerp): t=0 gives `a`, t=1 `b`;
    nearly parallel (or zero) tensors are interpolated linearly."""
    if t in (0.0, 1.0):
        return (a if t == 0.0 else b).copy()  # exactly, signed zeros included
    norm_a, norm_b = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    if norm_a == 0.0 or norm_b == 0.0:
        return (1.0 - t) * a + t * b
    dot = float(np.sum((a / norm_a) * (b / norm_b)))
    if abs(dot) > _SLERP_PARALLEL:
        return (1.0 - t) * a + t * b
    theta = math.acos(max(-1.0, min(1.0, dot)))
    sin_theta = math.sin(theta)
    s0 = math.sin((1.0 - t) * theta) / sin_theta
    s1 = math.sin(t * theta) / sin_theta
    return s0 * a + s1 * b


def trim(delta: F64, density: float) -> F64:
    """TIES' trim: keep the `density` fraction of entries largest in magnitude, zero the rest."""
    if density >= 1.0:
        return delta
    k = int(density * delta.size)
    if k <= 0:
        return np.zeros_like(delta)
    flat = np.abs(delta).ravel()
    threshold = np.partition(flat, flat.size - k)[flat.size - k]
    return np.where(np.abs(delta) >= threshold, delta, 0.0)


def drop_and_rescale(delta: F64, density: float, rng: np.random.Generator) -> F64:
    """DARE: drop each entry with probability 1 - density, rescale the kept by 1/density."""
    if density >= 1.0:
        return delta  # nothing dropped, nothing to rescale: exactly TIES without trim
    keep = rng.random(delta.shape) < density
    return np.where(keep, delta / density, 0.0)


def sign_consensus(deltas: Sequence[F64], weights: Sequence[float], *,
                   normalize: bool = True) -> F64:
    """TIES' elect and disjoint merge: per entry, the sign of the weighted sum wins, and the
    weighted task vectors that agree with it are averaged (normalize) or summed."""
    weighted = [w * d for w, d in zip(weights, deltas, strict=True)]
    elected = np.sign(sum(weighted, np.zeros_like(deltas[0])))
    agree = [(np.sign(d) == elected) & (d != 0) for d in weighted]
    merged = sum((np.where(a, d, 0.0) for a, d in zip(agree, weighted, strict=True)),
                 np.zeros_like(deltas[0]))
    if not normalize:
        return merged
    share = sum((a * w for a, w in zip(agree, weights, strict=True)),
                np.zeros_like(deltas[0]))
    return np.divide(merged, share, out=np.zeros_like(merged), where=share != 0)


def _rng(seed: int, tensor_index: int, model_index: int) -> np.random.Generator:
    # One stream per (seed, tensor, model): a tensor's drop does not depend on the others.
    return np.random.default_rng([seed, tensor_index, model_index, zlib.crc32(b"dare")])
