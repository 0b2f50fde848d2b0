"""Merges: the properties the issue names hold bit-for-bit (merge(A, A) = A, SLERP t=0 -> A and
t=1 -> B, DARE without drop = TIES without trim), on tensors (hypothesis) and on tiny GGUF
files; recipes in mergekit's format; mismatched or bad inputs are one line."""

from __future__ import annotations

import stat
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from orion_fsm import ModelFileError
from orion_fsm.backends._gguf_io import open_gguf
from orion_fsm.modelops import MergedModel, MergeRecipe, load_recipe, merge_models, quantize_model
from orion_fsm.modelops._merge import (
    drop_and_rescale,
    linear,
    sign_consensus,
    slerp,
    trim,
)

_values = st.floats(-1e3, 1e3, allow_nan=False, width=32)
_tensors = hnp.arrays(np.float32, hnp.array_shapes(min_dims=1, max_dims=2, max_side=16),
                      elements=_values)
_weights = st.floats(0.01, 10.0)


def f64(a: np.ndarray) -> np.ndarray:
    return a.astype(np.float64)


@settings(max_examples=60, deadline=None)
@given(_tensors, st.lists(_weights, min_size=2, max_size=4))
def test_linear_of_copies_is_the_copy(a: np.ndarray, weights: list[float]) -> None:
    merged = linear([f64(a)] * len(weights), weights).astype(np.float32)
    assert merged.tobytes() == a.tobytes()


@settings(max_examples=60, deadline=None)
@given(_tensors, st.floats(0.0, 1.0))
def test_slerp_of_copies_is_the_copy(a: np.ndarray, t: float) -> None:
    assert slerp(f64(a), f64(a), t).astype(np.float32).tobytes() == a.tobytes()


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_slerp_ends_are_its_inputs(data: st.DataObject) -> None:
    a = data.draw(_tensors)
    b = data.draw(hnp.arrays(np.float32, a.shape, elements=_values))
    assert slerp(f64(a), f64(b), 0.0).astype(np.float32).tobytes() == a.tobytes()
    assert slerp(f64(a), f64(b), 1.0).astype(np.float32).tobytes() == b.tobytes()


@settings(max_examples=60, deadline=None)
@given(st.data(), st.integers(0, 2**32 - 1))
def test_dare_without_drop_is_ties_without_trim(data: st.DataObject, seed: int) -> None:
    base = data.draw(_tensors)
    models = [data.draw(hnp.arrays(np.float32, base.shape, elements=_values)) for _ in range(3)]
    weights = data.draw(st.lists(_weights, min_size=3, max_size=3))
    deltas = [f64(m) - f64(base) for m in models]
    ties = sign_consensus([trim(d, 1.0) for d in deltas], weights)
    dare = sign_consensus([drop_and_rescale(d, 1.0, np.random.default_rng(seed))
                           for d in deltas], weights)
    assert ties.tobytes() == dare.tobytes()


def test_ties_keeps_the_largest_entries_and_the_elected_sign() -> None:
    delta = np.array([0.1, -5.0, 3.0, -0.2])
    assert trim(delta, 0.5).tolist() == [0.0, -5.0, 3.0, 0.0]
    merged = sign_consensus([np.array([1.0, 2.0]), np.array([-3.0, 4.0])], [1.0, 1.0])
    assert merged.tolist() == [-3.0, 3.0]  # sign of the sum wins; agreeing entries averaged


def test_dare_drops_about_one_minus_density_and_rescales() -> None:
    delta = np.ones(10_000)
    kept = drop_and_rescale(delta, 0.25, np.random.default_rng(0))
    assert 0.22 < (kept != 0).mean() < 0.28
    assert set(np.unique(kept)) == {0.0, 4.0}


# --- on GGUF files --------------------------------------------------------------------------


def tensor_bytes(path: Path) -> dict[str, bytes]:
    with open_gguf(path) as model:
        return {name: bytes(model.raw(name).tobytes()) for name in model.tensors}


