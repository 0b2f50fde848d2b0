"""The routing phase with the embedding router the Engine builds by default."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from orion_fsm import Engine
from orion_fsm.services.routing._embeddings import EmbeddingService

pytestmark = pytest.mark.anyio


async def test_without_an_embedding_model_routing_degrades_to_rules_and_still_serves(
    make_engine: Callable[..., Engine], tmp_path: Path, spans: tuple[Any, InMemorySpanExporter]
) -> None:
    (tmp_path / "no-model").mkdir()
    broken = EmbeddingService(model_dir=tmp_path / "no-model")
    async with make_engine(embeddings=broken) as engine:
        result = await engine.infer("please write a python function", max_tokens=2)
    assert result.state == "success" and result.agent == "code"
    assert result.routing["degraded"] is True and result.routing["source"] == "rules"
    routing = next(s for s in spans[1].get_finished_spans() if s.name == "routing")
    assert dict(routing.attributes or {})["orion.routing.degraded"] is True


@pytest.mark.slow
async def test_the_default_engine_routes_with_embeddings(tmp_path: Path) -> None:
    async with Engine(trace_path=tmp_path / "t.jsonl", cache_dir=tmp_path / "c") as engine:
        result = await engine.infer(
            "Mon programme Python plante avec une KeyError quand je lis le dictionnaire",
            max_tokens=2, temperature=0)
    assert result.routing["source"] == "embedding"
    assert result.agent == "code"
    assert result.routing["runner_up"] is not None and result.routing["margin"] > 0
