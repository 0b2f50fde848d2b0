"""Sharded GGUF models: N part files whose concatenation is the model, and their JSON manifest.

The model is rewritten with its embeddings and first layers first, then cut at tensor
boundaries into parts of about equal size; the first part also holds the header. The
manifest names each part (size, sha256, tensors) and the whole (size, sha256).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Final

from orion_fsm._exceptions import ModelFileError, ModelLoadError
from orion_fsm._files import make_private_dirs

from ._convert import MODEL_FILENAME, TOKENIZER_FILENAME, file_sha256
from ._gguf_io import GGUFFile, PlannedTensor, open_gguf, replace_atomically, write_gguf

__all__ = [
    "MANIFEST_FILENAME",
    "MAX_SHARDS",
    "ShardEntry",
    "ShardManifest",
    "assembled_dir",
    "copy_verified",
    "is_manifest",
    "load_order",
    "read_manifest",
    "write_shards",
]

MANIFEST_FILENAME: Final = "manifest.json"
MAX_SHARDS: Final = 16
_FORMAT: Final = "orion-fsm-shards"
_VERSION: Final = 1
_CHUNK: Final = 1 << 20
_BLOCK: Final = re.compile(r"^blk\.(\d+)\.")


@dataclass(frozen=True, slots=True)
class ShardEntry:
    """One part: its file (beside the manifest), where it sits in the model, what it holds."""

    file: str
    offset: int
    size: int
    sha256: str
    tensors: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class ShardManifest:
    """A sharded model: its parts in order and the digest of the whole they make."""

    path: Path  # the manifest file
    name: str
    architecture: str
    size: int
    sha256: str
    shards: tuple[ShardEntry, ...]
    tokenizer: str | None  # a tokenizer.json beside the parts (runtime-ready v2 models)

    def shard_path(self, entry: ShardEntry) -> Path:
        return self.path.parent / entry.file


def assembled_dir(cache_dir: Path, model_sha256: str) -> Path:
    """Where the loader keeps the model assembled from the parts of the one with this digest."""
    return cache_dir / "assembled" / model_sha256[:16]


def load_order(names: list[str]) -> list[str]:
    """Tensors in the order a forward pass needs them: embeddings, blocks 0, 1, ..., the rest
    (final norm, output). Ties keep the file's order."""
    def rank(item: tuple[int, str]) -> tuple[int, int, int]:
        index, name = item
        if name.startswith("token_embd"):
            return (0, 0, index)
        block = _BLOCK.match(name)
        if block is not None:
            return (1, int(block.group(1)), index)
        return (2, 0, index)

    return [name for _, name in sorted(enumerate(names), key=rank)]


def is_manifest(path: Path) -> bool:
    """Whether `path` is a shard manifest (a JSON file), rather than a GGUF model."""
    try:
        with path.open("rb") as f:
            return f.read(1) == b"{"
    except OSError:
        return False


def write_shards(source: Path, shards: int, output_dir: Path) -> ShardManifest:
    """Shard `source` into `shards` parts in `output_dir` (a new folder), with its manifest.

    Everything is written into a temporary folder beside `output_dir` and renamed into place
    at the end: an interrupted run leaves no folder.
    """
    if not 1 <= shards <= MAX_SHARDS:
        raise ModelFileError(f"--shards must be between 1 and {MAX_SHARDS}, got {shards}")
    output_dir = Path(output_dir)
    if output_dir.exists() and (not output_dir.is_dir() or any(output_dir.iterdir())):
        raise ModelFileError(f"{output_dir} already exists and is not an empty folder; "
                             "choose a new --output folder")
    with open_gguf(source) as model:
        if len(model.tensors) < shards:
            raise ModelFileError(f"{source} has {len(model.tensors)} tensors: it cannot make "
                                 f"{shards} shards; use fewer")
        try:
            make_private_dirs(output_dir.parent)
        except OSError as exc:
            raise ModelFileError(f"cannot create {output_dir.parent}: {exc}") from exc
        work = Path(tempfile.mkdtemp(dir=output_dir.parent, prefix=f".{output_dir.name}."))
        try:
            manifest = _write_parts(model, shards, work, output_dir)
            if output_dir.exists():
                output_dir.rmdir()  # empty (checked above): the rename takes its place
            os.replace(work, output_dir)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
    return manifest


