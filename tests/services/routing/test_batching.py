"""The embedding service's adaptive window: a burst is encoded in at most two batches, a lone
text never enters the window, and the routing span and trace say which batch a request was in."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
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
