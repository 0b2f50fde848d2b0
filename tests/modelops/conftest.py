"""Tiny GGUF models for the model-operation tests: two of one shape, one of another."""

from __future__ import annotations

from pathlib import Path

import pytest

from orion_fsm.testing import make_tiny_llama_gguf


@pytest.fixture(scope="session")
def tiny_pair(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """`a`, `b` and `base`: same architecture, different weights; `other`: another size."""
    root = tmp_path_factory.mktemp("modelops")
    return {
        "a": make_tiny_llama_gguf(root / "a" / "a.gguf", n_layers=2, n_embd=64, seed=11),
        "b": make_tiny_llama_gguf(root / "b" / "b.gguf", n_layers=2, n_embd=64, seed=12),
        "base": make_tiny_llama_gguf(root / "base" / "base.gguf", n_layers=2, n_embd=64,
                                     seed=13),
        "other": make_tiny_llama_gguf(root / "other" / "other.gguf", n_layers=2, n_embd=32,
                                      seed=14),
        "deeper": make_tiny_llama_gguf(root / "deeper" / "deeper.gguf", n_layers=3, n_embd=64,
                                       seed=15),
    }
