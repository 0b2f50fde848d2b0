"""The memory monitor: pressure levels, alerts, history, relief of high pressure, refusal at
critical, and its OpenTelemetry gauges; readings come from an injected probe."""

from __future__ import annotations

import ast
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from orion_fsm import ConfigurationError, InsufficientMemory, ManualClock, Registry
from orion_fsm.backends import LoadedModel
from orion_fsm.services.models import _memory
from orion_fsm.services.models._loader import LoaderConfig, ModelLoader
from orion_fsm.services.models._memory import (
    MemoryMonitor,
    MemorySnapshot,
    psutil_reading,
    register_memory_metrics,
)
from orion_fsm.services.models._pressure import MemoryReading, PressureLevel, PressureThresholds
from orion_fsm.testing import make_tiny_llama_gguf
from tests.conftest import agent

pytestmark = pytest.mark.anyio

TOTAL = 16 << 30
MB = 1 << 20


class FakeMemory:
    """A probe whose readings the test sets: `available_pct` of 16 GB, `rss` bytes."""

    def __init__(self, available_pct: float = 80.0, rss: int = 100 * MB) -> None:
        self.available_pct = available_pct
        self.rss = rss

    def __call__(self) -> MemoryReading:
        return MemoryReading(self.rss, int(TOTAL * self.available_pct / 100), TOTAL)


@pytest.fixture(scope="module")
def two_models(tmp_path_factory: pytest.TempPathFactory) -> Registry:
    root = tmp_path_factory.mktemp("memory-models")
    agents = [agent(name, make_tiny_llama_gguf(root / name / f"tiny-{name}.gguf", n_layers=2,
                                               n_embd=embd, seed=i), context_length=128)
              for i, (name, embd) in enumerate((("a", 32), ("b", 64)))]
    return Registry.from_dict({"version": 1, "default_agent": "a", "agents": agents})


@pytest.fixture
def make_loader(tmp_path: Path) -> Callable[..., ModelLoader]:
    def make(load_model: Callable[..., LoadedModel] = LoadedModel.load,
             **config: Any) -> ModelLoader:
        config.setdefault("memory_budget_mb", 1024)
        config.setdefault("predictive_preload", False)
        return ModelLoader(tmp_path / "cache", threads=1, clock=ManualClock(),
                           load_model=load_model, config=LoaderConfig(**config))

    return make


@pytest.mark.parametrize(("available_pct", "level"), [
    (80, PressureLevel.LOW), (30.5, PressureLevel.LOW), (30, PressureLevel.MEDIUM),
    (20, PressureLevel.MEDIUM), (15, PressureLevel.HIGH), (6, PressureLevel.HIGH),
    (5, PressureLevel.CRITICAL), (0.5, PressureLevel.CRITICAL),
])
def test_default_levels_follow_the_available_memory(available_pct: float,
                                                    level: PressureLevel) -> None:
    monitor = MemoryMonitor(probe=FakeMemory(available_pct), clock=ManualClock())
    assert monitor.sample().level == level == monitor.level


def test_configured_thresholds_grade_available_memory_and_rss_against_the_budget(
    make_loader: Callable[..., ModelLoader],
) -> None:
    probe = FakeMemory(available_pct=60, rss=100 * MB)
    thresholds = PressureThresholds(available_pct=(70, 50, 10), rss_budget_ratio=(0.5, 1, 2))
    loader = make_loader(memory_budget_mb=1000)
    monitor = MemoryMonitor(loader=loader, probe=probe, thresholds=thresholds)
    assert monitor.sample().level == PressureLevel.MEDIUM  # 60 % available <= 70 %
    probe.available_pct = 90
    assert monitor.sample().level == PressureLevel.LOW
    probe.rss = 1000 * MB  # RSS reaches the budget: the worse measure wins
    assert monitor.sample().level == PressureLevel.HIGH
    probe.rss = 2000 * MB
    assert monitor.sample().level == PressureLevel.CRITICAL


