"""Benchmarks of `orion-fsm serve` on loopback, each against the in-process Engine in the same
run: an L1 hit over HTTP, the first SSE byte against in-process time to first token, 200
concurrent streaming clients, and `orion-fsm run --server` routing with a warm server.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx

from bench._common import check, percentile, tiny_registry_doc

_START_S = 180.0  # the default registry converts SmolLM2 and warms MiniLM on a cold cache
_NODELAY = [(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)]
_CLI = "import sys; from orion_fsm.cli import main; sys.exit(main())"


@contextmanager
def _serving(tmp: Path, *args: str, rules: bool = False, exit_codes: list[int] | None = None,
             serve_args: tuple[str, ...] = ()) -> Iterator[tuple[str, Path]]:
    """`orion-fsm serve` in a subprocess, as a user runs it; stopped with SIGTERM. `rules`:
    route by rules, as the in-process engines it is compared with (no embedding model)."""
    trace, log = tmp / "serve.jsonl", tmp / "serve.log"
    argv = [sys.executable, "-c", _CLI, "--cache-dir", str(tmp / "cache"), *args, "serve",
            "--port", "0", "--trace-file", str(trace), "--threads", "1",
            *(["--router", "rules"] if rules else []), *serve_args]
    with log.open("wb") as err:
        process = subprocess.Popen(argv, stderr=err, stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + _START_S
        url = None
        while url is None:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"serve did not start: {log.read_text()[-2000:]}")
            found = re.search(r"serving on (http://\S+)", log.read_text())
            url = found.group(1) if found else None
            time.sleep(0.05)
        while True:
            try:
                health = httpx.get(f"{url}/health", timeout=5)  # warm: examples embedded
                if health.status_code == 200 and health.json()["embeddings"] in ("off",
                                                                                  "ready"):
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the server never became ready")
            time.sleep(0.1)
        yield url, trace
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            code = process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
            code = process.wait(30)
        if exit_codes is not None:
            exit_codes.append(code)


def _tiny_registry(tmp: Path, max_tokens: int) -> Path:
    from orion_fsm.testing import make_tiny_llama_gguf

    model = make_tiny_llama_gguf(tmp / "tiny.gguf", n_layers=1, n_embd=32, seed=3)
    doc = tiny_registry_doc(model, max_tokens=max_tokens)
    doc["agents"][0]["context_length"] = 256
    path = tmp / "models.json"
    path.write_text(json.dumps(doc), encoding="utf-8")
    return path


def _chat(prompt: str, **extra: Any) -> dict[str, Any]:
    return {"model": "auto", "messages": [{"role": "user", "content": prompt}], **extra}


def http_overhead(quick: bool = False) -> dict[str, Any]:
    """L1 hit p50 over HTTP (keep-alive, non-streamed) and through `engine.infer` in-process,
    then first SSE byte p50 against in-process time to first streamed text (tiny model, no
    cache), each side measured in this run, one after the other."""
    from orion_fsm import Engine, Registry

    n = 200 if quick else 1000
    n_stream = 50 if quick else 200
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        registry_path = _tiny_registry(tmp, max_tokens=8)
        hit = _chat("hello", temperature=0, max_tokens=8)
        sampled = {"temperature": 0.7, "max_tokens": 8}  # sampled, unseeded: never cached
        # TCP_NODELAY: httpx writes the headers and the body apart; with Nagle on, the body
        # waits for the server's delayed ACK (40 ms on Linux). The openai client does the same.
        transport = httpx.HTTPTransport(socket_options=_NODELAY)
        with (_serving(tmp, "--registry", str(registry_path), "--log-level", "ERROR",
                       rules=True) as (url, _),
              httpx.Client(base_url=url, timeout=30, transport=transport) as http):
                assert http.post("/v1/chat/completions", json=hit).status_code == 200
                http_ms = []
                for _ in range(n):
                    t = time.perf_counter()
                    response = http.post("/v1/chat/completions", json=hit)
                    http_ms.append((time.perf_counter() - t) * 1e3)
                assert response.headers["x-orion-cache"] == "L1"
                first_byte_ms = []
                for i in range(n_stream):
                    body = _chat(f"tell me about {i}", stream=True, **sampled)
                    t = time.perf_counter()
                    with http.stream("POST", "/v1/chat/completions", json=body) as streamed:
                        first = None
                        for _ in streamed.iter_raw():
                            first = first or (time.perf_counter() - t) * 1e3
                        assert first is not None
                        first_byte_ms.append(first)

        async def in_process() -> tuple[list[float], list[float]]:
            registry = Registry.from_dict(json.loads(registry_path.read_text()))
            async with Engine(registry=registry, cache_dir=tmp / "cache", threads=1,
                              embeddings=False, trace_path=tmp / "inproc.jsonl") as engine:
                await engine.infer("hello", temperature=0, max_tokens=8)
                hits = []
                for _ in range(n):
                    t = time.perf_counter()
                    result = await engine.infer("hello", temperature=0, max_tokens=8)
                    hits.append((time.perf_counter() - t) * 1e3)
                assert result.cache == "L1"
                ttft = []
                for i in range(n_stream):
                    t = time.perf_counter()
                    async with engine.stream(f"tell me about {i}", **sampled) as stream:
                        async for _ in stream:
                            ttft.append((time.perf_counter() - t) * 1e3)
                            break
                return hits, ttft

        local_ms, local_ttft = anyio.run(in_process)
    http_p50, local_p50 = statistics.median(http_ms), statistics.median(local_ms)
    sse_p50, ttft_p50 = statistics.median(first_byte_ms), statistics.median(local_ttft)
    return {
        "requests": n, "streams": n_stream,
        "l1_http_ms": {"p50": round(http_p50, 3), "p99": round(percentile(http_ms, 0.99), 3)},
        "l1_in_process_ms": {"p50": round(local_p50, 3),
                             "p99": round(percentile(local_ms, 0.99), 3)},
        "first_sse_byte_ms": {"p50": round(sse_p50, 3),
                              "p99": round(percentile(first_byte_ms, 0.99), 3)},
        "in_process_ttft_ms": {"p50": round(ttft_p50, 3),
                               "p99": round(percentile(local_ttft, 0.99), 3)},
        "checks": [
            check("L1 hit over HTTP (ms, p50)", http_p50, "<= 3", http_p50 <= 3),
            check("HTTP overhead over in-process, L1 hit (ms, p50)", http_p50 - local_p50,
                  "<= 2", http_p50 - local_p50 <= 2),
            check("first SSE byte minus in-process TTFT (ms, p50)", sse_p50 - ttft_p50,
                  "<= 5", sse_p50 - ttft_p50 <= 5),
        ]}


def http_concurrent_streams(quick: bool = False) -> dict[str, Any]:
    """200 concurrent streaming clients on loopback (mixed prompts, 32 tokens, tiny model):
    each completes or gets 503 with Retry-After; none hangs (bounded); after SIGTERM the
    server exits 0 with one trace line per request. Twice: the default limits, then a queue
    too short for the burst (--max-in-flight 16 --max-queue 16), so 503s happen."""
    clients = 50 if quick else 200
    default = _streams(clients)
    tight = _streams(clients, "--max-in-flight", "16", "--max-queue", "16")
    checks = []
    for name, run in (("default limits", default), ("queue 16", tight)):
        checks += [
            check(f"{clients} streams, {name}: completed or 503 + Retry-After (share)",
                  (run["completed"] + run["refused_503"]) / clients, "= 1", run["clean"]),
            check(f"{clients} streams, {name}: trace lines after SIGTERM / requests",
                  run["trace_lines_after_shutdown"] / clients, "= 1",
                  run["trace_lines_after_shutdown"] == clients),
            check(f"{clients} streams, {name}: server exit code after SIGTERM",
                  run["server_exit_code"], "= 0", run["server_exit_code"] == 0),
        ]
    return {"default_limits": default, "queue_16": tight, "checks": checks}


def _streams(clients: int, *serve_args: str) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        registry_path = _tiny_registry(tmp, max_tokens=32)
        outcomes: list[dict[str, Any]] = []
        exit_codes: list[int] = []
        with _serving(tmp, "--registry", str(registry_path), "--log-level", "ERROR",
                      rules=True, exit_codes=exit_codes, serve_args=serve_args) as (url, trace):

            async def one(http: httpx.AsyncClient, i: int) -> None:
                body = _chat(f"request {i}: {'why ' * (i % 7)}tell me about number {i}",
                             stream=True, temperature=0.7, max_tokens=32)
                t = time.perf_counter()
                ttft, tokens, status, retry_after = None, 0, 0, None
                async with http.stream("POST", "/v1/chat/completions", json=body) as r:
                    status, retry_after = r.status_code, r.headers.get("retry-after")
                    async for line in r.aiter_lines():
                        if line.startswith("data: {") and ttft is None:
                            ttft = (time.perf_counter() - t) * 1e3
                        if '"usage"' in line:
                            tokens = json.loads(line[6:])["usage"]["completion_tokens"]
                outcomes.append({"status": status, "ttft_ms": ttft, "tokens": tokens,
                                 "retry_after": retry_after})

            async def main() -> float:
                limits = httpx.Limits(max_connections=clients + 10)
                async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as http:
                    t = time.perf_counter()
                    with anyio.fail_after(300):  # none hangs
                        async with anyio.create_task_group() as tg:
                            for i in range(clients):
                                tg.start_soon(one, http, i)
                    return time.perf_counter() - t

            wall_s = anyio.run(main)
        exit_lines = len(trace.read_text().splitlines()) if trace.is_file() else 0
    served = [o for o in outcomes if o["status"] == 200]
    refused = [o for o in outcomes if o["status"] == 503]
    ttfts = [o["ttft_ms"] for o in served if o["ttft_ms"] is not None]
    tokens = sum(o["tokens"] for o in served)
    return {
        "clients": clients, "completed": len(served), "refused_503": len(refused),
        "other": clients - len(served) - len(refused),
        "clean": (len(served) + len(refused) == clients
                  and all(o["retry_after"] for o in refused)),
        "ttft_ms": {"p50": round(percentile(ttfts, 0.5), 1),
                    "p99": round(percentile(ttfts, 0.99), 1)},
        "aggregate_tokens_per_s": round(tokens / wall_s, 1), "wall_s": round(wall_s, 2),
        "trace_lines_after_shutdown": exit_lines,
        "server_exit_code": exit_codes[0] if exit_codes else -1,
    }


def http_warm_routing(quick: bool = False) -> dict[str, Any]:
    """`orion-fsm run --server URL` with new prompts against a warm server (default registry:
    SmolLM2, embedding router): the routing phase as the trace records it, against one cold
    in-process `orion-fsm run` in the same run."""
    # New to every cache (L3 keeps routing decisions on disk across runs): a nonce each run.
    nonce = f"{time.time_ns() % 10**9:x}"
    prompts = [f"{p} ({nonce})" for p in (
        "How do tides work on Mars?", "Écris une fonction qui inverse une liste",
        "Is 1013 a prime number?", "What should I cook tonight with leeks?",
        "Explain the borrow checker in two sentences")][: 3 if quick else 5]
    env = {**os.environ}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        cache = str(Path(os.environ.get("ORION_FSM_CACHE", "~/.cache/orion-fsm")).expanduser())

        def run(*args: str) -> dict[str, Any]:
            done = subprocess.run([sys.executable, "-c", _CLI, "--cache-dir", cache, "run",
                                   *args, "--max-tokens", "1", "--json",
                                   "--trace-file", str(tmp / "cli.jsonl")],
                                  capture_output=True, text=True, env=env, timeout=300,
                                  check=True)
            result: dict[str, Any] = json.loads(done.stdout)
            return result

        def routing_ms(result: dict[str, Any]) -> float:
            return sum(p["ms"] for p in result["phases"] if p["state"] == "routing")

        cold = run(f"{prompts[0]} cold")
        cold_ms = routing_ms(cold)
        with _serving(tmp, "--cache-dir", cache) as (url, _):
            warm, client_s = [], []
            for prompt in prompts:
                t = time.perf_counter()
                warm.append(routing_ms(run("--server", url, prompt)))
                client_s.append(time.perf_counter() - t)
    p50 = statistics.median(warm)
    return {"prompts": len(prompts), "cold_in_process_routing_ms": round(cold_ms, 1),
            "warm_server_routing_ms": [round(ms, 2) for ms in warm],
            "warm_run_command_s_p50": round(statistics.median(client_s), 3),
            "checks": [check("run --server, new prompt: routing phase (ms, p50)", p50, "<= 50",
                             p50 <= 50)]}


BENCHMARKS = {"http_overhead": http_overhead, "http_concurrent_streams": http_concurrent_streams,
              "http_warm_routing": http_warm_routing}
