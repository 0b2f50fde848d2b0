"""Concurrent callers of one key share one computation."""

from __future__ import annotations

import anyio
import pytest

from orion_fsm._singleflight import SingleFlight

pytestmark = pytest.mark.anyio


async def test_concurrent_callers_share_one_call() -> None:
    flights: SingleFlight[int] = SingleFlight()
    calls = 0
    results: list[int] = []

    async def compute() -> int:
        nonlocal calls
        calls += 1
        await anyio.sleep(0.01)
        return 42

    async def caller() -> None:
        results.append(await flights.run("k", compute))

    async with anyio.create_task_group() as tg:
        for _ in range(10):
            tg.start_soon(caller)
    assert calls == 1 and results == [42] * 10


async def test_a_failure_reaches_every_waiter() -> None:
    flights: SingleFlight[int] = SingleFlight()
    errors: list[str] = []

    async def compute() -> int:
        await anyio.sleep(0.01)
        raise ValueError("boom")

    async def caller() -> None:
        try:
            await flights.run("k", compute)
        except ValueError as exc:
            errors.append(str(exc))

    async with anyio.create_task_group() as tg:
        for _ in range(3):
            tg.start_soon(caller)
    assert errors == ["boom"] * 3


async def test_waiters_recompute_when_the_first_caller_is_cancelled() -> None:
    flights: SingleFlight[int] = SingleFlight()
    calls = 0

    async def compute() -> int:
        nonlocal calls
        calls += 1
        await anyio.sleep(0.05)
        return calls

    got: list[int] = []

    async def waiter() -> None:
        await anyio.sleep(0.01)
        got.append(await flights.run("k", compute))

    async with anyio.create_task_group() as tg:
        tg.start_soon(waiter)
        with anyio.move_on_after(0.02):
            await flights.run("k", compute)
    assert calls == 2 and got == [2]


async def test_a_leader_holds_the_flight_until_its_block_ends() -> None:
    flights: SingleFlight[None] = SingleFlight()
    woke: list[str] = []

    async def waiter() -> None:
        assert await flights.wait("k")
        woke.append("waiter")

    async with anyio.create_task_group() as tg:
        with flights.lead("k"):
            tg.start_soon(waiter)
            await anyio.sleep(0.01)
            assert flights.in_flight("k") and woke == []
            woke.append("leader done")
    assert woke == ["leader done", "waiter"] and not flights.in_flight("k")
    assert not await flights.wait("k")  # nothing in flight: returns at once


async def test_a_leader_that_fails_still_wakes_its_waiters() -> None:
    flights: SingleFlight[None] = SingleFlight()
    woke = anyio.Event()

    async def waiter() -> None:
        await flights.wait("k")
        woke.set()

    async with anyio.create_task_group() as tg:
        with pytest.raises(ValueError), flights.lead("k"):
            tg.start_soon(waiter)
            await anyio.sleep(0.01)
            raise ValueError("boom")
    assert woke.is_set() and not flights.in_flight("k")


def test_a_second_leader_of_one_key_is_refused() -> None:
    flights: SingleFlight[None] = SingleFlight()
    with flights.lead("k"), pytest.raises(RuntimeError, match="already led"):
        flights.lead("k").__enter__()