def test_thresholds_out_of_order_are_rejected() -> None:
    with pytest.raises(ConfigurationError, match="available_pct must be decreasing"):
        PressureThresholds(available_pct=(5, 15, 30))
    with pytest.raises(ConfigurationError, match="rss_budget_ratio must be increasing"):
        PressureThresholds(rss_budget_ratio=(2, 1, 0.5))


def test_alerts_fire_on_level_changes_only_and_a_failing_one_does_not_stop_sampling() -> None:
    probe = FakeMemory(80)
    seen: list[tuple[str, str]] = []

    def broken(previous: PressureLevel, snap: MemorySnapshot) -> None:
        raise RuntimeError("alert sink down")

    monitor = MemoryMonitor(probe=probe, alerts=[broken], clock=ManualClock())
    monitor.on_alert(lambda previous, snap: seen.append((str(previous), str(snap.level))))
    for pct in (80, 70, 20, 18, 10, 3, 3, 50):
        probe.available_pct = pct
        monitor.sample()
    assert seen == [("low", "medium"), ("medium", "high"), ("high", "critical"),
                    ("critical", "low")]


def test_history_is_bounded_and_snapshots_are_json_ready() -> None:
    clock = ManualClock()
    monitor = MemoryMonitor(probe=FakeMemory(50), history_size=3, clock=clock)
    for _ in range(5):
        monitor.sample()
        clock.advance(30)
    history = monitor.history()
    assert len(history) == 3 and [s.at for s in history] == sorted(s.at for s in history)
    assert monitor.snapshot() is history[-1]
    shown = json.loads(json.dumps(monitor.snapshot().as_dict()))
    assert shown["level"] == "low" and shown["available_pct"] == 50.0


@pytest.mark.parametrize(("available_pct", "words"), [
    (80, "comfortable"), (25, "getting tight"), (10, "idle models are being unloaded"),
    (2, "loads are refused"),
])
def test_recommendations_say_what_to_do_in_plain_words(available_pct: float,
                                                       words: str) -> None:
    monitor = MemoryMonitor(probe=FakeMemory(available_pct), clock=ManualClock(),
                            caches=lambda: {"l1": 64 * MB})
    snap = monitor.sample()
    assert words in " ".join(snap.recommendations)
    assert ("Caches hold about 64 MB" in " ".join(snap.recommendations)) == (available_pct < 30)


def test_the_default_probe_reads_this_process_and_machine() -> None:
    reading = psutil_reading()
    assert 0 < reading.process_rss_bytes < reading.system_total_bytes
    assert 0 < reading.system_available_bytes <= reading.system_total_bytes


async def test_high_pressure_unloads_idle_models_until_it_eases(
    two_models: Registry, make_loader: Callable[..., ModelLoader],
) -> None:
    loader = make_loader()
    clock = loader.clock
    assert isinstance(clock, ManualClock)

    def probe() -> MemoryReading:  # each loaded model costs 10 % of RAM in this fake
        return FakeMemory(available_pct=30 - 10 * len(loader.loaded()))()

    monitor = MemoryMonitor(loader=loader, probe=probe)
    (await loader.acquire(two_models.get("a"))).release()
    clock.advance(1)
    held = await loader.acquire(two_models.get("b"))
    assert monitor.sample().level == PressureLevel.HIGH
    snap = await monitor.poll()
    # a (idle) went; b stays because a request holds it.
    assert [m.model for m in snap.models] == ["tiny-b:default@128"]
    assert snap.level == PressureLevel.MEDIUM
    held.release()
    await loader.aclose()


