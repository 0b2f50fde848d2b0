"""What the model loader hands out and reports: a model's key, the prepared (converted,
measured) model, how a load went, the resident models and their slots, and its settings."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orion_fsm._exceptions import ConfigurationError
from orion_fsm.backends import ConvertedModel, Tokenizer
from orion_fsm.backends._shards import MANIFEST_FILENAME
from orion_fsm.services.models._tiers import DEFAULT_VARIANT, MB, MemoryEstimate, RamTier
from orion_fsm.services.observability import _attributes as attr

__all__ = ["LoadInfo", "LoaderConfig", "LoaderStats", "ModelKey", "PreparedModel",
           "ResidentModel", "SlotStats", "mb"]


@dataclass(frozen=True, slots=True)
class ModelKey:
    """One loaded instance: agents with the same file, variant and context share it."""

    source: Path
    context_length: int
    model_type: str
    variant: str = DEFAULT_VARIANT
    runtime: str = "ctransformers"  # | "llama_cpp"

    @property
    def label(self) -> str:
        # A sharded model is named by its folder: every manifest is manifest.json.
        name = self.source.parent.name if self.source.name == MANIFEST_FILENAME \
            else self.source.stem
        label = f"{name}:{self.variant}@{self.context_length}"
        return label if self.runtime == "ctransformers" else f"{label}/{self.runtime}"


@dataclass(frozen=True, slots=True)
class PreparedModel:
    """A model ready to load: files converted for the runtime, its tokenizer, its estimate."""

    key: ModelKey
    files: ConvertedModel
    tokenizer: Tokenizer
    estimate: MemoryEstimate
    shards: int = 0  # parts a sharded model was assembled from (0: a single file)

    @property
    def sha256(self) -> str:
        """The source file's digest: what cache keys and traces name the model by."""
        return self.files.source_sha256


@dataclass(frozen=True, slots=True)
class LoadInfo:
    """What one `acquire` found or did, for the loading span."""

    model: str
    variant: str
    loaded_now: bool  # this request waited for a load (its own or one already running)
    load_ms: float  # time it waited for that load; 0 when the model was resident
    estimate_mb: float
    unloaded: tuple[str, ...]  # models unloaded to make room for this load
    preloaded: bool  # the load was started ahead of time by a preload
    slot: int = 0  # which instance of the model serves the request
    slot_wait_ms: float = 0.0  # time waiting for a free slot (queued behind other requests)
    reused_tokens: int = 0  # prompt tokens the slot's context already held (not evaluated)
    parallel: int = 1  # slots the model may have
    shards: int = 0  # parts the model was assembled from (0: a single file)

    def span_attributes(self) -> dict[str, Any]:
        return {
            attr.MODEL: self.model,
            attr.MODEL_VARIANT: self.variant,
            attr.MODEL_LOADED_NOW: self.loaded_now,
            attr.MODEL_LOAD_MS: round(self.load_ms, 3),
            attr.MODEL_ESTIMATE_MB: round(self.estimate_mb, 1),
            attr.MODEL_UNLOADED: list(self.unloaded),
            attr.MODEL_PRELOADED: self.preloaded,
            attr.SLOT: self.slot,
            attr.SLOT_WAIT_MS: round(self.slot_wait_ms, 3),
            attr.SLOT_REUSED_TOKENS: self.reused_tokens,
            attr.SLOT_PARALLEL: self.parallel,
            attr.MODEL_SHARDS: self.shards,
        }


@dataclass(frozen=True, slots=True)
class ResidentModel:
    """A loaded model as the memory monitor and the CLI see it."""

    key: ModelKey
    estimate_bytes: int
    pins: int
    idle_s: float  # 0 while a request holds it
    keep_alive_s: float

    @property
    def label(self) -> str:
        return self.key.label

    @property
    def variant(self) -> str:
        return self.key.variant


@dataclass(frozen=True, slots=True)
class SlotStats:
    """One resident model's slots as `Engine.stats()` reports them."""

    model: str
    parallel: int  # the most slots it may have
    slots: int  # instances loaded and usable
    running: int  # slots generating
    queued: int  # requests waiting for a slot
    quarantined: int  # slots abandoned by the stall watchdog, not yet freed


@dataclass(frozen=True, slots=True)
class LoaderConfig:
    """Limits and policies; None picks the default for the machine's RAM tier."""

    memory_budget_mb: float | None = None  # None: budget_fraction of the available RAM
    budget_fraction: float = 0.5
    max_loaded_models: int | None = None
    keep_alive_s: float | None = None  # an agent's own `keep_alive_s` wins
    quantization: str | None = None  # a variant name or q4 | q8 | f16 | ...
    overhead_mb: float = 16.0  # per model, beyond weights and KV cache
    tier: RamTier | None = None  # None: from psutil's total RAM
    predictive_preload: bool = True
    preload_min_share: float = 0.4  # of the observed successors of the agent just used
    usage_window: int = 256  # recent acquires the prediction learns from
    sweep_interval_s: float = 1.0  # real time between idle checks of the background task
    # How long a load waits for requests to release the models that fill the budget before
    # it is refused (0: refuse at once). A model too big for the budget is refused at once.
    room_wait_s: float = 10.0

    def __post_init__(self) -> None:
        problems = [
            (name, value, rule) for name, value, rule, ok in (
                ("memory_budget_mb", self.memory_budget_mb, "positive or None",
                 self.memory_budget_mb is None or self.memory_budget_mb > 0),
                ("budget_fraction", self.budget_fraction, "in (0, 1]",
                 0 < self.budget_fraction <= 1),
                ("max_loaded_models", self.max_loaded_models, "at least 1 or None",
                 self.max_loaded_models is None or self.max_loaded_models >= 1),
                ("keep_alive_s", self.keep_alive_s, "at least 0 or None",
                 self.keep_alive_s is None or self.keep_alive_s >= 0),
                ("overhead_mb", self.overhead_mb, "at least 0", self.overhead_mb >= 0),
                ("sweep_interval_s", self.sweep_interval_s, "positive",
                 self.sweep_interval_s > 0),
                ("room_wait_s", self.room_wait_s, "at least 0", self.room_wait_s >= 0),
            ) if not ok
        ]
        if problems:
            name, value, rule = problems[0]  # one at a time, like every ConfigurationError
            raise ConfigurationError(f"LoaderConfig.{name}", value, rule)


@dataclass(slots=True)
class LoaderStats:
    loads: int = 0
    unloads: int = 0
    evictions: int = 0  # unloads to make room
    idle_unloads: int = 0  # keep-alive expiries and pressure relief
    refusals: int = 0  # InsufficientMemory raised
    room_waits: int = 0  # times a load waited for requests to release models
    preloads: int = 0
    preload_hits: int = 0  # a request found the model a preload had loaded
    slots_added: int = 0  # instances loaded beyond a model's first
    quarantined: int = 0  # slots the stall watchdog abandoned
    slot_waits: int = 0  # requests that queued for a slot


def mb(n: int) -> str:
    return f"{n / MB:.0f} MB" if n >= 10 * MB else f"{n / MB:.1f} MB"
