"""Secrets at rest: nothing the engine writes (traces, L1/L3 disk caches, their databases)
lets a reader recover a secret the sanitiser detects, not even by decoding token ids; every
file and folder the engine makes is private to the user."""

from __future__ import annotations

import contextlib
import json
import re
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from orion_fsm import Engine, RequestFailed
from orion_fsm.backends import Tokenizer
from orion_fsm.replay import replay
from tests.conftest import read_trace_lines

pytestmark = pytest.mark.anyio

CORPUS = json.loads((Path(__file__).parent / "data" / "secrets_corpus.json").read_text())
POSITIVE: list[dict[str, str]] = CORPUS["positive"]
_ID_LISTS = re.compile(rb"\[(\d+(?:, ?\d+){2,})\]")


def test_the_corpus_holds_at_least_20_kinds_of_secret() -> None:
    assert len({case["kind"] for case in POSITIVE}) >= 20


def _files(root: Path) -> Iterator[Path]:
    for path in root.rglob("*"):
        if path.is_file():
            yield path


def _readable_forms(path: Path, tokenizers: list[Tokenizer]) -> Iterator[str]:
    """The file's bytes as text, and every list of token ids in it decoded by every model."""
    data = path.read_bytes()
    yield data.decode("utf-8", "replace")
    for match in _ID_LISTS.finditer(data):
        ids = [int(i) for i in match.group(1).replace(b" ", b"").split(b",")]
        for tokenizer in tokenizers:
            try:
                yield tokenizer.decode(ids)
            except Exception:  # ids of another vocabulary
                continue


async def test_no_file_the_engine_writes_gives_back_a_corpus_secret(
        make_engine: Callable[..., Engine], tmp_path: Path,
        tiny_models: dict[str, Path]) -> None:
    cache_dir = tmp_path / "cache"
    async with make_engine(cache_dir=cache_dir) as engine:
        for case in POSITIVE:
            for system in (None, "be brief"):
                # Refused or failed: its trace line is checked all the same.
                with contextlib.suppress(RequestFailed):
                    await engine.infer(case["text"], system=system, max_tokens=2)
        assert engine.trace_path is not None
        trace = engine.trace_path
    written = [*_files(cache_dir), trace]
    tokenizers = [Tokenizer.from_file(p.parent / "tokenizer.json")
                  for p in tiny_models.values()]
    assert any(p.name == "cache.db" for p in written)
    leaks = []
    for path in written:
        if path.suffix in (".gguf", ".bin") or path.name == "tokenizer.json":
            continue  # the models themselves
        for text in _readable_forms(path, tokenizers):
            leaks += [f"{case['kind']} in {path.name}" for case in POSITIVE
                      if case["secret"] in text]
    assert leaks == []
    # The ids were dropped where they would have decoded to a secret, and the record says so.
    records = read_trace_lines(trace)
    assert any("prompt_token_ids" in r.get("redacted", ()) for r in records)


async def test_a_trace_whose_prompt_ids_were_dropped_still_replays(
        make_engine: Callable[..., Engine], tmp_path: Path) -> None:
    async with make_engine() as engine:
        await engine.infer("my password is Hunter2024! remember it", max_tokens=3)
    assert engine.trace_path is not None
    (record,) = read_trace_lines(engine.trace_path)
    assert record["prompt_token_ids"] == [] and record["redacted"] == ["prompt_token_ids"]
    report = await replay(record, registry=engine.registry)
    assert report.ok, report.summary()


async def test_files_and_folders_the_engine_creates_are_private(
        make_engine: Callable[..., Engine], tmp_path: Path) -> None:
    cache_dir = tmp_path / "cache"
    trace = tmp_path / "traces" / "deep" / "t.jsonl"
    async with make_engine(cache_dir=cache_dir, trace_path=trace) as engine:
        await engine.infer("hello", max_tokens=2)
    made: list[Any] = [trace.parent, trace.parent.parent, trace,
                       *(p for p in cache_dir.rglob("*") if "caches" in p.parts),
                       *(p for p in cache_dir.rglob("*") if p.is_dir())]
    assert len(made) > 5
    for path in made:
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode & 0o077 == 0, f"{path} is {oct(mode)}"
