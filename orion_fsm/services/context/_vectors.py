"""The context store's vectors: int8 with a scale each until the store holds enough of them
to learn a product quantizer from, then that quantizer's codes (`_quantize`), read back into one
float32 matrix that a query searches by brute force."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

from ._quantize import ProductQuantizer, unpack_int8

if TYPE_CHECKING:
    import sqlite3

    import numpy as np

__all__ = ["PQ_TRAIN", "Vectors", "decode", "learn_codebook", "nearest", "read_all",
           "read_codebook"]

# Vectors stay int8 (388 bytes) until the store holds this many, then a product quantizer is
# learnt on them and every vector becomes `dim / PQ_DIMS` one-byte codes, in one transaction.
PQ_TRAIN: Final = 2048
PQ_DIMS: Final = 8  # dimensions a code stands for: 384 -> 48 bytes a vector


@dataclass(slots=True)
class Vectors:
    """The store's vectors in memory for a brute-force cosine search. int8 on disk, float32
    here: numpy has no fast float16 or int8 product (7,400 x 384 on the loaded 2-core
    machine: 107 ms in float16, ~11 ms in float32 with the top-k partition)."""

    ids: Any = None  # np.ndarray[int64]
    matrix: Any = None  # np.ndarray[float32], one unit row per id
    removed: set[int] = field(default_factory=set)


def read_codebook(db: sqlite3.Connection) -> ProductQuantizer | None:
    """The store's product quantizer, or None while its vectors are int8."""
    row = db.execute("SELECT groups, centroids FROM codebook WHERE id = 0").fetchone()
    return None if row is None else ProductQuantizer.from_bytes(row[1], groups=row[0])


def decode(quantizer: ProductQuantizer | None, blobs: Sequence[bytes]) -> np.ndarray:
    """Stored vectors as unit float32 rows: int8 ones, or codes of `quantizer`."""
    import numpy as np

    if quantizer is None:
        return unpack_int8(blobs)
    codes = np.frombuffer(b"".join(blobs), dtype=np.uint8).reshape(len(blobs), -1)
    return quantizer.decode(codes)


def read_all(db: sqlite3.Connection) -> tuple[Any, Any]:
    """(ids, unit float32 rows) of every stored vector, or (None, None) if none."""
    import numpy as np

    db.execute("BEGIN")  # the codebook and the codes it decodes, from one snapshot
    try:
        quantizer = read_codebook(db)
        rows = db.execute("SELECT chunk, vector FROM vectors ORDER BY chunk").fetchall()
    finally:
        db.execute("COMMIT")
    if not rows:
        return None, None
    ids = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
    return ids, decode(quantizer, [r[1] for r in rows])


def learn_codebook(db: sqlite3.Connection) -> bool:
    """Inside a transaction, once the store holds `PQ_TRAIN` int8 vectors (and none is
    coded yet): learn the product quantizer on them and replace each by its codes."""
    import numpy as np

    first = db.execute("SELECT vector FROM vectors LIMIT 1").fetchone()
    if first is None or not ProductQuantizer.fits(len(first[0]) - 4, PQ_DIMS):
        return False
    if db.execute("SELECT count(*) FROM vectors").fetchone()[0] < PQ_TRAIN:
        return False
    rows = db.execute("SELECT chunk, vector FROM vectors ORDER BY chunk").fetchall()
    floats = unpack_int8([r[1] for r in rows])
    # A store migrated with many vectors learns from a sample spread over all of them.
    sample = floats[np.linspace(0, len(floats) - 1, min(len(floats), 2 * PQ_TRAIN),
                                dtype=np.intp)]
    quantizer = ProductQuantizer.train(sample, dims_per_group=PQ_DIMS)
    codes = quantizer.encode(floats)
    db.execute("INSERT INTO codebook(id, groups, centroids) VALUES (0, ?, ?)",
               (quantizer.groups, quantizer.to_bytes()))
    # Deleted and inserted again in id order rather than updated in place: the rows
    # shrink eightfold and would leave their pages mostly empty.
    db.execute("DELETE FROM vectors")
    db.executemany("INSERT INTO vectors(chunk, vector) VALUES (?, ?)",
                   [(r[0], c.tobytes()) for r, c in zip(rows, codes, strict=True)])
    return True


def nearest(vectors: Vectors, q: np.ndarray, limit: int) -> list[tuple[int, float]]:
    """(chunk id, cosine) of the `limit` vectors closest to unit vector `q`, best first,
    those of removed chunks left out."""
    import numpy as np

    ids, matrix = vectors.ids, vectors.matrix
    n = min(len(ids), len(matrix))  # a batch being appended meanwhile waits for the next
    scores = matrix[:n] @ q.astype(np.float32)
    want = min(n, limit + len(vectors.removed))
    top = np.argpartition(-scores, want - 1)[:want] if want < n else np.arange(n)
    order = top[np.argsort(-scores[top])]
    out: list[tuple[int, float]] = []
    for i in order:
        chunk_id = int(ids[i])
        if chunk_id not in vectors.removed:
            out.append((chunk_id, float(scores[i])))
            if len(out) == limit:
                break
    return out
