"""`quantize_model` on tiny models: every type loads and generates in ctransformers, matrices
are stored in the type asked for, vectors stay f32, and bad input is one line."""

from __future__ import annotations

import stat
from pathlib import Path

import numpy as np
import pytest

from orion_fsm import LoadedModel, ModelFileError
from orion_fsm.backends import SamplingParams, Tokenizer
from orion_fsm.backends._gguf_io import open_gguf
from orion_fsm.modelops import QUANT_TYPES, quantize_model

# Worst mean relative error of a matrix after a round trip, per type (4-bit is coarse; the
# tiny models' embeddings hold a large constant column that widens every block's scale).
_TOLERANCE = {"q8_0": 0.02, "q5_1": 0.1, "q5_0": 0.12, "q4_1": 0.2, "q4_0": 0.24}


@pytest.mark.parametrize("qtype", QUANT_TYPES)
def test_every_type_is_written_and_loads_and_generates(tiny_pair: dict[str, Path],
                                                       tmp_path: Path, qtype: str) -> None:
    out = tmp_path / qtype / "model.gguf"
    result = quantize_model(tiny_pair["a"], out, qtype)
    assert result.path == out and result.size_bytes == out.stat().st_size
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    with open_gguf(tiny_pair["a"]) as src, open_gguf(out) as dst:
        assert dst.version == 2  # what ctransformers loads, as the source
        assert dst.metadata["general.file_type"] != src.metadata["general.file_type"]
        for name, info in dst.tensors.items():
            expected = ("q8_0" if name in ("token_embd.weight", "output.weight")
                        else qtype if len(info.shape) == 2 else "f32")
            assert info.type == expected, name
            if len(info.shape) == 2:
                before, after = src.read(name), dst.read(name)
                error = np.abs(after - before).mean() / np.abs(before).mean()
                assert error < _TOLERANCE[qtype], (name, error)
    assert generated(out)


def generated(model_path: Path) -> tuple[int, ...]:
    """Four greedy tokens from the model, through the runtime the engine uses."""
    tokenizer = model_path.parent / "tokenizer.json"
    with LoadedModel.load(model_path, tokenizer, context_length=64, threads=1) as model:
        ids = Tokenizer.from_file(tokenizer).encode("the cat is")
        outcome = model.generate(ids, SamplingParams(max_tokens=4, temperature=0, top_k=1),
                                 on_event=lambda _: None, should_stop=lambda: False)
    return outcome.token_ids


def test_smaller_types_make_smaller_files(tiny_pair: dict[str, Path], tmp_path: Path) -> None:
    sizes = {q: quantize_model(tiny_pair["a"], tmp_path / f"{q}.gguf", q).size_bytes
             for q in QUANT_TYPES}
    assert sizes["q8_0"] > sizes["q5_1"] > sizes["q5_0"] > sizes["q4_1"] > sizes["q4_0"]
    # (the embeddings and output stay q8_0 in every type: the differences are the blocks')
    assert sizes["q8_0"] < tiny_pair["a"].stat().st_size


def test_an_unknown_type_is_refused_in_one_line(tiny_pair: dict[str, Path],
                                                tmp_path: Path) -> None:
    with pytest.raises(ModelFileError, match=r"unknown quantization type 'q3_k'; use one of "
                       "q8_0, q5_1") as caught:
        quantize_model(tiny_pair["a"], tmp_path / "out.gguf", "q3_k")
    assert "\n" not in str(caught.value)
    assert not (tmp_path / "out.gguf").exists()


@pytest.mark.parametrize("damage", ["missing", "truncated", "garbage"])
def test_a_missing_or_corrupt_source_is_one_line_and_writes_nothing(
        tiny_pair: dict[str, Path], tmp_path: Path, damage: str) -> None:
    source = tmp_path / "src.gguf"
    if damage == "truncated":
        source.write_bytes(tiny_pair["a"].read_bytes()[:5000])
    elif damage == "garbage":
        source.write_bytes(b"not a model at all" * 10)
    with pytest.raises(ModelFileError) as caught:
        quantize_model(source, tmp_path / "out" / "out.gguf", "q8_0")
    message = str(caught.value)
    assert "\n" not in message and str(source) in message
    assert not (tmp_path / "out" / "out.gguf").exists()


def test_an_interrupted_write_leaves_the_old_file_and_no_temporary(
        tiny_pair: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out.gguf"
    out.write_bytes(b"previous model")
    import gguf.quants

    calls = 0
    real = gguf.quants.quantize

    def failing(data: np.ndarray, qtype: object) -> np.ndarray:
        nonlocal calls
        calls += 1
        if calls == 3:
            raise KeyboardInterrupt  # the user pressed ^C halfway through
        return real(data, qtype)

    monkeypatch.setattr(gguf.quants, "quantize", failing)
    with pytest.raises(KeyboardInterrupt):
        quantize_model(tiny_pair["a"], out, "q8_0")
    assert out.read_bytes() == b"previous model"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.gguf"]
