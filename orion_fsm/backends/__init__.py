"""The model backend layer: GGUF conversion, tokenization and ctransformers generation.

Nothing here imports the engine or its services; the only dependency inside orion_fsm is
`orion_fsm._exceptions`.
"""

from ._convert import (
    ConvertedModel,
    GGUFHeader,
    ModelCache,
    ensure_converted,
    file_sha256,
    read_gguf_header,
    resolve_package_file,
)
from ._ctransformers import (
    CoreGate,
    GenerationEvent,
    GenerationOutcome,
    GenerationStream,
    LoadedModel,
    SamplingParams,
    Threads,
)
from ._tokenizer import IncrementalDecoder, Tokenizer

__all__ = [
    "ConvertedModel",
    "CoreGate",
    "GGUFHeader",
    "GenerationEvent",
    "GenerationOutcome",
    "GenerationStream",
    "IncrementalDecoder",
    "LoadedModel",
    "ModelCache",
    "SamplingParams",
    "Threads",
    "Tokenizer",
    "ensure_converted",
    "file_sha256",
    "read_gguf_header",
    "resolve_package_file",
]
