"""Memory pressure as values: the levels, a raw reading, the thresholds that grade it, and the
`PressureGauge` seam through which the loader asks for the current level.

Both the loader and the memory monitor import this module and neither imports the other.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Final, Protocol

from orion_fsm._exceptions import ConfigurationError

__all__ = ["MemoryReading", "PressureGauge", "PressureLevel", "PressureThresholds"]


class PressureLevel(enum.IntEnum):
    LOW = 0
    MEDIUM = 1
    HIGH = 2
    CRITICAL = 3

    def __str__(self) -> str:
        return self.name.lower()


_GRADES: Final = (PressureLevel.MEDIUM, PressureLevel.HIGH, PressureLevel.CRITICAL)


class PressureGauge(Protocol):
    """What the loader asks before each load: the memory monitor is one."""

    @property
    def level(self) -> PressureLevel: ...


@dataclass(frozen=True, slots=True)
class MemoryReading:
    """One raw reading; `probe` callables return these (psutil by default, fakes in tests)."""

    process_rss_bytes: int
    system_available_bytes: int
    system_total_bytes: int


@dataclass(frozen=True, slots=True)
class PressureThresholds:
    """Where each level starts; the worse of the two measures wins.

    `available_pct`: system available memory, in % of total, at or below which medium, high
    and critical start. `rss_budget_ratio`: process RSS over the loader's budget at or above
    which they start (None: not used; RSS includes the interpreter, not only models).
    """

    available_pct: tuple[float, float, float] = (30.0, 15.0, 5.0)
    rss_budget_ratio: tuple[float, float, float] | None = None

    def __post_init__(self) -> None:
        a = self.available_pct
        if not a[0] >= a[1] >= a[2]:
            raise ConfigurationError("PressureThresholds.available_pct", a,
                                     "decreasing (medium, high, critical)")
        r = self.rss_budget_ratio
        if r is not None and not r[0] <= r[1] <= r[2]:
            raise ConfigurationError("PressureThresholds.rss_budget_ratio", r,
                                     "increasing (medium, high, critical), or None")

    def level(self, reading: MemoryReading, budget_bytes: int | None) -> PressureLevel:
        pct = 100.0 * reading.system_available_bytes / max(1, reading.system_total_bytes)
        level = PressureLevel.LOW
        for grade, bound in zip(_GRADES, self.available_pct, strict=True):
            if pct <= bound:
                level = max(level, grade)
        if self.rss_budget_ratio is not None and budget_bytes:
            ratio = reading.process_rss_bytes / budget_bytes
            for grade, bound in zip(_GRADES, self.rss_budget_ratio, strict=True):
                if ratio >= bound:
                    level = max(level, grade)
        return level
