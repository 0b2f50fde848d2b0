"""The core pool: a lone generation takes every core, concurrent ones share them so the threads
at work never exceed the cores, other processes' load shrinks it, embeddings take their turn."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest

from orion_fsm import CpuAllotter, Engine
from orion_fsm.services.models._cpu import _ExternalLoad, usable_cores
from tests.conftest import agent

pytestmark = pytest.mark.anyio

MakeEngine = Callable[..., Engine]


def test_a_lone_consumer_takes_every_core_and_four_share_two() -> None:
    pool = CpuAllotter(cores=2, busy=lambda: 0.0)
    with pool.consumer() as gate:
        assert gate.acquire() == 2
        gate.release(2)
    gates = [pool.consumer() for _ in range(4)]
    held = [g.__enter__() for g in gates]
    assert [held[0].acquire(), held[1].acquire()] == [1, 1]  # a fair share: 2 cores / 4
    assert pool.snapshot().in_use == 2 == pool.peak_in_use
    for g in gates:
        g.__exit__(None, None, None)


def test_a_generation_left_alone_takes_every_core_at_its_next_call() -> None:
    # A virtual agent's members share the two cores one each; once one has finished, the
    # other's next runtime call computes on both.
    pool = CpuAllotter(cores=2, busy=lambda: 0.0)
    first, second = pool.consumer(), pool.consumer()
    a, b = first.__enter__(), second.__enter__()
    assert [a.acquire(), b.acquire()] == [1, 1]
    a.release(1)
    b.release(1)
    first.__exit__(None, None, None)  # the first member's generation ended
    assert b.acquire() == 2
    b.release(2)
    second.__exit__(None, None, None)
    assert pool.grant_sizes == {1: 2, 2: 1}


def test_other_processes_load_shrinks_the_pool() -> None:
    busy = [1.2]
    pool = CpuAllotter(cores=2, busy=lambda: busy[0])
    assert pool.capacity() == 1
    with pool.consumer() as gate:
        assert gate.acquire() == 1  # threads=2 beside a busy process collapses; 1 holds
        gate.release(1)
        busy[0] = 0.0
        assert gate.acquire() == 2
        gate.release(2)
    busy[0] = 5.0
    assert pool.capacity() == 1  # never below one core


def test_a_call_waits_for_a_free_core_and_gets_it_in_arrival_order() -> None:
    pool = CpuAllotter(cores=1, busy=lambda: 0.0)
    order: list[str] = []
    with pool.consumer() as first, pool.consumer() as second, pool.consumer() as third:
        held = first.acquire()

        def take(name: str, gate: Any) -> None:
            granted = gate.acquire()
            order.append(name)
            gate.release(granted)

        waiting = [threading.Thread(target=take, args=("second", second))]
        waiting[0].start()
        while not pool._queue:  # the second is queued before the third comes
            threading.Event().wait(0.001)
        waiting.append(threading.Thread(target=take, args=("third", third)))
        waiting[1].start()
        assert order == []  # nobody runs beside the call holding the only core
        first.release(held)
        for t in waiting:
            t.join(5)
    assert order == ["second", "third"]
    assert pool.peak_in_use == 1


def test_a_reading_over_a_quiet_gap_is_checked_again_soon() -> None:
    # Another process kept 2 cores busy for the first 2 s of a 4 s gap, then stopped.
    now = [0.0]
    machine = [0.0]

    def read() -> tuple[float, float]:
        return machine[0], 0.0  # (machine busy CPU-s, ours)

    load = _ExternalLoad(0.5, read=read, clock=lambda: now[0])
    now[0], machine[0] = 4.0, 4.0
    assert load.cores() == pytest.approx(1.0)  # the gap's average: the past burst weighs in
    now[0] = 4.05
    assert load.cores() == pytest.approx(1.0)  # not due yet
    now[0] = 4.11  # 0.11 s later, not 0.5 s: nothing ran meanwhile
    assert load.cores() == pytest.approx(0.0)
    # A reading over an ordinary interval stands for the whole sample period.
    now[0], machine[0] = 4.61, 4.5
    assert load.cores() == pytest.approx(1.0)
    now[0] = 4.75
    assert load.cores() == pytest.approx(1.0)


@pytest.mark.parametrize(("running_now", "expected"), [(0, 0.0), (1, 1.0), (5, 2.0), (None, 2.0)])
def test_a_reading_over_a_quiet_gap_is_capped_by_what_runs_now(
        running_now: int | None, expected: float) -> None:
    # Another process kept 2 cores busy for the first 4 s of a 4 s gap: the average says 2,
    # but what other processes have runnable at this instant bounds it (None: not known).
    now, machine = [0.0], [0.0]
    load = _ExternalLoad(0.5, read=lambda: (machine[0], 0.0), clock=lambda: now[0],
                         running=lambda: running_now)
    now[0], machine[0] = 4.0, 8.0
    assert load.cores() == pytest.approx(expected)
    # An ordinary interval is the average alone.
    now[0], machine[0] = 4.6, 8.6
    assert load.cores() == pytest.approx(1.0)


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads Linux's /proc")
def test_another_process_spinning_counts_as_running_now() -> None:
    import subprocess
    import sys

    from orion_fsm.services.models._cpu import _others_running

    spinner = subprocess.Popen([sys.executable, "-c", "print(flush=True)\nwhile True: pass"],
                               stdout=subprocess.PIPE)
    try:
        assert spinner.stdout is not None
        spinner.stdout.readline()  # started: from here on it only spins
        # A spinning process is runnable at every instant, whatever else the machine runs.
        assert all((_others_running() or 0) >= 1 for _ in range(20))
    finally:
        spinner.kill()
        spinner.wait()


def test_usable_cores_follow_the_process_affinity() -> None:
    assert 1 <= usable_cores() <= (len(__import__("os").sched_getaffinity(0)))


async def test_concurrent_generations_never_use_more_threads_than_cores(
    make_engine: MakeEngine, tiny_models: dict[str, Path],
) -> None:
    doc = {"version": 1, "default_agent": "a",
           "agents": [agent("a", tiny_models["medium"], parallel=4,
                            generation={"max_tokens": 24, "temperature": 0, "top_k": 1})]}
    engine = make_engine(doc, threads=None, caches=False)
    assert engine.cores is not None
    results = []

    async def one(i: int) -> None:
        results.append(await engine.infer(f"request number {i}", max_tokens=24))

    async with engine:
        async with anyio.create_task_group() as tg:
            for i in range(6):
                tg.start_soon(one, i)
        snapshot = engine.stats().cores
    assert all(r.ok for r in results)
    assert snapshot is not None and snapshot.in_use == 0 and snapshot.consumers == 0
    # Every runtime call took its cores from the pool, and the pool never lent out more
    # cores than there are.
    assert engine.cores.grants >= sum(r.tokens.output for r in results)
    assert 1 <= engine.cores.peak_in_use <= engine.cores.cores


async def test_explicit_threads_win_over_the_pool(make_engine: MakeEngine) -> None:
    engine = make_engine(threads=1)
    assert engine.cores is None
    async with engine:
        result = await engine.infer("hello", max_tokens=2)
        assert engine.stats().cores is None
    assert result.ok
