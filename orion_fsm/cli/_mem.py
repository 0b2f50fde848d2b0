"""`orion-fsm mem`: memory of this machine and process, and what each registry model would cost.

A live view (refreshed every `--interval` seconds until Ctrl-C) or one `--once` snapshot;
`--load AGENT` loads that agent's model here and measures its real RSS cost.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any, Final

import anyio
import psutil

from orion_fsm import (
    AgentSpec,
    LoaderConfig,
    MemoryMonitor,
    ModelCache,
    ModelLoader,
    ModelLoadError,
    Registry,
    estimate_model_memory,
    resolve_cache_dir,
)

from ._common import Progress
from ._remote import add_server_options, connect

_MB: Final = 1 << 20
_BAR_WIDTH: Final = 20
_CLEAR: Final = "\x1b[H\x1b[2J"


def add_parser(sub: Any) -> None:
    mem = sub.add_parser("mem", help="memory: machine, process, and each model's estimated cost")
    mem.add_argument("--once", action="store_true", help="print one snapshot and exit")
    mem.add_argument("--json", action="store_true", help="print JSON (one object per refresh)")
    mem.add_argument("--interval", type=float, default=2.0,
                     help="seconds between refreshes of the live view (default 2)")
    mem.add_argument("--count", type=int, help="stop the live view after this many refreshes")
    mem.add_argument("--budget-mb", type=float,
                     help="memory budget to compare models with (default: half the available RAM)")
    mem.add_argument("--load", metavar="AGENT",
                     help="load this agent's model here, then unload it, measuring process RSS")
    add_server_options(mem)
    mem.set_defaults(handler=_mem)


def _mem(args: argparse.Namespace) -> int:
    if args.interval <= 0:
        print("orion-fsm: --interval must be positive", file=sys.stderr)
        return 2
    if args.server is not None:
        code: int = anyio.run(_remote, args)
        return code
    registry = Registry.load(args.registry)
    cache = resolve_cache_dir(args.cache_dir)
    progress = Progress(enabled=not args.json and sys.stderr.isatty())
    loader = ModelLoader(cache, progress=progress,
                         config=LoaderConfig(memory_budget_mb=args.budget_mb))
    monitor = MemoryMonitor(loader=loader)
    files = ModelCache(cache)
    measured = None
    if args.load:
        measured = anyio.run(_measure_load, loader, registry.get(args.load))
        progress.close()
    frames = 0
    try:
        while True:
            view = snapshot_view(registry, loader, monitor, files, measured)
            if args.json:
                print(json.dumps(view), flush=True)
            else:
                live = not args.once and sys.stdout.isatty()
                print((_CLEAR if live else "") + render(view), flush=True)
            frames += 1
            if args.once or (args.count is not None and frames >= args.count):
                return 0
            time.sleep(args.interval)
    except KeyboardInterrupt:
        return 0


async def _remote(args: argparse.Namespace) -> int:
    """The server's own memory: its process, its loaded models, its pressure."""
    frames = 0
    async with connect(args) as server:
        while True:
            snap: dict[str, Any] = await server.get("/v1/orion/mem")
            if args.json:
                print(json.dumps(snap), flush=True)
            else:
                live = not args.once and sys.stdout.isatty()
                print((_CLEAR if live else "") + render_server(snap, server.url), flush=True)
            frames += 1
            if args.once or (args.count is not None and frames >= args.count):
                return 0
            await anyio.sleep(args.interval)


def render_server(snap: dict[str, Any], url: str) -> str:
    budget = "-" if snap["budget_mb"] is None else f"{snap['budget_mb']:.0f} MB"
    lines = [f"orion-fsm mem · server {url} · pressure {snap['level'].upper()}",
             f"machine  {snap['system_total_mb']:.0f} MB RAM · "
             f"{snap['system_available_mb']:.0f} MB available ({snap['available_pct']:.0f}%)",
             f"server   {snap['process_rss_mb']:.0f} MB RSS · budget {budget}"]
    if snap["models"]:
        lines += ["", "loaded:"]
        lines += [f"  {m['model']:<40} {m['estimate_mb']:>7.0f} MB  pins {m['pins']}  "
                  f"idle {m['idle_s']:.0f} s" for m in snap["models"]]
    else:
        lines += ["", "no model loaded"]
    if snap["caches_mb"]:
        lines.append("caches   " + "  ".join(f"{k} {v} MB" for k, v in snap["caches_mb"].items()))
    lines += ["", *snap["recommendations"]]
    return "\n".join(lines)


