"""make_tiny_llama_gguf: small real models for fast tests and benchmarks."""

from __future__ import annotations

from pathlib import Path

import pytest

from orion_fsm.backends import LoadedModel, SamplingParams, read_gguf_header
from orion_fsm.testing import TINY_SPECIAL_TOKENS, make_tiny_llama_gguf

SIZES = [(1, 32), (2, 64), (3, 96), (4, 128)]


def test_four_sizes_give_four_distinct_loadable_models(tmp_path: Path) -> None:
    paths = [
        make_tiny_llama_gguf(tmp_path / f"tiny-{layers}x{embd}.gguf", n_layers=layers, n_embd=embd)
        for layers, embd in SIZES
    ]
    sizes = [p.stat().st_size for p in paths]
    assert sizes == sorted(sizes) and len(set(sizes)) == 4
    assert all(p.stat().st_size < 4 * 2**20 for p in paths)  # milliseconds to load
    texts = set()
    for path in paths:
        header = read_gguf_header(path)
        assert header.version == 2
        assert header.metadata["general.architecture"] == "llama"
        with LoadedModel.load(
            path, tmp_path / "tokenizer.json", context_length=128, threads=1
        ) as model:
            outcome = model.generate(
                model.tokenizer.encode("<|im_start|>user\nhello<|im_end|>\n"),
                SamplingParams(temperature=0, max_tokens=16),
                on_event=lambda event: None,
                should_stop=lambda: False,
            )
        assert len(outcome.token_ids) == 16
        texts.add(outcome.text)
    assert len(texts) == 4


def test_same_arguments_write_the_same_file(tmp_path: Path) -> None:
    a = make_tiny_llama_gguf(tmp_path / "a" / "m.gguf", seed=3)
    b = make_tiny_llama_gguf(tmp_path / "b" / "m.gguf", seed=3)
    c = make_tiny_llama_gguf(tmp_path / "c" / "m.gguf", seed=4)
    assert a.read_bytes() == b.read_bytes() != c.read_bytes()
    assert (a.parent / "tokenizer.json").read_bytes() == (c.parent / "tokenizer.json").read_bytes()


def test_tiny_vocabulary_has_chatml_special_tokens(tmp_path: Path) -> None:
    path = make_tiny_llama_gguf(tmp_path / "m.gguf")
    with LoadedModel.load(path, tmp_path / "tokenizer.json", context_length=64, threads=1) as model:
        tokenizer = model.tokenizer
        assert [tokenizer.token_id(t) for t in TINY_SPECIAL_TOKENS] == [0, 1, 2]
        assert model.eos_token_ids == {0, 2}
        ids = tokenizer.encode("<|im_start|>user\nWhat is the answer?<|im_end|>")
        assert ids[0] == 1 and ids[-1] == 2
        assert tokenizer.decode(ids) == "<|im_start|>user\nWhat is the answer?<|im_end|>"
        assert len(tokenizer.encode(" the")) == 1  # merges apply


def test_llama_cpp_layout_needs_conversion(tmp_path: Path) -> None:
    path = make_tiny_llama_gguf(tmp_path / "m.gguf", llama_cpp_layout=True)
    header = read_gguf_header(path)
    assert header.version == 3
    assert "output.weight" not in header.tensor_names
    assert "tokenizer.ggml.scores" not in header.array_keys
    assert not (tmp_path / "tokenizer.json").exists()


def test_heads_must_divide_the_embedding(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="heads"):
        make_tiny_llama_gguf(tmp_path / "m.gguf", n_embd=30)