def _write_parts(model: GGUFFile, shards: int, work: Path, final_dir: Path) -> ShardManifest:
    import gguf

    ordered = work / ".ordered.gguf"
    plan = [_copied(model, name) for name in load_order(list(model.tensors))]
    write_gguf(ordered, model, plan)  # and the tokenizer.json beside the source, if any
    reader = gguf.GGUFReader(ordered)
    starts = [(t.name, int(t.data_offset), int(t.n_bytes)) for t in reader.tensors]
    del reader
    size = ordered.stat().st_size
    # Cut before the tensor that brings the running size past each i/N of the data.
    data_start = starts[0][1]
    target = (size - data_start) / shards
    cuts = [0]
    for i, (_, offset, _) in enumerate(starts[1:], start=1):
        need = len(cuts)
        if need < shards and offset - data_start >= need * target \
                and len(starts) - i >= shards - need:
            cuts.append(offset)
    while len(cuts) < shards:  # tiny tensors at the end: cut before the last ones
        cuts.append(starts[len(starts) - (shards - len(cuts))][1])
    bounds = [*cuts, size]
    entries = []
    with ordered.open("rb") as src:
        for i in range(shards):
            begin, end = bounds[i], bounds[i + 1]
            name = f"model-{i + 1:05d}-of-{shards:05d}.gguf.part"
            held = tuple(n for n, off, _ in starts if begin <= off < end)
            digest = _copy_range(src, begin, end, work / name)
            entries.append(ShardEntry(name, begin, end - begin, digest, held))
    whole = file_sha256(ordered)
    ordered.unlink()
    tokenizer = model.tokenizer_beside
    doc = {
        "format": _FORMAT, "version": _VERSION,
        "model": {"name": str(model.metadata.get("general.name", model.path.stem)),
                  "architecture": model.architecture, "size": size, "sha256": whole,
                  "source": model.path.name},
        "order": "embeddings, then blocks 0..n-1, then the final norm and output",
        "tokenizer": TOKENIZER_FILENAME if tokenizer is not None else None,
        "shards": [{"file": e.file, "offset": e.offset, "size": e.size, "sha256": e.sha256,
                    "tensors": list(e.tensors)} for e in entries],
    }
    replace_atomically(work / MANIFEST_FILENAME,
                       lambda tmp: tmp.write_text(json.dumps(doc, indent=1) + "\n"))
    return read_manifest(final_dir / MANIFEST_FILENAME, doc)


def _copied(model: GGUFFile, name: str) -> PlannedTensor:
    info = model.tensors[name]
    return PlannedTensor(name, info.shape, info.type, lambda: model.raw(name))


def _copy_range(src: BinaryIO, begin: int, end: int, dest: Path) -> str:
    digest = hashlib.sha256()
    src.seek(begin)
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as out:
        left = end - begin
        while left > 0:
            chunk = src.read(min(_CHUNK, left))
            if not chunk:
                raise ModelFileError(f"{dest}: the model ended early while sharding")
            digest.update(chunk)
            out.write(chunk)
            left -= len(chunk)
        out.flush()
        os.fsync(out.fileno())
    return digest.hexdigest()


