"""The model backend layer: GGUF conversion, tokenization, and generation on ctransformers or
llama.cpp (the `llama-cpp` extra).

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
from ._ctransformers import GenerationStream, LoadedModel
from ._generation import (
    CoreGate,
    GenerationEvent,
    GenerationOutcome,
    SamplingParams,
    Threads,
    reused_prefix,
)
from ._llama_cpp import (
    LLAMA_CPP_EXTRA,
    LlamaRuntime,
    LlamaSequence,
    LlamaStream,
    llama_cpp_available,
)
from ._tokenizer import IncrementalDecoder, Tokenizer

# A slot of a loaded model: a ctransformers instance or a sequence of a llama.cpp context.
SlotModel = LoadedModel | LlamaSequence

__all__ = [
    "LLAMA_CPP_EXTRA",
    "ConvertedModel",
    "CoreGate",
    "GGUFHeader",
    "GenerationEvent",
    "GenerationOutcome",
    "GenerationStream",
    "Grammar",
    "IncrementalDecoder",
    "LlamaRuntime",
    "LlamaSequence",
    "LlamaStream",
    "LoadedModel",
    "MaskStats",
    "ModelCache",
    "SamplingParams",
    "SlotModel",
    "Threads",
    "Tokenizer",
    "compile_grammar",
    "ensure_converted",
    "ensure_tokenizer",
    "file_sha256",
    "llama_cpp_available",
    "read_gguf_header",
    "resolve_package_file",
    "reused_prefix",
]
