"""What a model operation produced: the file, its size and digest, and what it was made from."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from orion_fsm.backends import file_sha256

__all__ = ["ModelOpResult"]


@dataclass(frozen=True, slots=True)
class ModelOpResult:
    """A model file written by quantize, merge or shard (for shard: its manifest)."""

    path: Path
    size_bytes: int
    sha256: str
    operation: str  # e.g. "quantize q8_0", "merge ties", "shard 4"
    inputs: tuple[Path, ...]

    @classmethod
    def of(cls, path: Path, *, inputs: tuple[Path, ...], operation: str) -> ModelOpResult:
        path = Path(path)
        return cls(path, path.stat().st_size, file_sha256(path), operation, inputs)

    def describe(self) -> str:
        return (f"{self.path} ({self.size_bytes / 1e6:.1f} MB, sha256 {self.sha256[:16]}): "
                f"{self.operation} of {', '.join(p.name for p in self.inputs)}")
