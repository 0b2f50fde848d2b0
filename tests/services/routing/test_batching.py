"""The embedding service's adaptive window: a burst is encoded in at most two batches, a lone
text never enters the window, and the routing span and trace say which batch a request was in."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import pytest

from orion_fsm import Engine
from orion_fsm._exceptions import ConfigurationError
from orion_fsm.services.observability import _attributes as attr
from orion_fsm.services.routing._embeddings import (
    EmbeddingBatch,
    EmbeddingService,
    pack_vector,
)

pytestmark = pytest.mark.anyio

BURST = [f"question {i}: how many legs does a {animal} have?"
         for i, animal in enumerate(["cat", "spider", "bird", "ant", "snake", "crab", "fish",
                                     "horse"])]


async def burst(service: EmbeddingService, texts: list[str], gap_s: float
                ) -> list[EmbeddingBatch | None]:
    """`texts` embedded by concurrent callers arriving `gap_s` apart."""
    batches: dict[int, EmbeddingBatch | None] = {}

    async def ask(i: int) -> None:
        await anyio.sleep(i * gap_s)
        batches[i] = (await service.embed_batched(texts[i]))[1]

    async with anyio.create_task_group() as tg:
        for i in range(len(texts)):
            tg.start_soon(ask, i)
    return [batches[i] for i in range(len(texts))]


async def test_a_burst_arriving_over_time_is_encoded_in_at_most_two_batches(
        model_dir: Path) -> None:
    # A join gap 60x the arrival gap: however busy the machine, the burst is one arrival
    # stream; the window closes 300 ms after its last text.
    async with EmbeddingService(model_dir, window_ms=60_000, join_ms=300) as service:
        batches = await burst(service, BURST, gap_s=0.005)
        stats = service.stats()
    assert stats["batches"] <= 2 and stats["encoded"] == len(BURST)
    assert all(b is not None for b in batches)
    # Several texts in a batch: the window held it (the first text alone, lone, was not).
    assert all(b.windowed for b in batches if b is not None and b.size > 1)
    assert stats["windows"] >= 1


async def test_a_lone_text_does_not_enter_the_window(model_dir: Path) -> None:
    async with EmbeddingService(model_dir, window_ms=50, join_ms=1) as service:
        _, first = await service.embed_batched("a lone question about the weather")
        await anyio.sleep(0.05)  # far more than join_ms since the previous text
        _, second = await service.embed_batched("another lone question, later")
        stats = service.stats()
    for batch in (first, second):
        assert batch is not None
        assert (batch.size, batch.windowed) == (1, False)
    assert stats["windows"] == 0
    assert stats["window_wait_ms"] == 0


async def test_announced_texts_hold_the_batch_open_past_the_join_gap(model_dir: Path) -> None:
    # Arrivals 10x the join gap apart: without the announcements, four batches.
    async with EmbeddingService(model_dir, window_ms=60_000, join_ms=20) as service:
        expected = [service.expect() for _ in BURST[:4]]

        async def ask(i: int) -> EmbeddingBatch | None:
            await anyio.sleep(i * 0.2)
            expected[i].arrive()  # as the routing phase does, just before the router embeds
            return (await service.embed_batched(BURST[i]))[1]

        batches: list[EmbeddingBatch | None] = [None] * 4

        async def keep(i: int) -> None:
            batches[i] = await ask(i)

        async with anyio.create_task_group() as tg:
            for i in range(4):
                tg.start_soon(keep, i)
        stats = service.stats()
    assert stats["batches"] == 1 and stats["largest_batch"] == 4
    assert all(b is not None and (b.size, b.windowed) == (4, True) for b in batches)


async def test_an_announced_text_that_does_not_come_releases_the_batch(
        model_dir: Path) -> None:
    async with EmbeddingService(model_dir, window_ms=60_000, join_ms=20) as service:
        coming, withdrawn = service.expect(), service.expect()
        later: list[EmbeddingBatch | None] = []

        async def request_that_ends_before_routing() -> None:
            await anyio.sleep(0.1)
            with withdrawn:  # its request was refused, or cancelled, before routing
                pass
            await anyio.sleep(0.1)
            later.append((await service.embed_batched(BURST[1]))[1])

        async with anyio.create_task_group() as tg:
            tg.start_soon(request_that_ends_before_routing)
            coming.arrive()
            _, first = await service.embed_batched(BURST[0])
    # The first text waited for the announced one only: the later text was not taken in.
    assert first is not None and (first.size, first.windowed) == (1, True)
    assert later[0] is not None and later[0].size == 1


async def test_a_lone_announced_text_does_not_enter_the_window(model_dir: Path) -> None:
    async with EmbeddingService(model_dir, window_ms=60_000, join_ms=20) as service:
        with service.expect() as expected:
            expected.arrive()
            _, batch = await service.embed_batched("a lone question, announced")
        stats = service.stats()
    assert batch is not None and (batch.size, batch.windowed) == (1, False)
    assert stats["windows"] == 0


async def test_a_stalled_event_loop_does_not_split_a_burst(model_dir: Path) -> None:
    """A worker holding the GIL freezes the loop: a text due during the freeze arrives after
    the join gap; the window does not count the freeze and takes it in."""
    async with EmbeddingService(model_dir, window_ms=100, join_ms=20) as service:
        await service.embed("load the model first")
        batches: dict[int, EmbeddingBatch | None] = {}

        async def ask(i: int, after_s: float) -> None:
            await anyio.sleep(after_s)
            batches[i] = (await service.embed_batched(BURST[i]))[1]

        async def stall() -> None:
            # Until the two first texts are gathering (the service signals no event for it).
            while service.stats()["windows"] == 0:
                await anyio.lowlevel.checkpoint()
            time.sleep(0.3)  # noqa: ASYNC251  (the loop frozen, as a GIL-holding parse does)

        async with anyio.create_task_group() as tg:
            tg.start_soon(ask, 0, 0)
            tg.start_soon(ask, 1, 0)
            tg.start_soon(stall)
            tg.start_soon(ask, 2, 0.03)  # due after the join gap, during the stall
    assert [(b.size, b.windowed) for b in batches.values() if b is not None] == [
        (3, True)] * 3


async def test_window_zero_never_holds_a_batch(model_dir: Path) -> None:
    async with EmbeddingService(model_dir, window_ms=0, join_ms=5_000) as service:
        batches = await burst(service, BURST[:4], gap_s=0.001)
        stats = service.stats()
    assert all(b is not None and not b.windowed for b in batches)
    assert stats["windows"] == 0


async def test_a_stored_vector_went_through_no_batch(model_dir: Path) -> None:
    async with EmbeddingService(model_dir, window_ms=50) as service:
        vector, encoded = await service.embed_batched("asked once")
        await service.store.set(service.key("already stored"), pack_vector(vector))
        _, stored = await service.embed_batched("already stored")
    assert encoded is not None and stored is None


@pytest.mark.parametrize(("field", "kwargs"), [("window_ms", {"window_ms": -1}),
                                               ("join_ms", {"join_ms": 0})])
def test_bad_window_settings_are_refused(field: str, kwargs: dict[str, Any]) -> None:
    with pytest.raises(ConfigurationError, match=field):
        EmbeddingService(**kwargs)


async def test_the_routing_span_and_trace_say_which_batch_embedded_the_request(
        model_dir: Path, make_engine: Callable[..., Engine], tmp_path: Path,
        spans: Any, registry_doc: dict[str, Any]) -> None:
    service = EmbeddingService(model_dir, window_ms=60_000, join_ms=300)
    # Agents whose context holds any of the prompts, whichever the router picks.
    doc = {**registry_doc, "agents": [a for a in registry_doc["agents"]
                                      if a["id"] in ("conversation", "code")]}
    async with make_engine(doc, embeddings=service, warm_up=False) as engine:
        await engine.router.prepare()
        async with anyio.create_task_group() as tg:
            for text in BURST[:4]:
                tg.start_soon(lambda t=text: engine.infer(t, max_tokens=1))
    records = [json.loads(line) for line in
               (tmp_path / "traces" / "test.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(records) == 4
    routed = [span.attributes for span in spans[1].get_finished_spans()
              if span.attributes and attr.ROUTING_BATCH_SIZE in span.attributes]
    assert len(routed) == 4
    # At most two batches (the first request alone, the others held by the window).
    assert all(bool(a[attr.ROUTING_BATCH_WINDOWED]) for a in routed
               if int(a[attr.ROUTING_BATCH_SIZE]) > 1)
    assert sum(1 / int(a[attr.ROUTING_BATCH_SIZE]) for a in routed) <= 2
    assert all(float(a[attr.ROUTING_BATCH_WAIT_MS]) >= 0 for a in routed)
    in_trace = json.dumps(records)
    assert in_trace.count(attr.ROUTING_BATCH_SIZE) >= 4


def _two_agents(registry_doc: dict[str, Any]) -> dict[str, Any]:
    # Agents whose context holds any of the prompts, whichever the router picks.
    return {**registry_doc, "agents": [a for a in registry_doc["agents"]
                                       if a["id"] in ("conversation", "code")]}


def _routed_batches(spans: Any) -> list[tuple[int, bool]]:
    """(size, windowed) of the embedding batch of each request, from its routing span."""
    return [(int(a[attr.ROUTING_BATCH_SIZE]), bool(a[attr.ROUTING_BATCH_WINDOWED]))
            for a in (span.attributes for span in spans[1].get_finished_spans())
            if a and attr.ROUTING_BATCH_SIZE in a]


async def test_requests_the_engine_admits_together_share_one_embedding_batch(
        model_dir: Path, make_engine: Callable[..., Engine], spans: Any,
        registry_doc: dict[str, Any]) -> None:
    # A join gap too short for two texts to meet by timing alone: what keeps the batch open
    # is the engine announcing each request it admitted, until the request reaches routing.
    service = EmbeddingService(model_dir, window_ms=60_000, join_ms=1)
    async with make_engine(_two_agents(registry_doc), embeddings=service,
                           warm_up=False) as engine:
        await engine.router.prepare()
        before = service.stats()["batches"]
        async with anyio.create_task_group() as tg:
            for text in BURST[:4]:
                tg.start_soon(lambda t=text: engine.infer(t, max_tokens=1))
        batches = service.stats()["batches"] - before
    assert batches == 1
    assert _routed_batches(spans) == [(4, True)] * 4


async def test_a_lone_engine_request_does_not_wait_for_the_window(
        model_dir: Path, make_engine: Callable[..., Engine], spans: Any,
        registry_doc: dict[str, Any]) -> None:
    # Its own announcement ends as it reaches routing: nothing else is on its way.
    service = EmbeddingService(model_dir, window_ms=60_000, join_ms=300)
    async with make_engine(_two_agents(registry_doc), embeddings=service,
                           warm_up=False) as engine:
        await engine.router.prepare()  # its examples, queued at once, do use the window
        windows = service.stats()["windows"]
        await engine.infer(BURST[0], max_tokens=1)
        windows = service.stats()["windows"] - windows
    assert _routed_batches(spans) == [(1, False)]
    assert windows == 0