def recipe(method: str, *paths: Path, **kw: object) -> MergeRecipe:
    return MergeRecipe(method=method, models=tuple(MergedModel(p) for p in paths), **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize("method", ["linear", "slerp", "ties", "dare"])
def test_merging_a_model_with_itself_gives_it_back(tiny_pair: dict[str, Path], tmp_path: Path,
                                                   method: str) -> None:
    a = tiny_pair["a"]
    out = tmp_path / "out.gguf"
    merge_models(recipe(method, a, a, base=tiny_pair["base"], t=0.3), out)
    assert tensor_bytes(out) == tensor_bytes(a)
    assert stat.S_IMODE(out.stat().st_mode) == 0o600


def test_merging_a_quantized_model_with_itself_keeps_its_bytes(tiny_pair: dict[str, Path],
                                                               tmp_path: Path) -> None:
    q = quantize_model(tiny_pair["a"], tmp_path / "q" / "a.q4_1.gguf", "q4_1").path
    out = tmp_path / "out.gguf"
    merge_models(recipe("linear", q, q), out)
    assert tensor_bytes(out) == tensor_bytes(q)


def test_task_arithmetic_adds_a_task_vector_back_onto_its_base(tiny_pair: dict[str, Path],
                                                               tmp_path: Path) -> None:
    # "tuned" = a, its base = base: base + (a - base) + (base - base) is a again, exactly.
    a, base = tiny_pair["a"], tiny_pair["base"]
    out = tmp_path / "out.gguf"
    merge_models(recipe("task_arithmetic", a, base, base=base), out)
    assert tensor_bytes(out) == tensor_bytes(a)
    # Task vectors add up (not normalized): a with itself is a only at weights summing to 1.
    halves = MergeRecipe("task_arithmetic", (MergedModel(a, 0.5), MergedModel(a, 0.5)),
                         base=base)
    merge_models(halves, out)
    assert tensor_bytes(out) == tensor_bytes(a)
    merge_models(recipe("task_arithmetic", a, base, base=base, lambda_=0.5), out)
    with open_gguf(a) as ma, open_gguf(base) as mb, open_gguf(out) as mm:
        name = "blk.1.ffn_up.weight"
        np.testing.assert_allclose(mm.read(name), (ma.read(name) + mb.read(name)) / 2,
                                   rtol=1e-5, atol=1e-6)


def test_a_tuned_float_model_merged_onto_its_quantized_base_stays_float(
        tiny_pair: dict[str, Path], tmp_path: Path) -> None:
    # The first use of a merge: a base held in 4 bits and a tuned copy in float. Stored in the
    # base's q4_1, the task vector would be rounded onto the 4-bit grid; it is kept in float.
    base = quantize_model(tiny_pair["base"], tmp_path / "q" / "base.q4_1.gguf", "q4_1").path
    tuned = tiny_pair["a"]  # f32
    out = tmp_path / "out.gguf"
    merge_models(recipe("task_arithmetic", base, tuned, base=base), out)
    with open_gguf(tuned) as mt, open_gguf(out) as mm:
        name = "blk.0.ffn_up.weight"
        assert mm.tensors[name].type == mt.tensors[name].type == "f32"
        np.testing.assert_allclose(mm.read(name), mt.read(name), rtol=1e-5, atol=1e-6)
    # Asked for, the base's type is still what it gets.
    merge_models(recipe("task_arithmetic", base, tuned, base=base, dtype="q4_1"), out)
    with open_gguf(out) as mm:
        assert mm.tensors["blk.0.ffn_up.weight"].type == "q4_1"


def test_slerp_at_its_ends_gives_each_model(tiny_pair: dict[str, Path], tmp_path: Path) -> None:
    a, b = tiny_pair["a"], tiny_pair["b"]
    merge_models(recipe("slerp", a, b, t=0.0), tmp_path / "t0.gguf")
    merge_models(recipe("slerp", a, b, t=1.0), tmp_path / "t1.gguf")
    assert tensor_bytes(tmp_path / "t0.gguf") == tensor_bytes(a)
    assert tensor_bytes(tmp_path / "t1.gguf") == tensor_bytes(b)


def test_dare_without_drop_equals_ties_without_trim_on_files(tiny_pair: dict[str, Path],
                                                             tmp_path: Path) -> None:
    a, b, base = tiny_pair["a"], tiny_pair["b"], tiny_pair["base"]
    merge_models(recipe("ties", a, b, base=base, density=1.0), tmp_path / "ties.gguf")
    merge_models(recipe("dare", a, b, base=base, density=1.0, seed=7), tmp_path / "dare.gguf")
    assert tensor_bytes(tmp_path / "ties.gguf") == tensor_bytes(tmp_path / "dare.gguf")
    assert tensor_bytes(tmp_path / "ties.gguf") != tensor_bytes(a)


def test_a_merge_lies_between_its_models_and_loads(tiny_pair: dict[str, Path],
                                                   tmp_path: Path) -> None:
    from tests.modelops.test_quantize import generated

    a, b = tiny_pair["a"], tiny_pair["b"]
    out = merge_models(recipe("linear", a, b), tmp_path / "m" / "mid.gguf").path
    with open_gguf(a) as ma, open_gguf(b) as mb, open_gguf(out) as mm:
        name = "blk.0.attn_q.weight"
        np.testing.assert_allclose(mm.read(name), (ma.read(name) + mb.read(name)) / 2,
                                   rtol=1e-6, atol=1e-7)
        assert "linear of a.gguf, b.gguf" in mm.metadata["orion.merge"]
    assert generated(out)


@pytest.mark.parametrize(("other", "why"), [
    ("other", r"llama.embedding_length 64 vs 32"),
    ("deeper", r"llama.block_count 2 vs 3"),
])
def test_models_of_another_architecture_are_refused_in_one_line(
        tiny_pair: dict[str, Path], tmp_path: Path, other: str, why: str) -> None:
    out = tmp_path / "out.gguf"
    with pytest.raises(ModelFileError, match=f"cannot merge a.gguf with {other}.gguf: {why}; "
                       "merge models of the same architecture") as caught:
        merge_models(recipe("linear", tiny_pair["a"], tiny_pair[other]), out)
    assert "\n" not in str(caught.value) and not out.exists()


@pytest.mark.parametrize(("kw", "message"), [
    ({"method": "average"}, "unknown merge method 'average'; use one of linear, slerp"),
    ({"method": "ties"}, "ties merges task vectors: name the model"),
    ({"method": "slerp", "t": 1.5}, r"slerp t must be in \[0, 1\]"),
    ({"method": "linear", "dtype": "q3_k"}, "unknown dtype 'q3_k'"),
    ({"method": "dare", "density": 0.0, "base": "a"}, r"density must be in \(0, 1\]"),
])
def test_bad_merge_parameters_are_one_line(tiny_pair: dict[str, Path], tmp_path: Path,
                                           kw: dict[str, object], message: str) -> None:
    if kw.get("base") == "a":
        kw = {**kw, "base": tiny_pair["a"]}
    with pytest.raises(ModelFileError, match=message):
        merge_models(recipe(str(kw.pop("method")), tiny_pair["a"], tiny_pair["b"], **kw),
                     tmp_path / "out.gguf")
    assert not (tmp_path / "out.gguf").exists()


def test_a_mergekit_recipe_is_read(tiny_pair: dict[str, Path], tmp_path: Path) -> None:
    path = tmp_path / "recipe.yaml"
    path.write_text(f"""
models:
  - model: {tiny_pair['a']}
    parameters: {{weight: 0.7, density: 0.5}}
  - model: {tiny_pair['b']}
    parameters: {{weight: 0.3}}
merge_method: dare_ties
base_model: {tiny_pair['base']}
parameters: {{density: 0.8, normalize: true}}
dtype: float16
seed: 3
""")
    loaded = load_recipe(path)
    assert loaded.method == "dare_ties" or loaded.method == "dare"
    assert [(m.weight, m.density) for m in loaded.models] == [(0.7, 0.5), (0.3, None)]
    assert loaded.density == 0.8 and loaded.dtype == "f16" and loaded.seed == 3
    out = merge_models(loaded, tmp_path / "out.gguf").path
    with open_gguf(out) as merged:
        assert merged.tensors["blk.0.attn_q.weight"].type == "f16"
        assert merged.tensors["blk.0.attn_norm.weight"].type == "f32"


@pytest.mark.parametrize(("text", "message"), [
    ("models: [", "is not valid YAML"),
    ("- a\n- b\n", "must be a mapping with models and merge_method"),
    ("slices: []\nmerge_method: slerp\n", "slices are not supported"),
    ("models: [a.gguf, b.gguf]\nmerge_method: linear\ntokenizer_source: union\n",
     "unknown recipe key"),
    ("models: [{model: a.gguf, parameters: {weight: heavy}}]\nmerge_method: linear\n",
     "weight must be a number"),
])
def test_a_bad_recipe_is_one_line(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    with pytest.raises(ModelFileError, match=message) as caught:
        load_recipe(path)
    assert "\n" not in str(caught.value)
