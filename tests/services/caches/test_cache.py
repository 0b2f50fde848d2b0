"""The L1/L2/L3 caches: eviction, TTLs, single-flight, persistence, crash safety, corruption,
statistics and OpenTelemetry metrics. Time comes from a ManualClock: nothing sleeps."""

from __future__ import annotations

import hashlib
import logging
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader, NumberDataPoint

from orion_fsm import ManualClock
from orion_fsm._exceptions import CacheError
from orion_fsm.services.caches._cacheset import (
    CacheConfig,
    CacheSet,
    TieredCache,
    cache_key,
    register_cache_metrics,
)

pytestmark = pytest.mark.anyio


def memory_only(entries: int = 10, ttl_s: float | None = None) -> CacheConfig:
    return CacheConfig(memory_entries=entries, ttl_s=ttl_s)


def on_disk(directory: Path, entries: int = 10, ttl_s: float | None = None,
            **extra: Any) -> CacheConfig:
    return CacheConfig(memory_entries=entries, ttl_s=ttl_s, disk_dir=directory, **extra)


# -- memory tier -------------------------------------------------------------------------------


async def test_full_memory_tier_evicts_the_lowest_scoring_fifth() -> None:
    clock = ManualClock()
    cache: TieredCache[str] = TieredCache("l1", memory_only(10), clock=clock)
    for i in range(10):
        await cache.set(f"k{i}", f"v{i}")
    cache.get_memory("k1")
    cache.get_memory("k1")  # k1: 3 accesses, last at t=0
    clock.advance(50)
    cache.get_memory("k2")  # k2: 2 accesses, last at t=50
    clock.advance(49)
    for i in range(3, 10):
        cache.get_memory(f"k{i}")  # k3..k9: 2 accesses, last at t=99
    clock.advance(1)
    # At t=100 the scores (accesses / idle seconds) are k0 0.01, k1 0.03, k2 0.04, others 2.
    await cache.set("new", "v")

    survivors = {f"k{i}" for i in range(10) if cache.get_memory(f"k{i}") is not None}
    assert survivors == {f"k{i}" for i in range(2, 10)}
    assert cache.get_memory("new") == "v"
    stats = cache.stats()
    assert stats.evictions == 2 and stats.memory_entries == 9 and stats.expirations == 0


async def test_a_small_memory_tier_still_evicts_one_entry() -> None:
    clock = ManualClock()
    cache: TieredCache[int] = TieredCache("l3", memory_only(3), clock=clock)
    await cache.set("old", 1)
    clock.advance(10)
    await cache.set("b", 2)
    await cache.set("c", 3)
    clock.advance(1)
    await cache.set("d", 4)
    assert cache.get_memory("old") is None
    assert [cache.get_memory(k) for k in ("b", "c", "d")] == [2, 3, 4]
    assert cache.stats().evictions == 1


async def test_memory_entries_expire_after_their_ttl_without_sleeping() -> None:
    clock = ManualClock()
    cache: TieredCache[str] = TieredCache("l1", memory_only(ttl_s=60), clock=clock)
    await cache.set("k", "v")
    clock.advance(59.9)
    assert cache.get_memory("k") == "v"
    clock.advance(0.2)
    assert cache.get_memory("k") is None
    assert await cache.get("k") is None
    stats = cache.stats()
    assert stats.expirations == 1 and stats.memory_entries == 0
    assert (stats.memory_hits, stats.misses) == (1, 1)


async def test_a_full_tier_sweeps_expired_entries_before_evicting_live_ones() -> None:
    clock = ManualClock()
    cache: TieredCache[str] = TieredCache("l3", memory_only(4, ttl_s=10), clock=clock)
    await cache.set("a", "a")
    await cache.set("b", "b")
    clock.advance(5)
    await cache.set("c", "c")
    await cache.set("d", "d")
    clock.advance(6)  # a and b are past their TTL, c and d are not
    await cache.set("e", "e")
    stats = cache.stats()
    assert (stats.evictions, stats.expirations, stats.memory_entries) == (0, 2, 3)
    assert [cache.get_memory(k) for k in "cde"] == ["c", "d", "e"]


async def test_none_cannot_be_cached() -> None:
    cache: TieredCache[Any] = TieredCache("l1", memory_only())
    with pytest.raises(CacheError, match="None"):
        await cache.set("k", None)


# -- disk tier ---------------------------------------------------------------------------------


