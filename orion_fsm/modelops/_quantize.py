"""`quantize_model`: rewrite a GGUF model with its matrices in one block type (q8_0 ... q4_0).

Tensor by tensor: each matrix is dequantized from the source and quantized again; vectors
(norms) stay as they are, as llama.cpp's quantizer leaves them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Final

from orion_fsm._exceptions import ModelFileError
from orion_fsm.backends._gguf_io import (
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

__all__ = ["quantize_model"]

_EIGHT_BIT: Final = "q8_0"
_EIGHT_BITS: Final = frozenset({"token_embd.weight", "output.weight"})


def check_type(type_name: str, allowed: tuple[str, ...] = QUANT_TYPES) -> str:
    """The type name in lower case; an unknown one is a one-line error listing the known."""
    name = type_name.lower()
    if name not in allowed:
        raise ModelFileError(
            f"unknown quantization type {type_name!r}; use one of {', '.join(allowed)}")
    return name


def quantize_model(source: Path, output: Path, type_name: str, *,
                   progress: ProgressCallback | None = None) -> ModelOpResult:
    """Write `source` quantized to `type_name` at `output` (atomically, 0600)."""
    qtype = check_type(type_name)
    if Path(output).resolve() == Path(source).resolve():
        raise ModelFileError(f"the output {output} is the source; choose another --output")
    with open_gguf(source) as model:
        plan = [_planned(model, info, qtype) for info in model.tensors.values()]
        write_gguf(Path(output), model, plan, file_type=qtype,
                   metadata={"orion.quantized_from": model.path.name}, progress=progress)
        return ModelOpResult.of(output, inputs=(model.path,), operation=f"quantize {qtype}")


def _planned(model: GGUFFile, info: TensorInfo, qtype: str) -> PlannedTensor:
    if info.name in _EIGHT_BITS and quantizable(info, _EIGHT_BIT):
        # The embeddings (tied: also the output layer) are the matrix every token goes through
        # twice; llama.cpp keeps them at 8 bits or more, and so does this (measured on
        # SmolLM2: top-1 agreement 0.83 -> see bench modelops.quantize for q4_1).
        qtype = _EIGHT_BIT
    if not quantizable(info, qtype) or info.type == qtype:
        # Kept as stored: vectors, and matrices already in the type (requantizing only loses).
        return PlannedTensor(info.name, info.shape, info.type, lambda: model.raw(info.name))
    return PlannedTensor(info.name, info.shape, qtype, lambda: model.read(info.name))
