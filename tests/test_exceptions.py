"""The one exception tree: every error orion_fsm defines is an OrionError from `_exceptions`,
and every configuration error names the setting, the value and what it must be."""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import orion_fsm
from orion_fsm import (
    BreakerConfig,
    CacheConfig,
    ConfigurationError,
    GuardrailConfig,
    LoaderConfig,
    MemoryMonitor,
    OrionError,
    PressureThresholds,
    configure_logging,
)
from orion_fsm import _exceptions as exceptions
from orion_fsm.services.resilience._admission import AdmissionController, TimeoutPolicy
from orion_fsm.services.routing._embeddings import EmbeddingService

PACKAGE = Path(orion_fsm.__file__).parent


def _drawn_tree() -> dict[str, str | None]:
    """{class name: parent name} as drawn in the ASCII tree of `_exceptions`' docstring."""
    parents: dict[str, str | None] = {}
    stack: list[tuple[int, str]] = []  # (column of the name, name) of the current branch
    for line in (exceptions.__doc__ or "").splitlines():
        match = re.match(r"^ {4}[ │├└─]*?([A-Z]\w+)", line)
        if match is None:
            continue
        column, name = match.start(1), match.group(1)
        while stack and stack[-1][0] >= column:
            stack.pop()
        parents[name] = stack[-1][1] if stack else None
        stack.append((column, name))
    return parents


def test_every_exception_is_an_orion_error_drawn_where_it_sits_in_the_tree() -> None:
    defined = {name: obj for name, obj in inspect.getmembers(exceptions, inspect.isclass)
               if issubclass(obj, BaseException) and obj.__module__ == exceptions.__name__}
    assert set(defined) == set(exceptions.__all__)
    drawn = _drawn_tree()
    assert set(drawn) == set(defined)
    for name, cls in defined.items():
        assert issubclass(cls, OrionError)
        parent = cls.__bases__[0].__name__ if cls is not OrionError else None
        assert drawn[name] == parent, name


def test_no_module_outside_the_tree_defines_an_orion_error() -> None:
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if path.name == "_exceptions.py":
            continue
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.startswith("class ") and ("Error)" in line or "(OrionError" in line):
                offenders.append(f"{path.relative_to(PACKAGE)}:{number}: {line}")
    assert offenders == []


def test_a_configuration_error_is_also_a_value_error() -> None:
    error = ConfigurationError("LoaderConfig.budget_fraction", 1.5, "in (0, 1]")
    assert isinstance(error, OrionError) and isinstance(error, ValueError)
    assert str(error) == "LoaderConfig.budget_fraction must be in (0, 1], got 1.5"
    assert (error.setting, error.value) == ("LoaderConfig.budget_fraction", 1.5)


@pytest.mark.parametrize(("build", "setting"), [
    (lambda: LoaderConfig(budget_fraction=0), "LoaderConfig.budget_fraction"),
    (lambda: PressureThresholds(available_pct=(1, 2, 3)), "PressureThresholds.available_pct"),
    (lambda: MemoryMonitor(interval_s=0), "MemoryMonitor.interval_s"),
    (lambda: BreakerConfig(minimum_calls=0), "BreakerConfig.minimum_calls"),
    (lambda: CacheConfig(memory_entries=0, ttl_s=None), "CacheConfig.memory_entries"),
    (lambda: CacheConfig(memory_entries=1, ttl_s=0), "CacheConfig.ttl_s"),
    (lambda: GuardrailConfig(injection="warn"), "GuardrailConfig.injection"),  # type: ignore[arg-type]
    (lambda: EmbeddingService(max_batch=0), "EmbeddingService.max_batch"),
    (lambda: EmbeddingService(max_wait_ms=-1), "EmbeddingService.max_wait_ms"),
    (lambda: EmbeddingService(timeout_s=0), "EmbeddingService.timeout_s"),
    (lambda: AdmissionController(max_in_flight=0), "AdmissionController.max_in_flight"),
    (lambda: TimeoutPolicy(timeout_s=0), "timeout_s"),
    (lambda: configure_logging("LOUD"), "log level"),
])
def test_bad_settings_raise_a_configuration_error_naming_the_setting(
        build: Callable[[], Any], setting: str) -> None:
    with pytest.raises(ConfigurationError, match=r" must be .+, got ") as caught:
        build()
    assert caught.value.setting == setting