async def test_entries_survive_a_new_cache_set_on_the_same_directory(tmp_path: Path) -> None:
    embedding = np.linspace(-1, 1, 384).astype(np.float16)
    async with CacheSet(tmp_path / "caches") as caches:
        await caches.l1.set("result", {"text": "Paris", "tokens": 3})
        await caches.l2.set("embedding", embedding)
        await caches.l3.set("prompt", (1, 2, 3))

    async with CacheSet(tmp_path / "caches") as reopened:
        assert reopened.l1.get_memory("result") is None  # a new process starts with no memory
        assert await reopened.l1.get("result") == {"text": "Paris", "tokens": 3}
        stored = await reopened.l2.get("embedding")
        assert stored is not None and stored.dtype == np.float16
        assert np.array_equal(stored, embedding)
        assert await reopened.l3.get("prompt") == (1, 2, 3)
        assert reopened.l1.get_memory("result") == {"text": "Paris", "tokens": 3}  # promoted
        stats = reopened.l1.stats()
        assert (stats.disk_hits, stats.memory_hits, stats.misses) == (1, 1, 0)
        assert stats.disk_entries == 1 and stats.disk_state == "ok"


async def test_disk_entries_expire_by_the_injected_clock(tmp_path: Path) -> None:
    clock = ManualClock()
    async with TieredCache[str]("l1", on_disk(tmp_path / "l1", ttl_s=60), clock=clock) as cache:
        await cache.set("k", "v")
    clock.advance(61)
    async with TieredCache[str]("l1", on_disk(tmp_path / "l1", ttl_s=60),
                                clock=clock) as reopened:
        assert await reopened.get("k") is None
        stats = reopened.stats()
        assert (stats.expirations, stats.misses, stats.disk_entries) == (1, 1, 0)


async def test_a_promoted_disk_entry_keeps_only_its_remaining_ttl(tmp_path: Path) -> None:
    clock = ManualClock()
    async with TieredCache[str]("l1", on_disk(tmp_path / "l1", ttl_s=60), clock=clock) as cache:
        await cache.set("k", "v")
    clock.advance(40)
    async with TieredCache[str]("l1", on_disk(tmp_path / "l1", ttl_s=60),
                                clock=clock) as reopened:
        assert await reopened.get("k") == "v"
        clock.advance(21)  # 61 s after the write, though only 21 s after the promotion
        assert reopened.get_memory("k") is None


async def test_disk_entry_bound_drops_the_oldest_records(tmp_path: Path) -> None:
    config = on_disk(tmp_path / "l3", entries=2, disk_entries=3)
    async with TieredCache[int]("l3", config) as cache:
        for i in range(5):
            await cache.set(f"k{i}", i)
        stats = cache.stats()
        assert (stats.disk_entries, stats.disk_evictions) == (3, 2)
    async with TieredCache[int]("l3", config) as reopened:
        assert [await reopened.get(f"k{i}") for i in range(5)] == [None, None, 2, 3, 4]


async def test_clear_empties_one_level_or_every_level(tmp_path: Path) -> None:
    async with CacheSet(tmp_path) as caches:
        await caches.l1.set("a", {"x": 1})
        await caches.l3.set("b", (1,))
        await caches.clear("l1")
        assert await caches.l1.get("a") is None
        assert await caches.l3.get("b") == (1,)
        await caches.clear()
        assert await caches.l3.get("b") is None
        assert all(s.disk_entries == 0 for s in caches.stats().values())
        with pytest.raises(CacheError, match="l4"):
            await caches.clear("l4")


# -- single-flight -----------------------------------------------------------------------------


async def test_concurrent_identical_misses_compute_once(tmp_path: Path) -> None:
    cache: TieredCache[dict[str, int]] = TieredCache("l1", on_disk(tmp_path / "l1"))
    calls = 0
    entered, release = anyio.Event(), anyio.Event()
    results: list[dict[str, int]] = []

    async def compute() -> dict[str, int]:
        nonlocal calls
        calls += 1
        entered.set()
        await release.wait()
        return {"answer": 42}

    async def caller() -> None:
        results.append(await cache.get_or_compute("k", compute))

    async with anyio.create_task_group() as tg:
        for _ in range(20):
            tg.start_soon(caller)
        # The leader reaches compute() only after a disk lookup in a thread: every other
        # caller has checked memory and joined the flight by then.
        await entered.wait()
        release.set()
    assert calls == 1 and results == [{"answer": 42}] * 20
    stats = cache.stats()
    assert (stats.misses, stats.coalesced) == (1, 19)
    assert await cache.get_or_compute("k", compute) == {"answer": 42} and calls == 1
    await cache.aclose()


