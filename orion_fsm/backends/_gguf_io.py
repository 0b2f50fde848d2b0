"""GGUF tensor I/O: read a model file as named float32 tensors, one at a time, and write one.

Reading memory-maps the file and dequantizes a tensor only when asked (`gguf.quants`), so
model operations stream tensor by tensor. Writing keeps the source's metadata and GGUF
version, quantizes per tensor, and replaces the destination only once the file is complete.
"""

from __future__ import annotations

import contextlib
import math
import shutil
import struct
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from orion_fsm._exceptions import ModelFileError, ModelLoadError
from orion_fsm._files import make_private_dirs, write_atomically

from ._convert import TOKENIZER_FILENAME, _field_value, read_gguf_header

__all__ = [
    "FLOAT_TYPES",
    "QUANT_TYPES",
    "GGUFFile",
    "PlannedTensor",
    "TensorInfo",
    "open_gguf",
    "quantizable",
    "replace_atomically",
    "stored_size",
    "write_gguf",
]

if TYPE_CHECKING:
    # numpy is imported where tensors are read or written: `import orion_fsm` stays without it
    # (the loader imports the shard format, which imports this module).
    import numpy as np
    import numpy.typing as npt

    Float32Array = npt.NDArray[np.float32]

ProgressCallback = Callable[[str, int, int], None]

# The block types ctransformers' 2023 ggml loads and `gguf.quants` writes in numpy (each
# checked by loading and generating: tests/backends/test_gguf_io.py).
QUANT_TYPES: Final = ("q8_0", "q5_1", "q5_0", "q4_1", "q4_0")
FLOAT_TYPES: Final = ("f32", "f16")
# general.file_type (llama.cpp's LlamaFileType) of a file whose matrices are all one type.
_FILE_TYPES: Final[Mapping[str, int]] = {
    "f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q8_0": 7, "q5_0": 8, "q5_1": 9,
}
_ALIGNMENT_KEY: Final = "general.alignment"


@dataclass(frozen=True, slots=True)
class TensorInfo:
    """One tensor as the file declares it; `shape` is numpy's order (rows, ..., row)."""

    name: str
    shape: tuple[int, ...]
    type: str  # lower-case ggml type name: f32, f16, q8_0, q4_1, q6_k, ...
    n_bytes: int

    @property
    def n_elements(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True, slots=True)
class PlannedTensor:
    """A tensor to write: its name, numpy shape and stored type, and how to make its data.

    `produce` returns either the float values (quantized here to `type`) or, for a tensor
    copied unchanged, the stored bytes (uint8) of that type. It is called once, in file order,
    while the file is written: only one tensor is in memory at a time.
    """

    name: str
    shape: tuple[int, ...]
    type: str
    produce: Callable[[], npt.NDArray[Any]]


def _qtype(name: str) -> Any:
    from gguf import GGMLQuantizationType

    return GGMLQuantizationType[name.upper()]


def stored_size(shape: Sequence[int], type_name: str) -> int:
    """Bytes a tensor of this shape takes when stored as `type_name`."""
    from gguf import GGML_QUANT_SIZES

    block, size = GGML_QUANT_SIZES[_qtype(type_name)]
    return math.prod(shape) // block * size


def quantizable(info: TensorInfo, type_name: str) -> bool:
    """Whether `info` may be stored as `type_name`: matrices whose rows fill whole blocks.

    Vectors (norms, biases) stay float as llama.cpp's quantizer leaves them: they are tiny
    and the precision they lose costs far more than the bytes they save.
    """
    from gguf import GGML_QUANT_SIZES

    if type_name == "f32":
        return True
    if len(info.shape) < 2:
        return False  # and ctransformers' ggml aborts the process on an f16 norm vector
    block, _ = GGML_QUANT_SIZES[_qtype(type_name)]
    return info.shape[-1] % block == 0


class GGUFFile:
    """An open GGUF file: its metadata, tensor table, and tensors read one at a time."""

    def __init__(self, path: Path) -> None:
        import gguf

        self.path = path
        header = read_gguf_header(path)  # one-line errors for a missing or truncated file
        self.version = header.version
        self._reader = gguf.GGUFReader(path)
        if self._reader.endianess != gguf.GGUFEndian.LITTLE:
            raise ModelFileError(f"{path} is a big-endian GGUF file; use a little-endian one")
        self._tensors = {t.name: t for t in self._reader.tensors}
        self.tensors: Mapping[str, TensorInfo] = {
            t.name: TensorInfo(t.name, tuple(int(d) for d in reversed(t.shape)),
                               t.tensor_type.name.lower(), int(t.n_bytes))
            for t in self._reader.tensors
        }

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", "?"))

    @property
    def metadata(self) -> Mapping[str, Any]:
        """Scalar and string metadata values (arrays are left out: vocabularies are large)."""
        import gguf

        values: dict[str, Any] = {}
        for name, field in self._reader.fields.items():
            if name.startswith("GGUF.") or field.types[0] == gguf.GGUFValueType.ARRAY:
                continue
            values[name] = field.contents()
        return values

    @property
    def tokenizer_beside(self) -> Path | None:
        """The tokenizer.json next to the file (runtime-ready GGUF v2 models have one)."""
        beside = self.path.parent / TOKENIZER_FILENAME
        return beside if beside.is_file() else None

    def raw(self, name: str) -> npt.NDArray[Any]:
        """The tensor's stored bytes (or values, for float types), as the file holds them."""
        data: npt.NDArray[Any] = self._tensors[name].data
        return data

    def read(self, name: str) -> Float32Array:
        """The tensor dequantized to float32, in numpy's shape order."""
        import numpy as np
        from gguf.quants import dequantize

        tensor = self._tensors[name]
        info = self.tensors[name]
        try:
            values = dequantize(tensor.data, tensor.tensor_type)
        except NotImplementedError as exc:
            raise ModelFileError(
                f"{self.path}: tensor {name} is stored as {info.type}, which cannot be read "
                "back here; use a model stored as f32, f16, q8_0, q5_x, q4_x or k-quants"
            ) from exc
        return np.asarray(values, dtype=np.float32).reshape(info.shape)

    def fields(self) -> Iterator[Any]:
        """The gguf-py metadata fields, in file order (for writing a copy)."""
        yield from self._reader.fields.values()

    def close(self) -> None:
        # The reader holds a memory map; dropping it lets the mapping go.
        self._tensors = {}
        with contextlib.suppress(AttributeError):
            del self._reader

    def __enter__(self) -> GGUFFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_gguf(path: Path | str) -> GGUFFile:
    """Open a GGUF model; a missing, truncated or malformed file is one `ModelFileError`."""
    path = Path(path)
    try:
        return GGUFFile(path)
    except ModelFileError:
        raise
    except ModelLoadError as exc:
        raise ModelFileError(exc.message) from exc
    except (ValueError, KeyError, IndexError, struct.error, OSError) as exc:
        raise ModelFileError(
            f"{path} is not a usable GGUF model file ({exc}); check the file or download it "
            "again") from exc


