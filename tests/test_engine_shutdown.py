"""Leaving `async with Engine` while requests are in flight (issue 15, class 9): each ends
cancelled with its trace line, nothing leaks or escapes, and no breaker blames a model."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import anyio
import pytest

from orion_fsm import Engine, RequestFailed, Result
from tests.conftest import read_trace_lines

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize("requests", [1, 6, 24])
async def test_requests_in_flight_when_the_engine_exits_end_cancelled_with_a_trace_line(
        make_engine: Callable[..., Engine], tmp_path: Path, requests: int) -> None:
    results: list[Result] = []
    escaped: list[BaseException] = []

    async def one(engine: Engine, i: int) -> None:
        try:
            results.append(await engine.infer(f"hello {i}", max_tokens=200, cache=False))
        except RequestFailed as exc:
            results.append(exc.result)
        except BaseException as exc:  # what must not happen: ClosedResourceError and the like
            escaped.append(exc)

    async with anyio.create_task_group() as tg, make_engine(max_queue=requests) as engine:
        for i in range(requests):
            tg.start_soon(one, engine, i)
        # Admission has no event to wait on; its public counters say when all are in.
        while (engine.stats().in_flight + engine.stats().queued  # noqa: ASYNC110
               + len(results) < requests):
            await anyio.sleep(0.001)
    assert escaped == []
    assert len(results) == requests
    cancelled = [r for r in results if r.state == "error"]
    assert cancelled, "every request finished before the exit: nothing was in flight"
    assert all(r.error_reason == "cancelled" and "shut down" in (r.error or "")
               for r in cancelled)
    assert all(r.state == "success" for r in results if r not in cancelled)
    lines = read_trace_lines(tmp_path / "traces" / "test.jsonl")
    assert sorted(line["request_id"] for line in lines) == sorted(r.request_id for r in results)
    assert engine.trace_stats()["dropped"] == 0
    assert all(b["state"] == "closed" and b["consecutive_failures"] == 0
               for b in engine.breakers.snapshot().values())


async def test_a_request_after_the_exit_is_refused_not_run(
        make_engine: Callable[..., Engine]) -> None:
    async with make_engine() as engine:
        pass
    with pytest.raises(Exception, match="not running"):
        await engine.infer("hello", max_tokens=2)


@pytest.mark.parametrize("chunks", [0, 1])
async def test_a_streamed_cache_hit_left_after_one_chunk_still_writes_its_trace_line(
        make_engine: Callable[..., Engine], tmp_path: Path, chunks: int) -> None:
    prompts = [f"hello number {i}" for i in range(30)]
    async with make_engine() as engine:
        for prompt in prompts:
            await engine.infer(prompt, max_tokens=4, temperature=0)
        for prompt in prompts:
            stream = engine.stream(prompt, max_tokens=4, temperature=0)
            taken = 0
            async for _ in stream:
                taken += 1
                if taken > chunks:
                    break
            await stream.aclose()
    lines = read_trace_lines(tmp_path / "traces" / "test.jsonl")
    assert len(lines) == 2 * len(prompts)
    hits = [line for line in lines if line["streaming"]]
    assert len(hits) == len(prompts)
    assert all(line["cache"]["level"] == "L1" and line["result"]["state"] == "success"
               for line in hits)
    assert len({line["request_id"] for line in lines}) == len(lines)


async def test_a_stream_in_flight_when_the_engine_exits_raises_request_failed_not_none(
        make_engine: Callable[..., Engine], tmp_path: Path) -> None:
    chunks: list[object] = []
    failed: list[RequestFailed] = []
    first = anyio.Event()

    async def consume(engine: Engine) -> None:
        try:
            async for chunk in engine.stream("hello there", max_tokens=200, cache=False):
                chunks.append(chunk)
                first.set()
        except RequestFailed as exc:
            failed.append(exc)

    async with anyio.create_task_group() as tg, make_engine() as engine:
        tg.start_soon(consume, engine)
        await first.wait()
    assert None not in chunks and all(isinstance(c, str) for c in chunks)
    (exc,) = failed  # 200 tokens: still streaming when the block ends
    assert exc.reason == "cancelled" and "shut down" in str(exc)
    (line,) = read_trace_lines(tmp_path / "traces" / "test.jsonl")
    assert line["result"]["state"] == "error" and line["request_id"] == exc.request_id
