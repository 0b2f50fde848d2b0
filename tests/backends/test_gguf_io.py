"""GGUF tensor I/O: a copy written from what was read is the same model (metadata, tensors,
version), llama.cpp-layout files stay v3, and a bad file is one line."""

from __future__ import annotations

import stat
from pathlib import Path

import numpy as np
import pytest

from orion_fsm import ModelFileError
from orion_fsm.backends._gguf_io import PlannedTensor, open_gguf, write_gguf
from orion_fsm.testing import make_tiny_llama_gguf


@pytest.mark.parametrize("layout", ["runtime", "llama_cpp"])
def test_a_copy_of_what_was_read_is_the_same_model(tmp_path: Path, layout: str) -> None:
    source = make_tiny_llama_gguf(tmp_path / "src" / "m.gguf", n_embd=32,
                                  llama_cpp_layout=layout == "llama_cpp")
    out = tmp_path / "out" / "m.gguf"
    with open_gguf(source) as model:
        plan = [PlannedTensor(n, i.shape, i.type, lambda n=n: model.read(n))  # type: ignore[misc]
                for n, i in model.tensors.items()]
        write_gguf(out, model, plan)
    with open_gguf(source) as a, open_gguf(out) as b:
        assert b.version == a.version == (3 if layout == "llama_cpp" else 2)
        assert b.metadata == a.metadata
        assert list(b.tensors.values()) == list(a.tensors.values())
        for name in a.tensors:
            assert np.array_equal(a.read(name), b.read(name))
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    # A runtime-ready model brings its tokenizer.json along; a v3 one has none to bring.
    assert (out.parent / "tokenizer.json").is_file() == (layout == "runtime")


def test_non_finite_values_are_refused_and_nothing_is_written(tmp_path: Path) -> None:
    source = make_tiny_llama_gguf(tmp_path / "src" / "m.gguf", n_embd=32)
    out = tmp_path / "out.gguf"
    with open_gguf(source) as model:
        plan = [PlannedTensor(n, i.shape, i.type,
                              lambda i=i: np.full(i.shape, np.nan, np.float32))  # type: ignore[misc]
                for n, i in model.tensors.items()]
        with pytest.raises(ModelFileError, match="NaN or infinite values"):
            write_gguf(out, model, plan)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_a_folder_is_not_a_model(tmp_path: Path) -> None:
    with pytest.raises(ModelFileError) as caught:
        open_gguf(tmp_path)
    assert str(tmp_path) in str(caught.value) and "\n" not in str(caught.value)