def write_gguf(
    path: Path,
    like: GGUFFile,
    tensors: Sequence[PlannedTensor],
    *,
    file_type: str | None = None,
    metadata: Mapping[str, str] | None = None,
    progress: ProgressCallback | None = None,
) -> Path:
    """Write a GGUF file at `path` with `like`'s metadata and version and these tensors.

    `file_type` sets general.file_type; `metadata` adds or replaces string keys (e.g. where
    a merge came from). The file is written to a temporary name beside `path`, synced and
    renamed over it: an interrupted write leaves nothing. The tokenizer.json beside `like`, if
    any, is copied beside `path`. Files are private (0600).
    """
    import gguf
    import numpy as np

    path = Path(path)
    try:
        make_private_dirs(path.parent)
    except OSError as exc:
        raise ModelFileError(f"cannot create the output folder {path.parent}: {exc}") from exc
    extra = dict(metadata or {})

    def write(tmp: Path) -> None:
        writer = gguf.GGUFWriter(tmp, arch=like.architecture, endianess=gguf.GGUFEndian.LITTLE)
        for field in like.fields():
            if field.name.startswith("GGUF.") or field.name == "general.architecture":
                continue
            if field.name in extra:
                continue
            vtype = field.types[0]
            sub_type = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
            value: Any = _field_value(field, gguf)
            if field.name == "general.file_type" and file_type is not None:
                value = _FILE_TYPES.get(file_type, value)
            elif field.name == _ALIGNMENT_KEY:
                writer.data_alignment = int(value)
            writer.add_key_value(field.name, value, vtype, sub_type=sub_type)
        for key, text in extra.items():
            writer.add_string(key, text)
        for t in tensors:
            nbytes = stored_size(t.shape, t.type)
            if t.type in FLOAT_TYPES:
                dtype = np.float32 if t.type == "f32" else np.float16
                writer.add_tensor_info(t.name, t.shape, np.dtype(dtype), nbytes)
            else:
                byte_shape = (*t.shape[:-1], nbytes // max(1, math.prod(t.shape[:-1])))
                writer.add_tensor_info(t.name, byte_shape, np.dtype(np.uint8), nbytes,
                                       raw_dtype=_qtype(t.type))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        total = sum(stored_size(t.shape, t.type) for t in tensors)
        done = 0
        for t in tensors:
            data = _stored(t, t.produce())
            writer.write_tensor_data(data, tensor_endianess=gguf.GGUFEndian.LITTLE)
            done += int(data.nbytes)
            if progress is not None:
                progress("write", done, total)
        writer.close()
        if like.version != 3:
            # gguf-py always writes v3; a v2 source (what ctransformers loads) stays v2.
            with tmp.open("r+b") as f:
                f.seek(4)
                f.write(struct.pack("<I", like.version))

    replace_atomically(path, write)
    tokenizer = like.tokenizer_beside
    beside = path.parent / TOKENIZER_FILENAME
    if tokenizer is not None and tokenizer.resolve() != beside.resolve():
        replace_atomically(beside,
                           lambda tmp: shutil.copyfile(tokenizer, tmp))
    return path


def _stored(t: PlannedTensor, data: npt.NDArray[Any]) -> npt.NDArray[Any]:
    """The bytes (or float values) of `t` as its type stores them."""
    import numpy as np
    from gguf.quants import quantize

    if data.dtype == np.uint8 and t.type not in FLOAT_TYPES:
        return data  # already stored bytes of this type, copied unchanged
    values = np.ascontiguousarray(data, dtype=np.float32).reshape(t.shape)
    if not np.isfinite(values).all():
        raise ModelFileError(
            f"tensor {t.name} has NaN or infinite values; the inputs are corrupt or the "
            "merge weights overflow")
    if t.type == "f32":
        return values
    if t.type == "f16":
        return values.astype(np.float16)
    stored: npt.NDArray[Any] = quantize(values, _qtype(t.type))
    return stored


def replace_atomically(path: Path, write: Callable[[Path], object]) -> None:
    """`write_atomically`, its failure a one-line ModelFileError."""
    try:
        write_atomically(path, write)
    except OSError as exc:
        raise ModelFileError(f"cannot write {path}: {exc.strerror or exc}") from exc
