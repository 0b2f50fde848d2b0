"""Live replay regenerates with the real models: greedy and seeded outputs exactly, and the
first drifting token of a model whose file changed since the recording.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest

from orion_fsm import Engine
from orion_fsm.testing import make_tiny_llama_gguf
from orion_fsm.testing.replay import assert_replays, replay
from tests.conftest import agent

pytestmark = pytest.mark.anyio

MakeEngine = Callable[..., Engine]
Recorded = Callable[[], list[dict[str, Any]]]


@pytest.fixture
def own_model(tmp_path: Path, registry_doc: dict[str, Any]) -> Path:
    """A model file of this test's own, so that the test may change it."""
    path = make_tiny_llama_gguf(tmp_path / "own" / "model.gguf", n_layers=2, n_embd=32, seed=5)
    registry_doc["agents"][0] = agent("conversation", path,
                                      routing={"keywords": ["hello"], "patterns": [],
                                               "examples": []})
    return path


async def test_live_replay_regenerates_greedy_and_seeded_outputs_exactly(
    make_engine: MakeEngine, tmp_path: Path, recorded: Recorded, own_model: Path,
) -> None:
    async with make_engine() as engine:
        await engine.infer("hello", temperature=0, max_tokens=8)
        await engine.infer("hello", temperature=0.9, top_k=40, seed=7, max_tokens=8)
    for record in recorded():
        report = await assert_replays(record, registry=engine.registry, live=True,
                                      cache_dir=tmp_path / "cache")
        assert report.mode == "live" and report.skipped == ()


async def test_live_replay_reports_the_first_drifting_token_of_a_changed_model(
    make_engine: MakeEngine, tmp_path: Path, recorded: Recorded, own_model: Path,
) -> None:
    async with make_engine() as engine:
        await engine.infer("hello", temperature=0, max_tokens=8)
    (record,) = recorded()
    await anyio.sleep(0.01)  # a new modification time, as any rewrite of the file would have
    make_tiny_llama_gguf(own_model, n_layers=2, n_embd=32, seed=6)  # other weights
    report = await replay(record, registry=engine.registry, live=True,
                          cache_dir=tmp_path / "cache")
    assert report.first is not None and report.first.state == "inferencing"
    assert report.first.field.startswith("result.token_ids[")
    assert any("the model file changed since the recording" in w for w in report.warnings)
