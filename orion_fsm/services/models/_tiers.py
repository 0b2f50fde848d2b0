"""RAM tiers: what a machine of a given memory size can hold, and the model memory estimates.

A tier sets the defaults the loader uses (how many models stay loaded, how long an idle one
is kept, which quantization variant is picked); `estimate_model_memory` sizes a GGUF file.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from orion_fsm._exceptions import ModelLoadError
from orion_fsm.backends import read_gguf_header
from orion_fsm.services.models._registry import AgentSpec, ModelSource, QuantVariant

__all__ = [
    "DEFAULT_VARIANT",
    "QUANT_BITS",
    "TIERS",
    "MemoryEstimate",
    "RamTier",
    "VariantChoice",
    "choose_variant",
    "estimate_model_memory",
    "tier_for",
]

MB: Final = 1 << 20
GB: Final = 1 << 30
# The name of the agent's `model` file when the registry lists no quantization variants.
DEFAULT_VARIANT: Final = "default"
# Quantization classes a tier or an override can ask for, by bits per weight.
QUANT_BITS: Final = {"q4": 4, "q5": 5, "q8": 8, "f16": 16, "f32": 32}
# This llama.cpp keeps K and V in f32 (4 bytes per value).
_KV_BYTES: Final = 4


@dataclass(frozen=True, slots=True)
class RamTier:
    """Defaults for machines with at most `max_ram_gb` of RAM."""

    name: str
    max_ram_gb: float
    max_loaded_models: int
    keep_alive_s: float
    quantization: str  # a key of QUANT_BITS


# The seed documents: 1-5 models by RAM, q4 up to 4 GB, q8 up to 8 GB, f16 above. Small
# machines let idle models go sooner: memory there is worth more than a reload.
TIERS: Final = (
    RamTier("<=4GB", 4, 1, 60.0, "q4"),
    RamTier("4-8GB", 8, 2, 120.0, "q8"),
    RamTier("8-16GB", 16, 3, 300.0, "f16"),
    RamTier("16-32GB", 32, 4, 600.0, "f16"),
    RamTier(">32GB", float("inf"), 5, 600.0, "f16"),
)


def tier_for(total_ram_bytes: int) -> RamTier:
    """The tier of a machine with this much physical RAM (upper bounds inclusive)."""
    gb = total_ram_bytes / GB
    return next(t for t in TIERS if gb <= t.max_ram_gb)


@dataclass(frozen=True, slots=True)
class VariantChoice:
    name: str
    source: ModelSource
    bits: int | None  # None: the agent lists no variants


def choose_variant(agent: AgentSpec, preference: str) -> VariantChoice:
    """The agent's variant for `preference`: a variant name, or a class of QUANT_BITS.

    A class picks the variant with the most bits not above it (q8 on an f16/q8/q4 list),
    else the variant with the fewest bits; an agent without variants always gets its `model`.
    """
    variants: Sequence[QuantVariant] = agent.quantization
    if not variants:
        return VariantChoice(DEFAULT_VARIANT, agent.model, None)
    by_name = {v.name: v for v in variants}
    chosen = by_name.get(preference)
    if chosen is None:
        bits = QUANT_BITS.get(preference)
        if bits is None:
            raise ModelLoadError(
                f"agent {agent.id!r} has no quantization variant {preference!r}; use one of "
                f"{', '.join(by_name)} or a class among {', '.join(QUANT_BITS)}"
            )
        fitting = [v for v in variants if v.bits <= bits]
        chosen = (max(fitting, key=lambda v: v.bits) if fitting
                  else min(variants, key=lambda v: v.bits))
    return VariantChoice(chosen.name, chosen.source, chosen.bits)


@dataclass(frozen=True, slots=True)
class MemoryEstimate:
    """What a loaded model should cost, before loading it."""

    weights_bytes: int
    kv_cache_bytes: int
    overhead_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.kv_cache_bytes + self.overhead_bytes

    @property
    def total_mb(self) -> float:
        return self.total_bytes / MB


def estimate_model_memory(model_path: Path, context_length: int, *,
                          overhead_bytes: int = 16 * MB) -> MemoryEstimate:
    """Estimate from the GGUF header alone (no tensor data is read). Blocking: a file read.

    Weights: every byte up to the end of the last tensor, as sized by the header: the runtime
    reads all tensors and keeps the vocabulary (measured: a tiny model's RSS grows by exactly
    that). KV cache: 2 x n_layer x n_ctx x n_embd_kv x 4 bytes, an upper bound the runtime
    reaches when the context fills (n_embd_kv = n_embd x n_head_kv / n_head with grouped
    query attention).
    """
    header = read_gguf_header(model_path)
    meta = header.metadata
    arch = meta.get("general.architecture", "llama")

    def number(name: str) -> int | None:
        value = meta.get(f"{arch}.{name}")
        return value if isinstance(value, int) and not isinstance(value, bool) else None

    n_layer, n_embd = number("block_count"), number("embedding_length")
    n_head, n_head_kv = number("attention.head_count"), number("attention.head_count_kv")
    kv = 0
    if n_layer and n_embd:
        n_embd_kv = n_embd * n_head_kv // n_head if n_head and n_head_kv else n_embd
        kv = 2 * n_layer * context_length * n_embd_kv * _KV_BYTES
    return MemoryEstimate(header.data_end, kv, overhead_bytes)
