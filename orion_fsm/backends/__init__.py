"""The model backend layer: GGUF conversion, tokenization and ctransformers generation.

Nothing here imports the engine or its services; the only dependency inside orion_fsm is
`orion_fsm._exceptions`.
"""

from ._constrained import Grammar, MaskStats, compile_grammar
from ._convert import (
    ConvertedModel,
    GGUFHeader,
    ModelCache,
    ensure_converted,
    ensure_tokenizer,
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
    "Grammar",
    "IncrementalDecoder",
    "LoadedModel",
    "MaskStats",
    "ModelCache",
    "SamplingParams",
    "Threads",
    "Tokenizer",
    "compile_grammar",
    "ensure_converted",
    "ensure_tokenizer",
    "file_sha256",
    "read_gguf_header",
    "resolve_package_file",
]
