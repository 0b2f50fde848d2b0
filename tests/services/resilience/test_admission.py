"""Admission: bounded in-flight requests and queue, priorities, Overloaded at once, clean
cancellation; per-request deadlines. Every test runs under asyncio and trio."""

from __future__ import annotations

import math
from collections.abc import Callable

import anyio
import pytest

from orion_fsm import ConfigurationError, OrionError
from orion_fsm._exceptions import Overloaded, RequestTimeout
from orion_fsm.services.resilience._admission import AdmissionController, TimeoutPolicy

pytestmark = pytest.mark.anyio


async def wait_until_queued(admission: AdmissionController, n: int) -> None:
    while admission.queued < n:
        await anyio.lowlevel.checkpoint()


async def until(condition: Callable[[], bool]) -> None:
    while not condition():
        await anyio.lowlevel.checkpoint()


async def test_requests_beyond_max_in_flight_wait_for_a_slot() -> None:
    admission = AdmissionController(max_in_flight=2, max_queue=10)
    release = anyio.Event()
    entered: list[int] = []

    async def request(i: int) -> None:
        async with admission.slot():
            entered.append(i)
            await release.wait()

    async with anyio.create_task_group() as tg:
        for i in range(3):
            tg.start_soon(request, i)
        await wait_until_queued(admission, 1)
        await until(lambda: len(entered) == 2)
        assert (admission.in_flight, admission.queued) == (2, 1)
        release.set()
    assert sorted(entered) == [0, 1, 2]
    assert (admission.in_flight, admission.queued) == (0, 0)


async def test_full_queue_fails_at_once_with_overloaded() -> None:
    admission = AdmissionController(max_in_flight=1, max_queue=2)
    release = anyio.Event()

    async def hold() -> None:
        async with admission.slot():
            await release.wait()

    async with anyio.create_task_group() as tg:
        for _ in range(3):
            tg.start_soon(hold)
        await wait_until_queued(admission, 2)
        with anyio.fail_after(1):  # "at once": never waits for a slot
            with pytest.raises(Overloaded) as info:
                async with admission.slot(request_id="r42"):
                    pass
        release.set()
    error = info.value
    assert isinstance(error, OrionError)
    assert (error.queued, error.limit) == (2, 2)
    assert str(error) == ("2 requests queued (limit 2): retry later or raise max_queue "
                          "(request r42)")
    assert admission.snapshot()["rejected"] == 1


async def test_zero_max_queue_refuses_whenever_all_slots_are_busy() -> None:
    admission = AdmissionController(max_in_flight=1, max_queue=0)
    async with admission.slot():
        with pytest.raises(Overloaded, match="0 requests queued"):
            await admission.acquire()
    async with admission.slot():
        pass


async def test_lower_priority_number_goes_first_and_fifo_within_a_priority() -> None:
    admission = AdmissionController(max_in_flight=1, max_queue=10)
    order: list[str] = []
    release = anyio.Event()

    async def request(name: str, priority: int) -> None:
        async with admission.slot(priority=priority):
            order.append(name)

    async with anyio.create_task_group() as tg:
        async def first() -> None:
            async with admission.slot():
                await release.wait()

        tg.start_soon(first)
        while admission.in_flight < 1:
            await anyio.lowlevel.checkpoint()
        for n, (name, priority) in enumerate([("b1", 5), ("a1", 0), ("b2", 5), ("a2", 0)]):
            tg.start_soon(request, name, priority)
            await wait_until_queued(admission, n + 1)
        release.set()
    assert order == ["a1", "a2", "b1", "b2"]


async def test_cancelled_waiter_leaves_the_queue_and_holds_nothing() -> None:
    admission = AdmissionController(max_in_flight=1, max_queue=10)
    release = anyio.Event()
    served: list[str] = []

    async def request(name: str) -> None:
        async with admission.slot():
            served.append(name)

    async with anyio.create_task_group() as tg:
        async def first() -> None:
            async with admission.slot():
                await release.wait()

        tg.start_soon(first)
        while admission.in_flight < 1:
            await anyio.lowlevel.checkpoint()
        tg.start_soon(request, "kept")
        await wait_until_queued(admission, 1)
        gone = anyio.CancelScope()

        async def cancelled() -> None:
            with gone:
                await request("cancelled")

        tg.start_soon(cancelled)
        await wait_until_queued(admission, 2)
        gone.cancel()
        while admission.queued > 1:
            await anyio.lowlevel.checkpoint()
        release.set()
    assert served == ["kept"]
    assert (admission.in_flight, admission.queued) == (0, 0)


async def test_many_cancelled_waiters_do_not_leak_slots() -> None:
    admission = AdmissionController(max_in_flight=4, max_queue=1000)
    with anyio.move_on_after(0.05):
        async with anyio.create_task_group() as tg:
            for _ in range(300):
                async def request() -> None:
                    async with admission.slot():
                        await anyio.sleep_forever()

                tg.start_soon(request)
    assert (admission.in_flight, admission.queued) == (0, 0)
    async with admission.slot():
        assert admission.in_flight == 1


async def test_a_slot_is_released_when_the_request_fails() -> None:
    admission = AdmissionController(max_in_flight=1, max_queue=0)
    with pytest.raises(RuntimeError):
        async with admission.slot():
            raise RuntimeError("phase bug")
    async with admission.slot():
        assert admission.in_flight == 1


@pytest.mark.parametrize(("in_flight", "queue"), [(0, 10), (1, -1)])
async def test_invalid_limits_are_refused(in_flight: int, queue: int) -> None:
    with pytest.raises(ConfigurationError, match="max_"):
        AdmissionController(max_in_flight=in_flight, max_queue=queue)


# --- deadlines ------------------------------------------------------------------------------


async def test_deadline_cancels_a_blocked_await_and_says_timeout() -> None:
    deadline = TimeoutPolicy(timeout_s=0.01).start()
    with deadline.scope() as scope:
        await anyio.sleep_forever()
    assert scope.cancelled_caught
    assert deadline.expired
    error = deadline.error("inferencing", request_id="r1")
    assert isinstance(error, RequestTimeout)
    assert str(error) == ("the request took longer than its timeout of 0.01 s (in inferencing):"
                          " raise timeout_s or ask for fewer tokens (request r1)")


async def test_deadline_is_shared_by_every_phase_of_the_request() -> None:
    deadline = TimeoutPolicy(timeout_s=60).start()
    for _ in range(3):
        with deadline.scope() as scope:
            await anyio.lowlevel.checkpoint()
        assert not scope.cancelled_caught
    assert 59 < deadline.remaining() <= 60
    assert TimeoutPolicy().timeout_s == 60
    assert TimeoutPolicy(timeout_s=math.inf).start().remaining() == math.inf


async def test_deadline_stops_a_hung_worker_thread_through_should_stop() -> None:
    import threading

    stop = threading.Event()
    deadline = TimeoutPolicy(timeout_s=0.05).start()

    def hung() -> None:
        stop.wait(30)  # a runtime that only checks its stop flag

    with deadline.scope() as scope:
        try:
            await anyio.to_thread.run_sync(hung, abandon_on_cancel=True)
        except anyio.get_cancelled_exc_class():
            stop.set()
            raise
    assert scope.cancelled_caught and stop.is_set()


@pytest.mark.parametrize("seconds", [0, -1, "60"])
async def test_non_positive_timeouts_are_refused(seconds: object) -> None:
    with pytest.raises(ConfigurationError, match="timeout_s"):
        TimeoutPolicy(timeout_s=seconds)  # type: ignore[arg-type]
