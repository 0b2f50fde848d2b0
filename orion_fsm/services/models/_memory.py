"""The memory monitor: samples process and system memory, grades the pressure, acts on it.

High pressure unloads idle models; critical pressure makes the loader refuse new loads (the
request falls back). Readings are kept as a bounded history and exported as OTel gauges.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, Protocol

import anyio
from anyio.abc import TaskStatus

from orion_fsm._clock import Clock, SystemClock
from orion_fsm._config import DEFAULT_MEMORY_INTERVAL_S
from orion_fsm._exceptions import ConfigurationError
from orion_fsm.services.models._pressure import (
    MemoryReading,
    PressureGauge,
    PressureLevel,
    PressureThresholds,
)

if TYPE_CHECKING:
    from opentelemetry.metrics import CallbackOptions, Meter, Observation

# PressureThresholds lives in _pressure; re-exported for the engine's import of it from here.
__all__ = [
    "AlertCallback",
    "MemoryMonitor",
    "MemorySnapshot",
    "ModelMemory",
    "PressureThresholds",
    "ResidentView",
    "WatchedLoader",
    "psutil_reading",
    "register_memory_metrics",
]

_log = logging.getLogger("orion_fsm.memory")
_MB: Final = 1 << 20


def psutil_reading() -> MemoryReading:
    import psutil  # here, not at module level: ~7 ms of `import orion_fsm`

    memory = psutil.virtual_memory()
    return MemoryReading(psutil.Process().memory_info().rss, memory.available, memory.total)


class ResidentView(Protocol):
    """A loaded model, as the monitor reports it."""

    @property
    def label(self) -> str: ...
    @property
    def variant(self) -> str: ...
    @property
    def estimate_bytes(self) -> int: ...
    @property
    def pins(self) -> int: ...
    @property
    def idle_s(self) -> float: ...


class WatchedLoader(Protocol):
    """What the monitor reads and does on a loader: its budget and models, idle unloads.

    `monitor` is the loader's pressure source: the monitor sets itself there, so that at
    critical pressure the loader refuses new loads.
    """

    monitor: PressureGauge | None

    @property
    def clock(self) -> Clock: ...
    @property
    def budget_bytes(self) -> int: ...
    def models(self) -> Sequence[ResidentView]: ...
    async def unload_idle(self, *, limit: int | None = None) -> list[str]: ...


@dataclass(frozen=True, slots=True)
class ModelMemory:
    model: str
    variant: str
    estimate_bytes: int
    pins: int
    idle_s: float


@dataclass(frozen=True, slots=True)
class MemorySnapshot:
    at: float  # unix time
    process_rss_bytes: int
    system_available_bytes: int
    system_total_bytes: int
    budget_bytes: int | None
    level: PressureLevel
    models: tuple[ModelMemory, ...] = ()
    caches: Mapping[str, int] = field(default_factory=dict)  # name -> bytes
    recommendations: tuple[str, ...] = ()

    @property
    def available_pct(self) -> float:
        return 100.0 * self.system_available_bytes / max(1, self.system_total_bytes)

    def as_dict(self) -> dict[str, Any]:
        return {
            "at": self.at,
            "level": str(self.level),
            "process_rss_mb": round(self.process_rss_bytes / _MB, 1),
            "system_available_mb": round(self.system_available_bytes / _MB, 1),
            "system_total_mb": round(self.system_total_bytes / _MB, 1),
            "available_pct": round(self.available_pct, 1),
            "budget_mb": None if self.budget_bytes is None else round(self.budget_bytes / _MB, 1),
            "models": [{"model": m.model, "variant": m.variant,
                        "estimate_mb": round(m.estimate_bytes / _MB, 1), "pins": m.pins,
                        "idle_s": round(m.idle_s, 1)} for m in self.models],
            "caches_mb": {k: round(v / _MB, 1) for k, v in self.caches.items()},
            "recommendations": list(self.recommendations),
        }


# (previous level, the snapshot that changed it)
AlertCallback = Callable[[PressureLevel, MemorySnapshot], None]


def _recommend(level: PressureLevel, snap: MemorySnapshot) -> tuple[str, ...]:
    idle = [m for m in snap.models if m.pins == 0]
    idle_mb = sum(m.estimate_bytes for m in idle) / _MB
    words: list[str] = []
    if level == PressureLevel.LOW:
        words.append("Memory is comfortable; nothing to do.")
    elif level == PressureLevel.MEDIUM:
        words.append(f"Memory is getting tight ({snap.available_pct:.0f}% of RAM available). "
                     "Lower keep_alive_s or max_loaded_models to keep more headroom.")
    elif level == PressureLevel.HIGH:
        words.append(f"Memory is short ({snap.available_pct:.0f}% of RAM available): idle "
                     "models are being unloaded. Prefer a q4 quantization variant or fewer "
                     "loaded models.")
    else:
        words.append(f"Memory is critical ({snap.available_pct:.0f}% of RAM available): new "
                     "model loads are refused and requests fall back to smaller agents. Close "
                     "other programs or lower the memory budget.")
    if level >= PressureLevel.MEDIUM and idle:
        words.append(f"{len(idle)} idle model(s) hold about {idle_mb:.0f} MB and can be "
                     "unloaded.")
    cache_mb = sum(snap.caches.values()) / _MB
    if level >= PressureLevel.MEDIUM and cache_mb >= 1:
        words.append(f"Caches hold about {cache_mb:.0f} MB; shrinking them frees memory too.")
    return tuple(words)


class MemoryMonitor:
    """Samples memory every `interval_s` in `run()`, keeps the last `history_size` snapshots.

    Given a loader, it reports the loader's models, unloads idle ones under high pressure
    and becomes the loader's pressure source (`loader.monitor`): at critical, loads fail fast.
    """

    def __init__(
        self,
        *,
        loader: WatchedLoader | None = None,
        probe: Callable[[], MemoryReading] = psutil_reading,
        interval_s: float = DEFAULT_MEMORY_INTERVAL_S,
        history_size: int = 120,
        thresholds: PressureThresholds | None = None,
        caches: Callable[[], Mapping[str, int]] | None = None,
        alerts: Sequence[AlertCallback] = (),
        clock: Clock | None = None,
    ) -> None:
        if interval_s <= 0:
            raise ConfigurationError("MemoryMonitor.interval_s", interval_s,
                                     "a positive number of seconds")
        self.loader = loader
        self.interval_s = interval_s
        self.thresholds = thresholds or PressureThresholds()
        self.clock: Clock = clock or (loader.clock if loader is not None else SystemClock())
        self._probe = probe
        self._caches = caches
        self._alerts: list[AlertCallback] = list(alerts)
        self._history: deque[MemorySnapshot] = deque(maxlen=max(1, history_size))
        self._level = PressureLevel.LOW
        self._stopped = False
        self._scope: anyio.CancelScope | None = None
        if loader is not None:
            loader.monitor = self

    @property
    def level(self) -> PressureLevel:
        """The level of the last sample (LOW before the first)."""
        return self._level

    @property
    def latest(self) -> MemorySnapshot | None:
        return self._history[-1] if self._history else None

    def on_alert(self, callback: AlertCallback) -> None:
        """Call `callback(previous_level, snapshot)` whenever the level changes."""
        self._alerts.append(callback)

    def history(self) -> list[MemorySnapshot]:
        return list(self._history)

    def snapshot(self) -> MemorySnapshot:
        """The latest snapshot, or a fresh sample if there is none yet."""
        return self.latest or self.sample()

    def sample(self) -> MemorySnapshot:
        """Take one reading, grade it, record it, and alert if the level changed."""
        reading = self._probe()
        budget = self.loader.budget_bytes if self.loader is not None else None
        level = self.thresholds.level(reading, budget)
        models = tuple(_model_memory(m) for m in self.loader.models()) if self.loader else ()
        caches = dict(self._caches()) if self._caches is not None else {}
        snap = MemorySnapshot(self.clock.time(), reading.process_rss_bytes,
                              reading.system_available_bytes, reading.system_total_bytes,
                              budget, level, models, caches)
        snap = dataclasses.replace(snap, recommendations=_recommend(level, snap))
        self._history.append(snap)
        previous, self._level = self._level, level
        if level != previous:
            _log.log(logging.WARNING if level > previous else logging.INFO,
                     "memory_pressure_changed",
                     extra={"level": str(level), "previous": str(previous),
                            "available_pct": round(snap.available_pct, 1)})
            for callback in list(self._alerts):
                try:
                    callback(previous, snap)
                except Exception:
                    # An alert sink that fails must not stop memory from being watched.
                    _log.exception("memory_alert_failed", extra={"level": str(level)})
        return snap

    async def poll(self) -> MemorySnapshot:
        """`sample()`, then relieve high pressure by unloading idle models one at a time."""
        snap = self.sample()
        while snap.level >= PressureLevel.HIGH and self.loader is not None:
            if not await self.loader.unload_idle(limit=1):
                break
            snap = self.sample()
        return snap

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Poll every `interval_s` until `stop()`."""
        with anyio.CancelScope() as self._scope:
            task_status.started()
            while not self._stopped:
                await self.poll()
                await anyio.sleep(self.interval_s)

    def stop(self) -> None:
        self._stopped = True
        if self._scope is not None:
            self._scope.cancel()


