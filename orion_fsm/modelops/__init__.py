"""Model file operations: quantize, merge and shard GGUF models, register the result.

Each streams tensor by tensor through `orion_fsm.backends._gguf_io`, refuses bad input with
one `ModelFileError` line, and replaces its output only once it is complete (0600).
"""

from orion_fsm.backends._gguf_io import QUANT_TYPES
from orion_fsm.backends._shards import ShardEntry, ShardManifest, read_manifest

from ._merge import MERGE_METHODS, MergedModel, MergeRecipe, load_recipe, merge_models
from ._quantize import quantize_model
from ._report import ModelOpResult
from ._shard import shard_model
from ._variants import register_variant

__all__ = [
    "MERGE_METHODS",
    "QUANT_TYPES",
    "MergeRecipe",
    "MergedModel",
    "ModelOpResult",
    "ShardEntry",
    "ShardManifest",
    "load_recipe",
    "merge_models",
    "quantize_model",
    "read_manifest",
    "register_variant",
    "shard_model",
]
