"""Hostile-input benchmarks: what the sanitiser costs on 64k characters (linear, not
quadratic), and how long the event loop stalls while hostile prompts are routed.
"""

from __future__ import annotations

import contextlib
import random
import string
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio

from bench._common import check

_CHARS = 65_536


def _texts() -> dict[str, str]:
    rng = random.Random(7)
    prose = ("The quick brown fox jumps over the lazy dog 42 times; mail alice@example.com, "
             "card 4111 1111 1111 1111, my password is Hunter2024! ")

    def fill(unit: str) -> str:
        return (unit * (_CHARS // len(unit) + 1))[:_CHARS]

    return {
        "prose with secrets": fill(prose),
        "a.a.a. then @ (was quadratic)": fill("a.")[:-1] + "@",
        "digits and spaces": fill("1 "),
        "eyJ runs": fill("eyJ"),
        "password = runs": fill("password = "),
        "random printable": "".join(rng.choice(string.printable) for _ in range(_CHARS)),
    }


def sanitiser(quick: bool = False) -> dict[str, Any]:
    from orion_fsm.services.observability import _sanitize

    _sanitize.warm_up()
    figures: dict[str, Any] = {}
    repeats = 2 if quick else 5
    for name, text in _texts().items():
        best = float("inf")
        for _ in range(repeats):
            _sanitize._clean.clear()
            started = time.perf_counter()
            _sanitize.sanitize_text(text)
            best = min(best, time.perf_counter() - started)
        figures[name] = round(best * 1e3, 2)
    # Linear: twice the text costs about twice the time (a quadratic rule costs four times).
    half = _texts()["prose with secrets"][: _CHARS // 2]
    start = time.perf_counter()
    _sanitize.sanitize_text(half)
    half_ms = (time.perf_counter() - start) * 1e3
    ratio = figures["prose with secrets"] / max(half_ms, 1e-3)
    worst = max(figures.values())
    return {
        "ms_per_64k_chars": figures, "ratio_64k_over_32k": round(ratio, 2),
        "checks": [
            check("sanitiser, prose with secrets, 64k chars (ms)",
                  figures["prose with secrets"], "<= 50", figures["prose with secrets"] <= 50),
            check("sanitiser, worst hostile 64k chars (ms)", worst, "<= 50", worst <= 50),
            check("sanitiser cost 64k/32k", round(ratio, 2), "<= 3 (linear)", ratio <= 3),
        ],
    }


def routing_heartbeat(quick: bool = False) -> dict[str, Any]:
    return anyio.run(_routing_heartbeat, quick)


async def _routing_heartbeat(quick: bool) -> dict[str, Any]:
    import json

    from orion_fsm import Engine, Registry
    from orion_fsm._resources import data_file
    from orion_fsm.testing import make_tiny_llama_gguf

    prompts = {"32k digits": "7" * 32_000, "if ... x12k": "if " * 12_000,
               "1 1 1 x20k": "1 " * 20_000, "a.a.a.@": "a." * 30_000 + "@",
               "a quadratic rule's digits": "9" * 40_000}
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        model = make_tiny_llama_gguf(root / "m.gguf", n_layers=2, n_embd=32, seed=1)
        logic = json.loads(data_file("models.json").read_text(encoding="utf-8"))
        patterns = next(a for a in logic["agents"] if a["id"] == "logic")["routing"]["patterns"]
        agents = [{"id": name, "role": name, "description": name, "capabilities": [],
                   "model": {"path": str(model)}, "format": "gguf", "model_type": "llama",
                   "chat_template": "chatml", "system_prompt": "", "context_length": 256,
                   "generation": {"max_tokens": 2, "temperature": 0}, "ram_estimate_mb": 5,
                   "routing": {"keywords": [], "patterns": rules, "examples": []}}
                  for name, rules in (("chat", []),
                                      ("logic", [*patterns, r"\d+\s*[-+*/]\s*\d+"]))]
        registry = Registry.from_dict({"version": 1, "default_agent": "chat", "agents": agents})
        gaps: dict[str, float] = {}
        whole: dict[str, float] = {}
        guarded: dict[str, float] = {}
        async with Engine(registry, trace_path=root / "t.jsonl", cache_dir=root / "c",
                          embeddings=False, threads=1, guardrails=False) as engine:
            for name, prompt in prompts.items():
                # The routing phase alone (what the router does with the text), then the
                # whole request (validation, routing, tokenising, refusal, trace line).
                gaps[name] = await _worst_gap(
                    lambda p=prompt: engine.router.route(p, requested=None), quick)
                whole[name] = await _worst_gap(
                    lambda p=prompt: _quietly(engine.infer(p, max_tokens=1)), quick)
        # With the guardrails on (the default): their scans of the prompt, then the refusal.
        async with Engine(registry, trace_path=root / "g.jsonl", cache_dir=root / "g",
                          embeddings=False, threads=1) as engine:
            for name, prompt in prompts.items():
                guarded[name] = await _worst_gap(
                    lambda p=prompt: _quietly(engine.infer(p, max_tokens=1)), quick)
        # The floor the machine sets: the same heartbeat while the work only sleeps.
        idle = await _worst_gap(lambda: anyio.sleep(0.2), quick)
    worst_ms, worst_whole = max(gaps.values()), max([*whole.values(), *guarded.values()])
    return {"max_loop_gap_ms_routing": gaps, "max_loop_gap_ms_whole_request": whole,
            "max_loop_gap_ms_whole_request_guardrails_on": guarded,
            "max_loop_gap_ms_while_sleeping": idle,
            "checks": [
                check("event-loop gap while routing hostile prompts (ms, worst)", worst_ms,
                      "<= 50", worst_ms <= 50),
                check("event-loop gap over whole hostile requests (ms, worst)", worst_whole,
                      "<= 50", worst_whole <= 50)]}


def trace_record(quick: bool = False) -> dict[str, Any]:
    """Sanitising one typical trace record (a served request, an e-mail in its prompt): what
    the trace writer's thread pays per request. Was a test's timing assertion."""
    return anyio.run(_trace_record, quick)


async def _trace_record(quick: bool) -> dict[str, Any]:
    import json

    from orion_fsm import Engine, Registry
    from orion_fsm.services.observability._sanitize import sanitize, warm_up
    from orion_fsm.testing import make_tiny_llama_gguf

    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        model = make_tiny_llama_gguf(root / "m.gguf", n_layers=2, n_embd=32, seed=1)
        registry = Registry.from_dict({"version": 1, "default_agent": "chat", "agents": [{
            "id": "chat", "role": "chat", "description": "chat", "capabilities": [],
            "model": {"path": str(model)}, "format": "gguf", "model_type": "llama",
            "chat_template": "chatml", "system_prompt": "You are helpful.",
            "context_length": 256, "generation": {"max_tokens": 8, "temperature": 0},
            "ram_estimate_mb": 5, "routing": {"keywords": [], "patterns": [], "examples": []}}]})
        async with Engine(registry, trace_path=root / "t.jsonl", cache_dir=root / "c",
                          embeddings=False, threads=1) as engine:
            await engine.infer("What is the capital of France? Write to bob@example.com",
                               max_tokens=8)
        record = json.loads((root / "t.jsonl").read_text(encoding="utf-8").splitlines()[0])
    warm_up()
    n = 100 if quick else 500
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(n):
            sanitize(record)
        best = min(best, (time.perf_counter() - start) / n)
    per_record_us = round(best * 1e6, 1)
    return {"us_per_record": per_record_us,
            "checks": [check("sanitising a typical trace record (µs)", per_record_us,
                             "< 500", per_record_us < 500)]}


async def _quietly(call: Awaitable[Any]) -> None:
    from orion_fsm import RequestFailed

    # Longer than the context: refused after routing (with guardrails on, before it).
    with contextlib.suppress(RequestFailed):
        await call


async def _worst_gap(work: Callable[[], Awaitable[Any]], quick: bool) -> float:
    """The longest the event loop left a 2 ms heartbeat waiting while `work` ran (ms)."""
    worst = 0.0
    for _ in range(1 if quick else 3):
        last = anyio.current_time()
        gap = 0.0

        async def heartbeat() -> None:
            nonlocal last, gap
            while True:
                await anyio.sleep(0.002)
                now = anyio.current_time()
                gap, last = max(gap, now - last), now

        async with anyio.create_task_group() as tg:
            tg.start_soon(heartbeat)
            await anyio.sleep(0.01)  # the heartbeat is ticking before the work starts
            last = anyio.current_time()
            await work()
            tg.cancel_scope.cancel()
        worst = max(worst, gap)
    return round(worst * 1e3, 1)


BENCHMARKS: dict[str, Callable[..., dict[str, Any]]] = {
    "hostile.sanitiser": sanitiser,
    "hostile.routing_heartbeat": routing_heartbeat,
    "hostile.trace_record": trace_record,
}