def _model_memory(model: ResidentView) -> ModelMemory:
    return ModelMemory(model.label, model.variant, model.estimate_bytes, model.pins,
                       model.idle_s)


def register_memory_metrics(meter: Meter, monitor: MemoryMonitor,
                            loader: WatchedLoader | None = None) -> None:
    """Observable gauges over the monitor's latest snapshot and the loader's models."""
    # Imported when metrics are wired, not with the module: OpenTelemetry's metrics API
    # costs ~7 ms of `import orion_fsm`.
    from opentelemetry.metrics import Observation

    loader = loader or monitor.loader

    def gauge(name: str, unit: str, description: str,
              read: Callable[[], Iterable[Observation]]) -> None:
        def callback(_options: CallbackOptions) -> Iterable[Observation]:
            return list(read())

        meter.create_observable_gauge(name, callbacks=[callback], unit=unit,
                                      description=description)

    def models() -> list[ModelMemory]:
        if loader is not None:
            return [_model_memory(m) for m in loader.models()]
        return list(monitor.snapshot().models)

    gauge("orion.memory.process.rss", "By", "Resident memory of this process",
          lambda: [Observation(monitor.snapshot().process_rss_bytes)])
    gauge("orion.memory.system.available", "By", "Memory available to new processes",
          lambda: [Observation(monitor.snapshot().system_available_bytes)])
    gauge("orion.memory.pressure", "1", "Memory pressure: 0 low, 1 medium, 2 high, 3 critical",
          lambda: [Observation(int(monitor.level))])
    gauge("orion.models.loaded", "{model}", "Models loaded in memory",
          lambda: [Observation(len(models()))])
    gauge("orion.model.memory.estimate", "By", "Estimated memory of each loaded model",
          lambda: [Observation(m.estimate_bytes, {"orion.model": m.model,
                                                  "orion.model.variant": m.variant})
                   for m in models()])
