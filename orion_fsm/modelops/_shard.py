"""`shard_model`: split a GGUF model into parts the loader assembles, with a JSON manifest."""

from __future__ import annotations

from pathlib import Path

from orion_fsm.backends._shards import MANIFEST_FILENAME, ShardManifest, write_shards

from ._report import ModelOpResult

__all__ = ["shard_model"]


def shard_model(source: Path, shards: int, output_dir: Path) -> tuple[ModelOpResult,
                                                                       ShardManifest]:
    """Write `shards` parts of `source` and `manifest.json` into the new folder `output_dir`;
    the manifest is what a registry's model `path` names to serve the sharded model."""
    manifest = write_shards(Path(source), shards, Path(output_dir))
    result = ModelOpResult.of(Path(output_dir) / MANIFEST_FILENAME, inputs=(Path(source),),
                              operation=f"shard {shards}")
    return result, manifest