async def test_a_failed_computation_reaches_every_waiter_and_is_not_cached() -> None:
    cache: TieredCache[int] = TieredCache("l3", memory_only())
    release = anyio.Event()
    errors: list[str] = []

    async def fail() -> int:
        await release.wait()
        raise ValueError("model crashed")

    async def caller() -> None:
        try:
            await cache.get_or_compute("k", fail)
        except ValueError as exc:
            errors.append(str(exc))

    async with anyio.create_task_group() as tg:
        for _ in range(3):
            tg.start_soon(caller)
        await anyio.wait_all_tasks_blocked()
        release.set()
    assert errors == ["model crashed"] * 3

    async def succeed() -> int:
        return 7

    assert await cache.get_or_compute("k", succeed) == 7


# -- crashes, corruption, failures -------------------------------------------------------------

WRITER = """
import hashlib, sys
from pathlib import Path
import anyio
from orion_fsm.services.caches._cacheset import CacheConfig, TieredCache

async def main():
    config = CacheConfig(memory_entries=4, ttl_s=None, disk_dir=Path(sys.argv[1]))
    cache = TieredCache("l1", config)
    for i in range(1_000_000):
        # Every 7th size crosses diskcache's 32 KB threshold: value in a file + a SQLite row.
        payload = ("%d-" % i) * (1 + (i % 7) * 3000)
        digest = hashlib.sha256(payload.encode()).hexdigest()
        await cache.set("k%d" % i, {"i": i, "payload": payload, "sha256": digest})
        print(i, flush=True)

anyio.run(main)
"""


def _write_until_killed(directory: Path, after: int) -> int:
    """Run WRITER, SIGKILL it once `after` writes are confirmed; the last confirmed index."""
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(directory)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    watchdog = threading.Timer(60, proc.kill)  # a hung writer must not hang the suite
    watchdog.start()
    confirmed = -1
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            confirmed = int(line)
            if confirmed >= after:
                proc.send_signal(signal.SIGKILL)
                break
    finally:
        watchdog.cancel()
        proc.kill()
        _, stderr = proc.communicate()
    assert confirmed >= after, f"writer stopped early: {stderr}"
    assert proc.returncode == -signal.SIGKILL
    return confirmed


async def test_sigkill_during_writes_leaves_every_key_absent_or_complete(tmp_path: Path) -> None:
    directory = tmp_path / "l1"
    confirmed = await anyio.to_thread.run_sync(_write_until_killed, directory, 40)

    async with TieredCache[dict[str, Any]]("l1", on_disk(directory)) as cache:
        assert cache.stats().disk_state == "ok"
        present = 0
        for i in range(confirmed + 10):
            record = await cache.get(f"k{i}")
            if i <= confirmed:
                assert record is not None, f"k{i} was confirmed written but is gone"
            if record is None:
                continue
            present += 1
            assert record["i"] == i
            assert hashlib.sha256(record["payload"].encode()).hexdigest() == record["sha256"]
        assert cache.stats().disk_errors == 0
        assert present in (confirmed + 1, confirmed + 2)  # plus, at most, the unconfirmed one


