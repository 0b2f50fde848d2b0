"""`orion-fsm cache stats|clear`: the L1/L2/L3 caches kept under the cache directory.

Statistics shown are the disk tiers' (entries, bytes, health): hit counters live per process.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import anyio

from orion_fsm import CACHE_LEVELS, CacheSet, CacheStats, caches_dir, resolve_cache_dir

from ._remote import add_server_options, connect


def add_parser(sub: Any) -> None:
    cache = sub.add_parser("cache", help="the L1/L2/L3 result caches")
    csub = cache.add_subparsers(dest="cache_command", required=True)
    stats = csub.add_parser("stats", help="entries, bytes and health of each level")
    stats.add_argument("--json", action="store_true")
    add_server_options(stats)
    clear = csub.add_parser("clear", help="empty the caches (memory and disk)")
    clear.add_argument("--level", choices=CACHE_LEVELS,
                       help="only this level (default: every level)")
    cache.set_defaults(handler=_cache)


def cache_root(cache_dir: str | None) -> Path:
    """`<cache dir>/caches`, the cache dir being --cache-dir, $ORION_FSM_CACHE or
    ~/.cache/orion-fsm (the engine's default)."""
    return caches_dir(resolve_cache_dir(cache_dir))


def _cache(args: argparse.Namespace) -> int:
    root = cache_root(args.cache_dir)
    if args.cache_command == "clear":
        cleared = anyio.run(_clear, root, args.level)
        for level, entries in cleared.items():
            print(f"cleared {level}: {entries} entries ({root / level})")
        return 0
    if args.cache_command == "stats" and args.server is not None:
        levels = anyio.run(_live, args)
        if args.json:
            print(json.dumps({"server": args.server, "levels": levels}, indent=2))
            return 0
        print(f"caches of the server at {args.server} (this process's hit counters)")
        print(f"{'level':<6}{'hits':>8}{'misses':>8}{'hit rate':>10}{'entries':>9}"
              f"{'memory':>11}{'disk':>9}")
        for level, s in levels.items():
            print(f"{level:<6}{s['hits']:>8}{s['misses']:>8}{s['hit_rate']:>10.0%}"
                  f"{s['memory_entries']:>9}{_size(s['memory_bytes']):>11}"
                  f"{s['disk_entries']:>9}")
        return 0
    stats = anyio.run(_stats, root)
    if args.json:
        print(json.dumps({"root": str(root),
                          "levels": {level: s.to_dict() for level, s in stats.items()}},
                         indent=2))
        return 0
    print(f"caches under {root}")
    print(f"{'level':<6} {'disk':<12} {'entries':>8} {'bytes':>10} {'memory':>7} {'ttl':>6}  "
          f"directory")
    for level, s in stats.items():
        print(f"{level:<6} {s.disk_state:<12} {s.disk_entries:>8} {_size(s.disk_bytes):>10} "
              f"{s.memory_capacity:>7} {_duration(s.ttl_s):>6}  {s.disk_dir or '-'}")
        if s.disk_problem:
            print(f"       problem: {s.disk_problem}")
    return 0


async def _live(args: argparse.Namespace) -> dict[str, Any]:
    async with connect(args) as server:
        levels: dict[str, Any] = (await server.get("/v1/orion/cache"))["levels"]
    return levels


async def _stats(root: Path) -> dict[str, CacheStats]:
    async with CacheSet(root) as caches:
        return caches.stats()


async def _clear(root: Path, level: str | None) -> dict[str, int]:
    async with CacheSet(root) as caches:
        before = caches.stats()
        await caches.clear(level)
        return {name: s.disk_entries for name, s in before.items() if level in (None, name)}


def _size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB"):
        if size < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "none"
    if seconds % 3600 == 0:
        return f"{seconds / 3600:.0f}h"
    if seconds % 60 == 0:
        return f"{seconds / 60:.0f}m"
    return f"{seconds:g}s"