async def test_critical_pressure_makes_loads_fail_fast(
    two_models: Registry, make_loader: Callable[..., ModelLoader],
) -> None:
    calls: list[Path] = []

    def load(path: Path, *args: Any, **kwargs: Any) -> LoadedModel:
        calls.append(path)
        return LoadedModel.load(path, *args, **kwargs)

    loader = make_loader(load_model=load)
    probe = FakeMemory(available_pct=2)
    monitor = MemoryMonitor(loader=loader, probe=probe)
    monitor.sample()
    with pytest.raises(InsufficientMemory, match="pressure is critical"):
        await loader.acquire(two_models.get("a"))
    assert calls == []
    probe.available_pct = 60
    monitor.sample()
    (await loader.acquire(two_models.get("a"))).release()
    assert len(calls) == 1
    await loader.aclose()


class FixedGauge:
    def __init__(self, level: PressureLevel) -> None:
        self.level = level


async def test_a_loader_given_a_pressure_gauge_at_construction_refuses_at_critical(
    two_models: Registry, tmp_path: Path,
) -> None:
    gauge = FixedGauge(PressureLevel.CRITICAL)
    loader = ModelLoader(tmp_path / "cache", threads=1, clock=ManualClock(), monitor=gauge,
                         config=LoaderConfig(memory_budget_mb=1024, predictive_preload=False))
    with pytest.raises(InsufficientMemory, match="pressure is critical"):
        await loader.acquire(two_models.get("a"))
    gauge.level = PressureLevel.HIGH  # high unloads idle models; it refuses nothing
    (await loader.acquire(two_models.get("a"))).release()
    assert loader.stats.loads == 1
    await loader.aclose()


def test_the_loader_and_the_monitor_do_not_import_each_other() -> None:
    folder = Path(_memory.__file__).parent
    imported: dict[str, set[str]] = {}
    for name in ("_loader", "_memory", "_pressure"):
        tree = ast.parse((folder / f"{name}.py").read_text(encoding="utf-8"))
        imported[name] = {node.module.rsplit(".", 1)[-1] for node in ast.walk(tree)
                          if isinstance(node, ast.ImportFrom) and node.module}
    assert "_memory" not in imported["_loader"] and "_loader" not in imported["_memory"]
    assert "_pressure" in imported["_loader"] and "_pressure" in imported["_memory"]
    assert not imported["_pressure"] & {"_loader", "_memory"}


async def test_run_samples_at_its_interval_until_stopped() -> None:
    fake, third = FakeMemory(50), anyio.Event()
    readings = 0

    def probe() -> MemoryReading:
        nonlocal readings
        readings += 1
        if readings == 3:
            third.set()
        return fake()

    monitor = MemoryMonitor(probe=probe, interval_s=0.005)
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            await tg.start(monitor.run)
            await third.wait()
            monitor.stop()
    assert len(monitor.history()) == readings >= 3


async def test_memory_is_exported_as_opentelemetry_gauges(
    two_models: Registry, make_loader: Callable[..., ModelLoader],
) -> None:
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    loader = make_loader()
    monitor = MemoryMonitor(loader=loader, probe=FakeMemory(available_pct=10, rss=300 * MB))
    register_memory_metrics(provider.get_meter("test"), monitor, loader)
    lease = await loader.acquire(two_models.get("b"))
    monitor.sample()
    data = reader.get_metrics_data()
    assert data is not None
    points: dict[str, list[Any]] = {
        metric.name: list(metric.data.data_points)
        for rm in data.resource_metrics for sm in rm.scope_metrics for metric in sm.metrics
    }
    assert points["orion.memory.process.rss"][0].value == 300 * MB
    assert points["orion.memory.system.available"][0].value == int(TOTAL * 0.10)
    assert points["orion.memory.pressure"][0].value == int(PressureLevel.HIGH)
    assert points["orion.models.loaded"][0].value == 1
    (per_model,) = points["orion.model.memory.estimate"]
    assert per_model.attributes["orion.model"] == "tiny-b:default@128"
    assert per_model.value == lease.prepared.estimate.total_bytes
    lease.release()
    await loader.aclose()
    provider.shutdown()
