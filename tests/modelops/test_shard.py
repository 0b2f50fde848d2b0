"""Sharding: parts in load order whose concatenation is the model, a manifest that names them,
and the loader serving a sharded model through its own states, one span per part."""

from __future__ import annotations

import hashlib
import json
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from orion_fsm import Engine, ModelFileError, ModelLoadError
from orion_fsm.backends._gguf_io import open_gguf
from orion_fsm.modelops import read_manifest, shard_model
from orion_fsm.services.models._sharded import ShardedLoad, ShardLoadState
from tests.conftest import agent

pytestmark = pytest.mark.anyio


def assembled(manifest_path: Path) -> bytes:
    manifest = read_manifest(manifest_path)
    return b"".join(manifest.shard_path(s).read_bytes() for s in manifest.shards)


@pytest.mark.parametrize("shards", [1, 3, 5])
def test_parts_concatenate_to_the_model_in_load_order(tiny_pair: dict[str, Path],
                                                      tmp_path: Path, shards: int) -> None:
    result, manifest = shard_model(tiny_pair["deeper"], shards, tmp_path / "sharded")
    assert len(manifest.shards) == shards
    whole = assembled(result.path)
    assert hashlib.sha256(whole).hexdigest() == manifest.sha256 and len(whole) == manifest.size
    for entry in manifest.shards:
        part = manifest.shard_path(entry)
        assert stat.S_IMODE(part.stat().st_mode) == 0o600
        assert hashlib.sha256(part.read_bytes()).hexdigest() == entry.sha256
    order = [name for entry in manifest.shards for name in entry.tensors]
    assert order[0] == "token_embd.weight"
    blocks = [int(n.split(".")[1]) for n in order if n.startswith("blk.")]
    assert blocks == sorted(blocks)
    assert order.index("output.weight") > order.index("blk.2.ffn_down.weight")
    # The same tensors as the source, byte for byte.
    rebuilt = tmp_path / "rebuilt" / "model.gguf"
    rebuilt.parent.mkdir()
    rebuilt.write_bytes(whole)
    with open_gguf(tiny_pair["deeper"]) as src, open_gguf(rebuilt) as dst:
        assert dst.tensors.keys() == src.tensors.keys()
        assert all(bytes(dst.raw(n).tobytes()) == bytes(src.raw(n).tobytes())
                   for n in src.tensors)
    doc = json.loads(result.path.read_text())
    assert doc["format"] == "orion-fsm-shards" and doc["tokenizer"] == "tokenizer.json"


