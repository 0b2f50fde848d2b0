"""How cache records are stored on disk: tagged JSON, never pickles.

The data-only `Disk` (`open_data_cache`) of every disk tier: it stores the bytes `encode_record`
makes and refuses to unpickle anything it reads, so a crafted database never runs code.
"""

from __future__ import annotations

import base64
import json
import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from orion_fsm._exceptions import CacheError

if TYPE_CHECKING:
    import diskcache

_MAGIC: Final = b"orion-fsm.cache.v1\n"
# Arrays are the embeddings of L2: only these element types are read back.
_ARRAY_DTYPES: Final = frozenset({"float16", "float32"})
_MAX_ARRAY_ITEMS: Final = 1 << 16


class BadRecord(Exception):
    """A stored record that is not one this version wrote: a miss, evicted. Internal: the
    disk tier catches it, so it is no OrionError a caller could meet."""


def encode_record(expires_at: float | None, value: Any) -> bytes:
    """`(expires_at, value)` as bytes; a CacheError for a value plain data cannot hold."""
    try:
        text = json.dumps([expires_at, _tagged(value)], ensure_ascii=False,
                          separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError, RecursionError) as exc:
        raise CacheError(f"a {type(value).__name__} cannot be stored on disk: {exc}") from exc
    return _MAGIC + text.encode("utf-8")


def decode_record(stored: object) -> tuple[float | None, Any]:
    """`(expires_at, value)` from what the disk held; BadRecord if it is not ours."""
    if not isinstance(stored, bytes) or not stored.startswith(_MAGIC):
        raise BadRecord(f"not an orion-fsm cache record (a {type(stored).__name__})")
    try:
        record = json.loads(stored[len(_MAGIC):].decode("utf-8"),
                            parse_constant=_refuse_constant)
    except (ValueError, RecursionError) as exc:
        raise BadRecord(f"not valid JSON: {exc}") from exc
    if not (isinstance(record, list) and len(record) == 2):
        raise BadRecord("not an [expires_at, value] pair")
    expires_at, value = record
    if expires_at is not None and (isinstance(expires_at, bool)
                                   or not isinstance(expires_at, int | float)):
        raise BadRecord(f"expires_at is a {type(expires_at).__name__}")
    return expires_at, _untagged(value)


def _refuse_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def _tagged(value: Any) -> Any:
    # JSON has no bytes, tuples or arrays: each becomes a one-key object with a "$" tag, and
    # a dict whose only key starts with "$" is itself escaped so it reads back unchanged.
    if value is None or isinstance(value, str | bool | int):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{value!r} is not JSON")
        return value
    if isinstance(value, tuple):
        return {"$tuple": [_tagged(v) for v in value]}
    if isinstance(value, list):
        return [_tagged(v) for v in value]
    if isinstance(value, bytes):
        return {"$bytes": base64.b64encode(value).decode("ascii")}
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            raise TypeError("dict keys must be text")
        plain = {k: _tagged(v) for k, v in value.items()}
        return {"$dict": plain} if len(value) == 1 and next(iter(value)).startswith("$") \
            else plain
    numpy = sys.modules.get("numpy")
    if numpy is not None and isinstance(value, numpy.ndarray):
        if value.ndim != 1 or value.dtype.name not in _ARRAY_DTYPES:
            raise TypeError(f"only 1-d float arrays are stored, not {value.dtype}{value.shape}")
        return {"$array": [value.dtype.name,
                           base64.b64encode(value.astype(value.dtype.newbyteorder("<"))
                                            .tobytes()).decode("ascii")]}
    raise TypeError(f"a {type(value).__name__} is not plain data")


def _untagged(value: Any) -> Any:
    if isinstance(value, list):
        return [_untagged(v) for v in value]
    if not isinstance(value, dict):
        return value
    if len(value) == 1:
        tag, inner = next(iter(value.items()))
        if tag == "$tuple" and isinstance(inner, list):
            return tuple(_untagged(v) for v in inner)
        if tag == "$bytes" and isinstance(inner, str):
            return _b64(inner)
        if tag == "$dict" and isinstance(inner, dict):
            return {k: _untagged(v) for k, v in inner.items()}
        if tag == "$array":
            return _array(inner)
        if tag.startswith("$"):
            raise BadRecord(f"unknown tag {tag!r}")
    return {k: _untagged(v) for k, v in value.items()}


def _b64(text: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except ValueError as exc:
        raise BadRecord(f"bad base64: {exc}") from exc


def _array(inner: object) -> Any:
    import numpy as np

    if not (isinstance(inner, list) and len(inner) == 2 and inner[0] in _ARRAY_DTYPES
            and isinstance(inner[1], str)):
        raise BadRecord("bad array record")
    dtype = np.dtype(inner[0]).newbyteorder("<")
    raw = _b64(inner[1])
    if len(raw) % dtype.itemsize or len(raw) // dtype.itemsize > _MAX_ARRAY_ITEMS:
        raise BadRecord("bad array size")
    return np.frombuffer(raw, dtype=dtype).astype(np.dtype(inner[0]))


def _disk_class() -> type[diskcache.Disk]:
    import diskcache

    class _DataDisk(diskcache.Disk):  # type: ignore[misc]
        """diskcache's Disk that never unpickles: keys and values are read raw or refused."""

        def get(self, key: Any, raw: bool) -> Any:
            if not raw:
                raise BadRecord("a pickled key")
            return super().get(key, raw)

        def fetch(self, mode: int, filename: str | None, value: Any, read: bool) -> Any:
            if mode not in (diskcache.core.MODE_RAW, diskcache.core.MODE_BINARY) or read:
                raise BadRecord(f"a record of diskcache mode {mode}, not raw bytes")
            return super().fetch(mode, filename, value, read)

        def store(self, value: Any, read: bool, key: Any = diskcache.core.UNKNOWN) -> Any:
            if not isinstance(value, bytes) or read:
                raise CacheError("the disk tier stores encoded records (bytes) only")
            return super().store(value, read, key=key)

    return _DataDisk


_disk: type[diskcache.Disk] | None = None


def open_data_cache(directory: Path, *, size_limit: int, timeout: float) -> diskcache.Cache:
    """A diskcache `Cache` over the data-only Disk (one class, made on first use)."""
    import diskcache

    global _disk
    if _disk is None:
        _disk = _disk_class()
    return diskcache.Cache(str(directory), size_limit=size_limit, timeout=timeout,
                           eviction_policy="least-recently-used", disk=_disk)
