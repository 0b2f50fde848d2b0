"""`orion-fsm cache stats|clear` on a real cache directory."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import anyio
import pytest

from orion_fsm.cli import _cache
from orion_fsm.services.caches._cacheset import CacheSet


def run(argv: list[str]) -> int:
    # The same top-level options as `orion-fsm` (orion_fsm/cli/__init__.py).
    parser = argparse.ArgumentParser(prog="orion-fsm")
    parser.add_argument("--registry")
    parser.add_argument("--cache-dir")
    _cache.add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    code: int = args.handler(args)
    return code


def fill(root: Path) -> None:
    async def main() -> None:
        async with CacheSet(root) as caches:
            await caches.l1.set("r1", {"text": "one"})
            await caches.l1.set("r2", {"text": "two"})
            await caches.l3.set("route", {"agent": "code"})

    anyio.run(main)


def stats_json(cache_dir: Path, capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    capsys.readouterr()
    assert run(["--cache-dir", str(cache_dir), "cache", "stats", "--json"]) == 0
    doc: dict[str, Any] = json.loads(capsys.readouterr().out)
    return doc


def test_stats_reports_each_level_on_disk(tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    fill(tmp_path / "caches")
    doc = stats_json(tmp_path, capsys)
    assert doc["root"] == str(tmp_path / "caches")
    levels = doc["levels"]
    assert [levels[level]["disk_entries"] for level in ("l1", "l2", "l3")] == [2, 0, 1]
    assert all(levels[level]["disk_state"] == "ok" for level in levels)
    assert levels["l1"]["disk_bytes"] > 0 and levels["l1"]["ttl_s"] == 1800

    assert run(["--cache-dir", str(tmp_path), "cache", "stats"]) == 0
    table = capsys.readouterr().out.splitlines()
    l1 = next(line for line in table if line.startswith("l1 "))
    assert l1.split()[:3] == ["l1", "ok", "2"] and "30m" in l1
    assert str(tmp_path / "caches" / "l1") in l1


def test_clear_empties_one_level_then_all(tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    fill(tmp_path / "caches")
    assert run(["--cache-dir", str(tmp_path), "cache", "clear", "--level", "l1"]) == 0
    assert "cleared l1: 2 entries" in capsys.readouterr().out
    levels = stats_json(tmp_path, capsys)["levels"]
    assert (levels["l1"]["disk_entries"], levels["l3"]["disk_entries"]) == (0, 1)

    assert run(["--cache-dir", str(tmp_path), "cache", "clear"]) == 0
    out = capsys.readouterr().out
    assert "cleared l3: 1 entries" in out and "cleared l2: 0 entries" in out
    levels = stats_json(tmp_path, capsys)["levels"]
    assert all(levels[level]["disk_entries"] == 0 for level in levels)


def test_stats_defaults_to_the_engine_cache_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ORION_FSM_CACHE", str(tmp_path / "env-cache"))
    assert run(["cache", "stats", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["root"] == str(tmp_path / "env-cache" / "caches")


def test_stats_reports_a_corrupt_level_it_rebuilt(tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    fill(tmp_path / "caches")
    (tmp_path / "caches" / "l3" / "cache.db").write_bytes(b"\x00garbage" * 1000)
    assert run(["--cache-dir", str(tmp_path), "cache", "stats"]) == 0
    out = capsys.readouterr().out
    assert "l3     rebuilt" in out and "problem: corrupt" in out
    assert list((tmp_path / "caches").glob("l3.corrupt-*"))


def test_an_unknown_level_is_refused_by_the_parser(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        run(["cache", "clear", "--level", "l4"])
    assert "invalid choice" in capsys.readouterr().err
