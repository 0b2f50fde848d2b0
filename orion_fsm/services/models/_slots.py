"""A resident model's slots and who holds them: its instances (one runtime context each),
the requests waiting for one, and the lease a request holds until it gives the slot back."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import anyio

from orion_fsm.backends import LlamaRuntime, SlotModel
from orion_fsm.services.models._loader_values import LoadInfo, PreparedModel

__all__ = ["Instance", "ModelLease", "Resident", "Waiter"]


@dataclass(eq=False)
class Instance:
    """One slot: an instance of the model with its own runtime context (KV cache), so one
    generation at a time; its context keeps the ids it last evaluated (prefix reuse)."""

    index: int
    model: SlotModel
    last_used: float
    busy: bool = False
    quarantined: bool = False


@dataclass(eq=False)
class Waiter:
    priority: int
    since: float  # when the request first asked (the loader's clock): older ones first
    seq: int
    event: anyio.Event
    instance: Instance | None = None  # handed over by a release; None: look again
    woken: bool = False
    abandoned: bool = False

    def __lt__(self, other: Waiter) -> bool:
        return (self.priority, self.since, self.seq) < (other.priority, other.since, other.seq)


@dataclass(eq=False)
class Resident:
    """A model's weights file, resident as one or more instances (slots)."""

    prepared: PreparedModel
    instances: list[Instance]
    last_used: float
    keep_alive_s: float
    parallel: int = 1  # the most instances it may have
    pins: int = 0
    preloaded: bool = False  # loaded by a preload and not used yet
    creating: int = 0  # instances being loaded
    # Instances abandoned by the stall watchdog: their thread may still be stuck in the
    # runtime, so they are never used again, and counted until that thread lets go.
    quarantined: list[Instance] = field(default_factory=list)
    waiters: list[Waiter] = field(default_factory=list)  # a heap: priority, then age
    queued: int = 0
    token_s: float | None = None  # measured seconds per generated token (moving average)
    next_index: int = 1
    sequences: int = 1  # llama_cpp: sequences its context holds (the most slots it can have)
    # llama_cpp: contexts whose every sequence stalled, given up on; counted until their
    # decode thread comes back from the runtime and frees them.
    wedged: list[LlamaRuntime] = field(default_factory=list)

    @property
    def instance_bytes(self) -> int:
        return self.prepared.estimate.total_bytes

    @property
    def estimate_bytes(self) -> int:
        if self.prepared.key.runtime == "llama_cpp":
            # One context for every slot: the weights once, a KV cache per sequence.
            estimate = self.prepared.estimate
            context = estimate.total_bytes + estimate.kv_cache_bytes * (self.sequences - 1)
            return context * (1 + sum(not r.closed for r in self.wedged))
        # ctransformers shares nothing between instances (measured: ~180 MB each for
        # SmolLM2 Q4_1 at 2048 tokens), so every instance counts in full.
        return self.instance_bytes * (len(self.instances) + self.creating + len(self.quarantined))

    @property
    def running(self) -> int:
        return sum(i.busy for i in self.instances)


class ModelLease:
    """A pinned model and one of its slots, held by one request until `release()`."""

    __slots__ = ("_instance", "_on_release", "_released", "_resident", "load_info", "stall_s")

    def __init__(self, resident: Resident, instance: Instance, load_info: LoadInfo,
                 stall_s: float, on_release: Callable[[Resident, Instance], None]) -> None:
        self._resident = resident
        self._instance = instance
        self._released = False
        self._on_release = on_release
        self.load_info = load_info
        self.stall_s = stall_s  # no token for this long: the generation is abandoned

    @property
    def model(self) -> SlotModel:
        return self._instance.model

    @property
    def prepared(self) -> PreparedModel:
        return self._resident.prepared

    def quarantine(self) -> None:
        """Never use this slot again: a generation was abandoned in it (see `Resident`)."""
        instance, resident = self._instance, self._resident
        if not instance.quarantined:
            instance.quarantined = True
            resident.instances.remove(instance)
            resident.quarantined.append(instance)

    def record_generation(self, tokens: int, seconds: float) -> None:
        """How long tokens took (after the first): what the default `stall_s` is made of."""
        if tokens > 0 and seconds > 0:
            per = seconds / tokens
            old = self._resident.token_s
            self._resident.token_s = per if old is None else 0.8 * old + 0.2 * per

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._on_release(self._resident, self._instance)