def read_manifest(path: Path, doc: Any = None) -> ShardManifest:
    """Parse and check a manifest (not its parts); a bad one is a one-line ModelFileError."""
    path = Path(path)
    if doc is None:
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ModelFileError(f"shard manifest {path} does not exist") from None
        except (OSError, ValueError) as exc:
            raise ModelFileError(f"shard manifest {path} is not readable JSON ({exc}); "
                                 "shard the model again") from None
    try:
        if doc["format"] != _FORMAT or doc["version"] != _VERSION:
            raise ValueError(f"format {doc['format']!r} version {doc['version']!r}")
        model = doc["model"]
        shards = tuple(ShardEntry(str(s["file"]), int(s["offset"]), int(s["size"]),
                                  str(s["sha256"]), tuple(map(str, s["tensors"])))
                       for s in doc["shards"])
        manifest = ShardManifest(path, str(model["name"]), str(model["architecture"]),
                                 int(model["size"]), str(model["sha256"]), shards,
                                 None if doc.get("tokenizer") is None else str(doc["tokenizer"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelFileError(f"shard manifest {path} is malformed ({exc}); shard the model "
                             "again") from None
    expected = 0
    for entry in manifest.shards:
        if entry.offset != expected or "/" in entry.file or entry.file.startswith("."):
            raise ModelFileError(f"shard manifest {path}: part {entry.file} does not follow "
                                 "the previous one; shard the model again")
        expected += entry.size
    if not manifest.shards or expected != manifest.size:
        raise ModelFileError(f"shard manifest {path}: its parts make {expected} bytes, not "
                             f"the model's {manifest.size}; shard the model again")
    return manifest


def copy_verified(manifest: ShardManifest, entry: ShardEntry, out: BinaryIO,
                  progress: Callable[[int], None] | None = None) -> None:
    """Append one part to `out`, checking its size and sha256 against the manifest."""
    part = manifest.shard_path(entry)
    digest = hashlib.sha256()
    copied = 0
    try:
        with part.open("rb") as f:
            while chunk := f.read(_CHUNK):
                digest.update(chunk)
                out.write(chunk)
                copied += len(chunk)
                if progress is not None:
                    progress(len(chunk))
    except FileNotFoundError:
        raise ModelFileError(f"shard {part} is missing; copy it back or shard the model "
                             "again") from None
    except OSError as exc:
        raise ModelFileError(f"cannot read shard {part}: {exc.strerror or exc}") from None
    if copied != entry.size or digest.hexdigest() != entry.sha256:
        raise ModelFileError(f"shard {part} is corrupt (size {copied}, expected {entry.size}, "
                             "or its sha256 differs); copy it again or shard the model again")


PartHook = Callable[[int, int, ShardEntry], AbstractContextManager[object]]  # index, count


def assemble(manifest_path: Path, cache_dir: Path, *, part: PartHook | None = None,
             progress: Callable[[str, int, int], None] | None = None) -> tuple[Path, bool]:
    """The model a manifest's parts make, as one GGUF file in the cache (by the model's
    sha256), and whether it was there already. Each part is checked (size, sha256) as it is
    appended, inside `part(index, count, entry)`; the file appears only once complete.
    A bad manifest or part is one `ModelLoadError` line."""
    try:
        manifest = read_manifest(manifest_path)
        target = assembled_dir(cache_dir, manifest.sha256)
        model = target / MODEL_FILENAME
        if model.is_file() and model.stat().st_size == manifest.size:
            return model, True
        try:
            make_private_dirs(target)
        except OSError as exc:
            raise ModelFileError(f"cannot create {target}: {exc}") from exc
        done = 0

        def advanced(n: int) -> None:
            nonlocal done
            done += n
            if progress is not None:
                progress("shards", done, manifest.size)

        def write(tmp: Path) -> None:
            with tmp.open("wb") as out:
                for index, entry in enumerate(manifest.shards):
                    with (part(index, len(manifest.shards), entry) if part is not None
                          else nullcontext()):
                        copy_verified(manifest, entry, out, advanced)
                out.flush()
                os.fsync(out.fileno())

        if manifest.tokenizer is not None:
            tokenizer = manifest.path.parent / manifest.tokenizer
            replace_atomically(target / TOKENIZER_FILENAME,
                               lambda tmp: shutil.copyfile(tokenizer, tmp))
        replace_atomically(model, write)  # last: its presence means the whole is there
        return model, False
    except ModelFileError as exc:
        raise ModelLoadError(exc.message) from exc