async def test_a_corrupt_database_is_moved_aside_rebuilt_and_reported(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    clock = ManualClock(unix_start=1_700_000_000)
    directory = tmp_path / "l1"
    async with TieredCache[str]("l1", on_disk(directory), clock=clock) as cache:
        await cache.set("k", "v")
    (directory / "cache.db").write_bytes(b"this is not sqlite" * 512)

    with caplog.at_level(logging.WARNING, logger="orion_fsm.cache"):
        async with TieredCache[str]("l1", on_disk(directory), clock=clock) as rebuilt:
            stats = rebuilt.stats()
            assert stats.disk_state == "rebuilt" and "corrupt" in (stats.disk_problem or "")
            assert await rebuilt.get("k") is None
            await rebuilt.set("k2", "v2")
            assert rebuilt.stats().disk_entries == 1

    moved = tmp_path / "l1.corrupt-20231114T221320Z"
    assert moved.is_dir() and (moved / "cache.db").read_bytes().startswith(b"this is not")
    [record] = [r for r in caplog.records if "rebuilt" in r.getMessage()]
    assert record.levelno == logging.WARNING
    assert (record.cache_level, record.moved_to) == ("l1", str(moved))  # type: ignore[attr-defined]
    async with TieredCache[str]("l1", on_disk(directory), clock=clock) as again:
        assert await again.get("k2") == "v2" and again.stats().disk_state == "ok"


async def test_an_unwritable_location_leaves_the_level_memory_only_and_reported(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    blocker = tmp_path / "l2"
    blocker.write_text("a file where the cache directory should be")  # root ignores chmod
    with caplog.at_level(logging.WARNING, logger="orion_fsm.cache"):
        async with TieredCache[str]("l2", on_disk(blocker)) as cache:
            await cache.set("k", "v")
            assert await cache.get("k") == "v"
            assert await cache.get("other") is None
            stats = cache.stats()
    assert stats.disk_state == "unavailable" and str(blocker) in (stats.disk_problem or "")
    assert (stats.disk_errors, stats.memory_hits, stats.misses) == (0, 1, 1)
    [record] = [r for r in caplog.records if "memory-only" in r.getMessage()]
    assert record.cache_level == "l2"  # type: ignore[attr-defined]


class RunsCodeWhenUnpickled:
    """What a crafted cache database holds: unpickling it would create `marker`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("crafted", ["pickle", "pickled-tuple", "text", "bad-json",
                                     "wrong-shape", "unknown-tag", "bad-array"])
async def test_a_record_that_is_not_ours_is_a_miss_evicted_and_counted_never_run(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, crafted: str) -> None:
    import diskcache

    marker = tmp_path / "code-ran"
    magic = b"orion-fsm.cache.v1\n"
    value: Any = {
        "pickle": RunsCodeWhenUnpickled(marker),
        "pickled-tuple": (None, RunsCodeWhenUnpickled(marker)),
        "text": "[null, {}]",
        "bad-json": magic + b"[null, {",
        "wrong-shape": magic + b'{"text": 1}',
        "unknown-tag": magic + b'[null, {"$eval": "x"}]',
        "bad-array": magic + b'[null, {"$array": ["float16", "AAA"]}]',
    }[crafted]
    async with TieredCache[Any]("l1", on_disk(tmp_path / "l1")) as cache:
        await cache.set("fine", {"text": "ok"})
    with diskcache.Cache(str(tmp_path / "l1")) as raw:  # the default Disk: it pickles
        raw.set("k", value)
    with caplog.at_level(logging.WARNING, logger="orion_fsm.cache"):
        async with TieredCache[Any]("l1", on_disk(tmp_path / "l1")) as reopened:
            assert await reopened.get("k") is None
            assert await reopened.get("k") is None  # evicted: the second look is a plain miss
            assert await reopened.get("fine") == {"text": "ok"}
            stats = reopened.stats()
    assert not marker.exists()
    assert (stats.disk_rejected, stats.disk_errors, stats.misses) == (1, 0, 2)
    assert stats.disk_entries == 1 and stats.disk_state == "ok"
    [record] = [r for r in caplog.records if "rejected" in r.getMessage()]
    assert record.cache_key == "k"  # type: ignore[attr-defined]


async def test_stored_values_read_back_as_they_were(tmp_path: Path) -> None:
    values: list[Any] = [
        "text", 3, 2.5, True, (1, 2, 3), [1, (2, 3)], {"a": (1,), "b": [b"\x00\xff", None]},
        {"$tuple": "a dict that looks tagged"}, {"$x": 1, "y": 2}, b"bytes",
        np.linspace(-1, 1, 8).astype(np.float32),
    ]
    async with TieredCache[Any]("l3", on_disk(tmp_path / "l3")) as cache:
        for i, value in enumerate(values):
            await cache.set(f"k{i}", value)
    async with TieredCache[Any]("l3", on_disk(tmp_path / "l3")) as reopened:
        for i, value in enumerate(values):
            got = await reopened.get(f"k{i}")
            if isinstance(value, np.ndarray):
                assert got.dtype == value.dtype and np.array_equal(got, value)
            else:
                assert got == value and type(got) is type(value)


async def test_cache_directories_and_databases_are_private(tmp_path: Path) -> None:
    async with CacheSet(tmp_path / "caches") as caches:
        await caches.l1.set("k", {"text": "secret answer"})
    for level in ("l1", "l2", "l3"):
        directory = tmp_path / "caches" / level
        assert directory.stat().st_mode & 0o777 == 0o700
        assert (directory / "cache.db").stat().st_mode & 0o777 == 0o600


async def test_a_disk_write_error_keeps_the_value_in_memory(tmp_path: Path) -> None:
    async with TieredCache[Any]("l3", on_disk(tmp_path / "l3")) as cache:
        unpicklable = {"lock": threading.Lock()}
        await cache.set("k", unpicklable)
        assert cache.get_memory("k") is unpicklable
        stats = cache.stats()
        assert (stats.disk_errors, stats.disk_entries, stats.disk_state) == (1, 0, "ok")


async def test_repeated_disk_errors_turn_the_level_memory_only(tmp_path: Path) -> None:
    async with TieredCache[Any]("l3", on_disk(tmp_path / "l3")) as cache:
        for i in range(5):
            await cache.set(f"k{i}", threading.Lock())
        stats = cache.stats()
        assert stats.disk_state == "unavailable" and "5 consecutive" in (stats.disk_problem or "")
        await cache.set("fine", "v")  # memory only now: no sixth error
        assert cache.stats().disk_errors == 5 and cache.get_memory("fine") == "v"


# -- figures -----------------------------------------------------------------------------------


async def test_stats_count_each_tier_and_estimate_memory_bytes(tmp_path: Path) -> None:
    async with CacheSet(tmp_path) as caches:
        embedding = np.zeros(1024, dtype=np.float16)
        await caches.l2.set("e", embedding)
        assert caches.l2.get_memory("e") is embedding
        assert await caches.l2.get("missing") is None
        stats = caches.stats()["l2"]
    assert (stats.hits, stats.misses, stats.hit_rate) == (1, 1, 0.5)
    assert stats.memory_entries == 1 and stats.memory_capacity == 200
    assert embedding.nbytes <= stats.memory_bytes < embedding.nbytes + 1024
    assert stats.disk_entries == 1 and stats.disk_bytes > embedding.nbytes
    assert stats.disk_dir == str(tmp_path / "l2")
    assert stats.to_dict()["hit_rate"] == 0.5


async def test_otel_metrics_report_each_level_and_tier(tmp_path: Path) -> None:
    async with CacheSet(tmp_path) as writer:
        await writer.l3.set("route", {"agent": "code"})
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    async with CacheSet(tmp_path) as caches:
        register_cache_metrics(provider.get_meter("test"), caches)
        await caches.l1.set("r", {"text": "hi"})
        assert caches.l1.get_memory("r") == {"text": "hi"}
        assert await caches.l1.get("nope") is None
        assert await caches.l3.get("route") == {"agent": "code"}  # from disk

        points: dict[tuple[str, tuple[tuple[str, Any], ...]], Any] = {}
        data = reader.get_metrics_data()
        assert data is not None
        for resource in data.resource_metrics:
            for scope in resource.scope_metrics:
                for metric in scope.metrics:
                    for point in metric.data.data_points:
                        assert isinstance(point, NumberDataPoint)
                        attrs = tuple(sorted((point.attributes or {}).items()))
                        points[(metric.name, attrs)] = point.value
    provider.shutdown()

    def value(name: str, level: str, tier: str | None = None) -> Any:
        attrs = {"cache.level": level, **({"cache.tier": tier} if tier else {})}
        return points[(name, tuple(sorted(attrs.items())))]

    assert value("orion.cache.hits", "l1", "memory") == 1
    assert value("orion.cache.hits", "l1", "disk") == 0
    assert value("orion.cache.hits", "l3", "disk") == 1
    assert value("orion.cache.misses", "l1") == 1 and value("orion.cache.misses", "l2") == 0
    assert value("orion.cache.evictions", "l1", "memory") == 0
    assert value("orion.cache.entries", "l1", "memory") == 1
    assert value("orion.cache.entries", "l3", "disk") == 1
    assert value("orion.cache.bytes", "l1", "disk") > 0
    assert value("orion.cache.bytes", "l1", "memory") > 0
    assert value("orion.cache.disk_errors", "l2") == 0


def test_cache_key_hashes_canonical_json() -> None:
    key = cache_key("what is 2+2?", "logic", {"temperature": 0.0, "max_tokens": 8}, "sha")
    assert key == cache_key("what is 2+2?", "logic", {"max_tokens": 8, "temperature": 0.0}, "sha")
    assert key != cache_key("what is 2+2?", "code", {"max_tokens": 8, "temperature": 0.0}, "sha")
    assert len(key) == 64 and int(key, 16) >= 0
    assert cache_key(["a", 1]) == cache_key(("a", 1))  # tuples and lists are one JSON array
    expected = hashlib.sha256(b'[{"a":1,"b":"\xc3\xa9"}]').hexdigest()
    assert cache_key({"b": "é", "a": 1}) == expected
    with pytest.raises(TypeError):
        cache_key(object())


def test_default_configs_follow_the_levels(tmp_path: Path) -> None:
    l1, l2, l3 = (CacheConfig.default(level, tmp_path) for level in ("l1", "l2", "l3"))
    assert (l1.memory_entries, l1.ttl_s, l1.disk_entries) == (50, 1800, 5000)
    assert (l2.memory_entries, l2.ttl_s) == (200, None)
    assert (l3.memory_entries, l3.ttl_s) == (100, 3600)
    assert l1.disk_dir == tmp_path / "l1" and CacheConfig.default("l2").disk_dir is None
    with pytest.raises(CacheError, match="l9"):
        CacheConfig.default("l9")
