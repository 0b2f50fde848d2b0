"""How a context store's vectors are kept small: int8 with a scale per vector, then, once the
store holds enough of them to learn from, product-quantization codes (one byte per group of
dimensions, an index into a codebook of 256 centroids per group) read back as float rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    import numpy as np

__all__ = ["ProductQuantizer", "pack_int8", "unpack_int8"]

_CENTROIDS: Final = 256  # one byte a code
# Multiply-adds of one block of rows against a codebook: under OpenBLAS's threading threshold
# (65,536 x 4), so it runs on the calling thread.
_BLOCK: Final = 1 << 17


def pack_int8(vector: np.ndarray) -> bytes:
    """A vector in dim + 4 bytes: int8 components and their float32 scale (max |x| / 127)."""
    import numpy as np

    v = np.asarray(vector, dtype=np.float32)
    scale = float(np.abs(v).max()) / 127.0 or 1.0
    return (np.round(v / scale).astype(np.int8).tobytes()
            + np.asarray([scale], dtype=np.float32).tobytes())


def unpack_int8(blobs: Sequence[bytes]) -> np.ndarray:
    """Packed vectors back to unit float32 rows."""
    import numpy as np

    raw = np.frombuffer(b"".join(blobs), dtype=np.uint8).reshape(len(blobs), -1)
    rows = raw[:, :-4].view(np.int8).astype(np.float32)
    rows *= np.ascontiguousarray(raw[:, -4:]).view(np.float32)
    return _unit(rows)


def _unit(rows: np.ndarray) -> np.ndarray:
    import numpy as np

    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    rows /= np.where(norms > 0, norms, 1.0)
    return rows


@dataclass(frozen=True, slots=True, eq=False)
class ProductQuantizer:
    """A vector cut into `groups` sub-vectors, each replaced by the nearest of 256 centroids
    learnt by k-means on the store's own vectors (Jégou et al., 2011). Searching compares the
    float query with the decoded rows: the asymmetric distance, only the stored side is coded.
    """

    centroids: np.ndarray  # float32 (groups, 256, dims per group), float16-exact

    @property
    def dim(self) -> int:
        return int(self.centroids.shape[0] * self.centroids.shape[2])

    @property
    def groups(self) -> int:
        return int(self.centroids.shape[0])

    @staticmethod
    def fits(dim: int, dims_per_group: int) -> bool:
        """Whether vectors of `dim` components can be coded in groups of `dims_per_group`."""
        return dims_per_group > 0 and dim % dims_per_group == 0 and dim > dims_per_group

    @classmethod
    def train(cls, vectors: np.ndarray, *, dims_per_group: int, iterations: int = 20,
              seed: int = 0) -> ProductQuantizer:
        """Learn the codebook from `vectors` (n x dim, n >= 256): k-means per group, seeded so
        the same vectors give the same codebook."""
        import numpy as np

        x = np.ascontiguousarray(vectors, dtype=np.float32)
        n, dim = x.shape
        if n < _CENTROIDS or not cls.fits(dim, dims_per_group):
            raise ValueError(f"cannot learn {_CENTROIDS} centroids of {dims_per_group} "
                             f"dimensions from {n} vectors of {dim}")
        rng = np.random.default_rng(seed)
        groups = dim // dims_per_group
        centroids = np.empty((groups, _CENTROIDS, dims_per_group), dtype=np.float32)
        for g in range(groups):
            part = np.ascontiguousarray(x[:, g * dims_per_group:(g + 1) * dims_per_group])
            centroids[g] = _kmeans(part, rng, iterations)
        # Stored float16: rounding here makes the codes match what a reopened store decodes.
        return cls(centroids.astype(np.float16).astype(np.float32))

    def encode(self, vectors: np.ndarray) -> np.ndarray:
        """uint8 codes (n x groups): each group's nearest centroid."""
        import numpy as np

        x = np.asarray(vectors, dtype=np.float32).reshape(len(vectors), self.groups, -1)
        codes = np.empty((len(x), self.groups), dtype=np.uint8)
        for g in range(self.groups):
            codes[:, g] = _nearest(x[:, g], self.centroids[g])
        return codes

    def decode(self, codes: np.ndarray) -> np.ndarray:
        """Unit float32 rows rebuilt from codes (n x groups)."""
        import numpy as np

        rows = self.centroids[np.arange(self.groups), np.asarray(codes, dtype=np.intp)]
        return _unit(rows.reshape(len(codes), self.dim))

    def to_bytes(self) -> bytes:
        import numpy as np

        return self.centroids.astype(np.float16).tobytes()

    @classmethod
    def from_bytes(cls, blob: bytes, *, groups: int) -> ProductQuantizer:
        import numpy as np

        flat = np.frombuffer(blob, dtype=np.float16).astype(np.float32)
        return cls(flat.reshape(groups, _CENTROIDS, -1))


def _nearest(x: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Index of each row's nearest centroid, a block of rows at a time: OpenBLAS runs a
    product this small on the calling thread, where a larger one wakes its threads, which spin
    on a loaded machine (2,048 x 8 by 8 x 256: 2.6 ms in blocks of 64 rows, 24 ms at once)."""
    import numpy as np

    squares = (centroids * centroids).sum(1)[None, :]  # |x|^2 is the same for every centroid
    transposed = np.ascontiguousarray(centroids.T)
    rows = max(1, _BLOCK // transposed.size)
    nearest = np.empty(len(x), dtype=np.intp)
    for at in range(0, len(x), rows):
        nearest[at:at + rows] = np.argmin(squares - 2.0 * (x[at:at + rows] @ transposed), axis=1)
    return nearest


def _kmeans(x: np.ndarray, rng: np.random.Generator, iterations: int) -> np.ndarray:
    import numpy as np

    centroids = x[rng.choice(len(x), _CENTROIDS, replace=False)].copy()
    for _ in range(iterations):
        nearest = _nearest(x, centroids)
        counts = np.bincount(nearest, minlength=_CENTROIDS)
        sums = np.zeros_like(centroids)
        np.add.at(sums, nearest, x)
        empty = counts == 0
        centroids[~empty] = sums[~empty] / counts[~empty, None]
        # An empty centroid restarts on a random vector rather than staying unused.
        centroids[empty] = x[rng.choice(len(x), int(empty.sum()), replace=False)]
    return centroids