@pytest.mark.parametrize(("shards", "message"), [
    (0, "--shards must be between 1 and 16, got 0"),
    (17, "--shards must be between 1 and 16, got 17"),
])
def test_a_bad_shard_count_is_one_line(tiny_pair: dict[str, Path], tmp_path: Path,
                                       shards: int, message: str) -> None:
    with pytest.raises(ModelFileError, match=message):
        shard_model(tiny_pair["a"], shards, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_an_existing_folder_is_not_overwritten(tiny_pair: dict[str, Path],
                                               tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "mine.txt").write_text("keep")
    with pytest.raises(ModelFileError, match="already exists and is not an empty folder"):
        shard_model(tiny_pair["a"], 2, tmp_path / "out")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["mine.txt"]


def test_an_interrupted_shard_leaves_no_folder(tiny_pair: dict[str, Path], tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    import orion_fsm.backends._shards as shards_module

    def interrupted(*args: Any) -> str:
        raise KeyboardInterrupt

    monkeypatch.setattr(shards_module, "_copy_range", interrupted)
    with pytest.raises(KeyboardInterrupt):
        shard_model(tiny_pair["a"], 2, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_the_loader_states_go_through_each_shard_then_ready(tiny_pair: dict[str, Path],
                                                            tmp_path: Path) -> None:
    result, _ = shard_model(tiny_pair["a"], 3, tmp_path / "sharded")
    load = ShardedLoad(result.path, tmp_path / "cache")
    model = load.run()
    assert [(s.state, s.shard) for s in load.steps] == [
        (ShardLoadState.INITIALIZING, None), (ShardLoadState.LOADING_SHARD, 0),
        (ShardLoadState.LOADING_SHARD, 1), (ShardLoadState.LOADING_SHARD, 2),
        (ShardLoadState.READY, None)]
    assert model.read_bytes() == assembled(result.path)
    assert (model.parent / "tokenizer.json").is_file()
    again = ShardedLoad(result.path, tmp_path / "cache")
    assert again.run() == model and again.reused
    assert [s.state for s in again.steps] == [ShardLoadState.INITIALIZING, ShardLoadState.READY]


@pytest.mark.parametrize("damage", ["missing", "corrupt", "manifest"])
def test_a_damaged_shard_fails_the_load_in_one_line(tiny_pair: dict[str, Path], tmp_path: Path,
                                                    damage: str) -> None:
    result, manifest = shard_model(tiny_pair["a"], 2, tmp_path / "sharded")
    part = manifest.shard_path(manifest.shards[1])
    if damage == "missing":
        part.unlink()
    elif damage == "corrupt":
        data = bytearray(part.read_bytes())
        data[10] ^= 0xFF
        part.write_bytes(bytes(data))
    else:
        result.path.write_text('{"format": "orion-fsm-shards"')
    load = ShardedLoad(result.path, tmp_path / "cache")
    with pytest.raises(ModelLoadError) as caught:  # what the request falls back on
        load.run()
    assert "\n" not in str(caught.value)
    assert {"missing": "is missing", "corrupt": "is corrupt",
            "manifest": "is not readable JSON"}[damage] in str(caught.value)
    assert load.state is ShardLoadState.FAILED
    assert list((tmp_path / "cache").rglob("model.gguf")) == []


async def test_an_engine_serves_a_sharded_model_like_the_whole(
        tiny_pair: dict[str, Path], tmp_path: Path, make_engine: Callable[..., Engine],
        spans: tuple[Any, InMemorySpanExporter]) -> None:
    result, _ = shard_model(tiny_pair["a"], 3, tmp_path / "sharded")
    doc = {"version": 1, "default_agent": "whole", "agents": [
        agent("whole", tiny_pair["a"], system_prompt="Be brief."),
        agent("sharded", result.path, system_prompt="Be brief.")]}
    async with make_engine(doc) as engine:
        whole = await engine.infer("the cat is", agent="whole", cache=False)
        sharded = await engine.infer("the cat is", agent="sharded", cache=False)
    assert sharded.text == whole.text and sharded.agent == "sharded"
    finished = spans[1].get_finished_spans()
    parts = [s for s in finished if s.name == "orion.model.shard"]
    assert sorted(s.attributes["orion.shard.index"] for s in parts) == [0, 1, 2]
    loading = [s for s in finished if s.attributes and s.attributes.get("orion.model.shards")]
    assert loading and loading[0].attributes["orion.model.shards"] == 3
    assert loading[0].attributes["orion.model"] == "sharded:default@256"  # the folder's name


async def test_a_damaged_sharded_model_falls_back_to_the_next_agent(
        tiny_pair: dict[str, Path], tmp_path: Path, make_engine: Callable[..., Engine]) -> None:
    result, manifest = shard_model(tiny_pair["a"], 2, tmp_path / "sharded")
    manifest.shard_path(manifest.shards[1]).unlink()
    doc = {"version": 1, "default_agent": "sharded", "agents": [
        agent("whole", tiny_pair["a"]), agent("sharded", result.path, fallback="whole")]}
    async with make_engine(doc) as engine:
        served = await engine.infer("the cat is", agent="sharded", cache=False)
    assert served.agent == "whole" and served.fallback


def test_a_manifest_reads_as_the_model_it_makes(tiny_pair: dict[str, Path],
                                                tmp_path: Path) -> None:
    from orion_fsm import ModelCache
    from orion_fsm.backends import ensure_converted, read_gguf_header

    result, manifest = shard_model(tiny_pair["a"], 3, tmp_path / "sharded")
    header, whole = read_gguf_header(result.path), read_gguf_header(tiny_pair["a"])
    assert header.metadata == whole.metadata and header.tensor_names == whole.tensor_names
    assert header.data_end == manifest.size
    cache = ModelCache(tmp_path / "cache")
    assert cache.runtime_file(result.path) is None  # not assembled yet
    converted = ensure_converted(result.path, tmp_path / "cache")  # `models convert` path
    assert converted.model_path.read_bytes() == assembled(result.path)
    assert cache.runtime_file(result.path) == converted.model_path


def test_every_shard_count_gives_non_empty_parts_in_order(tiny_pair: dict[str, Path],
                                                          tmp_path: Path) -> None:
    for shards in range(1, 17):
        result, manifest = shard_model(tiny_pair["deeper"], shards, tmp_path / f"n{shards}")
        assert len(manifest.shards) == shards
        assert all(entry.size > 0 and entry.tensors for entry in manifest.shards)
        assert hashlib.sha256(assembled(result.path)).hexdigest() == manifest.sha256