async def _measure_load(loader: ModelLoader, spec: AgentSpec) -> dict[str, Any]:
    process = psutil.Process()
    prepared = await loader.prepare(spec)  # conversion is not the model's memory
    before = process.memory_info().rss
    lease = await loader.acquire(spec)
    loaded = process.memory_info().rss
    lease.release()
    await loader.unload_idle()
    after = process.memory_info().rss
    await loader.aclose()
    return {"agent": spec.id, "model": prepared.key.label,
            "estimate_mb": round(prepared.estimate.total_mb, 1),
            "load_ms": round(lease.load_info.load_ms, 1),
            "rss_before_mb": round(before / _MB, 1), "rss_loaded_mb": round(loaded / _MB, 1),
            "rss_after_unload_mb": round(after / _MB, 1),
            "rss_delta_mb": round((loaded - before) / _MB, 1),
            "returned_mb": round((loaded - after) / _MB, 1)}


def snapshot_view(registry: Registry, loader: ModelLoader, monitor: MemoryMonitor,
                  files: ModelCache, measured: dict[str, Any] | None = None) -> dict[str, Any]:
    """Everything the view shows, as JSON-ready data."""
    snap = monitor.sample()
    budget = loader.budget_bytes
    rows: dict[tuple[str, str, int], dict[str, Any]] = {}
    for spec in registry.agents.values():
        try:
            choice = loader.variant_for(spec)
            source = choice.source.locate()
        except ModelLoadError as exc:
            rows[(spec.id, "", 0)] = {"agents": [spec.id], "variant": None, "model": None,
                                      "status": "missing", "error": exc.message,
                                      "estimate_mb": None, "share_of_budget": None}
            continue
        row_key = (str(source), choice.name, spec.context_length)
        if row_key in rows:
            rows[row_key]["agents"].append(spec.id)
            continue
        runtime = files.runtime_file(source)
        # An unconverted file is sized from its own header: conversion keeps the tensors.
        estimate = estimate_model_memory(runtime or source, spec.context_length,
                                         overhead_bytes=int(loader.config.overhead_mb * _MB))
        rows[row_key] = {
            "agents": [spec.id], "variant": choice.name, "model": source.name,
            "context_length": spec.context_length,
            "status": "ready" if runtime else "not converted",
            "estimate_mb": round(estimate.total_mb, 1),
            "weights_mb": round(estimate.weights_bytes / _MB, 1),
            "kv_cache_mb": round(estimate.kv_cache_bytes / _MB, 1),
            "registry_ram_estimate_mb": spec.ram_estimate_mb,
            "share_of_budget": round(estimate.total_bytes / budget, 4),
            "fits_budget": estimate.total_bytes <= budget,
        }
    tier = loader.tier
    view: dict[str, Any] = {
        **snap.as_dict(),
        "tier": {"name": tier.name, "max_loaded_models": loader.max_loaded_models,
                 "keep_alive_s": tier.keep_alive_s, "quantization": tier.quantization},
        "cache_dir": str(files.cache_dir),
        "registry_models": list(rows.values()),
    }
    if measured is not None:
        view["load"] = measured
    return view


def _bar(share: float) -> str:
    filled = min(_BAR_WIDTH, round(share * _BAR_WIDTH))
    return "█" * filled + "░" * (_BAR_WIDTH - filled)


def render(view: dict[str, Any]) -> str:
    """The compact text view of `snapshot_view`'s data."""
    tier = view["tier"]
    lines = [
        f"orion-fsm mem · pressure {view['level'].upper()} · tier {tier['name']} "
        f"({tier['max_loaded_models']} models, {tier['quantization']}, keep-alive "
        f"{tier['keep_alive_s']:.0f} s)",
        f"machine  {view['system_total_mb']:.0f} MB RAM · {view['system_available_mb']:.0f} MB "
        f"available ({view['available_pct']:.0f}%)",
        f"process  {view['process_rss_mb']:.0f} MB RSS · budget {view['budget_mb']:.0f} MB",
        "",
        f"{'agents':<28} {'variant':<8} {'status':<13} {'estimate':>10}  share of budget",
    ]
    for row in view["registry_models"]:
        agents = ",".join(row["agents"])
        agents = agents if len(agents) <= 28 else agents[:27] + "…"
        if row["estimate_mb"] is None:
            lines.append(f"{agents:<28} {'-':<8} {row['status']:<13} {'-':>10}  {row['error']}")
            continue
        share = row["share_of_budget"]
        lines.append(f"{agents:<28} {row['variant']:<8} {row['status']:<13} "
                     f"{row['estimate_mb']:>7.0f} MB  |{_bar(share)}| {share:.0%}")
    if view["models"]:
        lines += ["", "loaded here:"]
        lines += [f"  {m['model']:<40} {m['estimate_mb']:>7.0f} MB  pins {m['pins']}"
                  for m in view["models"]]
    load = view.get("load")
    if load:
        lines += ["", f"--load {load['agent']}: {load['model']} took {load['load_ms']:.0f} ms, "
                  f"RSS +{load['rss_delta_mb']:.0f} MB (estimate {load['estimate_mb']:.0f} MB); "
                  f"unloading returned {load['returned_mb']:.0f} MB"]
    lines += ["", *view["recommendations"]]
    return "\n".join(lines)
