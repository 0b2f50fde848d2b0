"""Shared fixtures: tiny real GGUF models made at test time, registries and engines over them."""

from __future__ import annotations

import json
import os
import sys
import threading
import traceback
from collections.abc import Callable, Collection, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from orion_fsm import Engine, Registry
from orion_fsm.testing import make_tiny_llama_gguf


@pytest.fixture(autouse=True)
def state_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Tests never write into the user's state folder (default trace files go there)."""
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    monkeypatch.delenv("ORION_FSM_TRACE_FILE", raising=False)
    monkeypatch.delenv("ORION_FSM_FEEDBACK_FILE", raising=False)
    return tmp_path / "state"


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two real llama-architecture models with random weights, of different sizes."""
    root = tmp_path_factory.mktemp("tiny-models")
    return {
        "small": make_tiny_llama_gguf(root / "small" / "tiny-small.gguf", n_layers=2, n_embd=32,
                                      seed=1),
        "medium": make_tiny_llama_gguf(root / "medium" / "tiny-medium.gguf", n_layers=3,
                                       n_embd=64, seed=2),
    }


def agent(agent_id: str, path: Path | str, *, fallback: str | None = None,
          context_length: int = 256, **extra: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "id": agent_id,
        "role": agent_id,
        "description": f"test agent {agent_id}",
        "capabilities": ["chat"],
        "model": {"path": str(path)},
        "format": "gguf",
        "model_type": "llama",
        "chat_template": "chatml",
        "system_prompt": f"You are the {agent_id} agent.",
        "context_length": context_length,
        "generation": {"max_tokens": 8, "temperature": 0, "top_k": 1},
        "ram_estimate_mb": 5,
        "fallback": fallback,
        "routing": {"keywords": [], "patterns": [], "examples": []},
    }
    doc.update(extra)
    return doc


@pytest.fixture
def registry_doc(tiny_models: dict[str, Path], tmp_path: Path) -> dict[str, Any]:
    return {
        "version": 1,
        "default_agent": "conversation",
        "agents": [
            agent("conversation", tiny_models["small"],
                  routing={"keywords": ["hello", "bonjour"], "patterns": [], "examples": []}),
            agent("code", tiny_models["medium"], fallback="conversation",
                  routing={"keywords": ["python", "function"], "patterns": [r"\bdef\b"],
                           "examples": []}),
            agent("broken", tmp_path / "missing.gguf", fallback="conversation"),
            agent("short", tiny_models["small"], context_length=64),
            agent("long", tiny_models["small"], context_length=4096),
        ],
    }


@pytest.fixture
def write_registry(tmp_path: Path) -> Callable[[dict[str, Any]], Path]:
    def write(doc: dict[str, Any]) -> Path:
        path = tmp_path / "models.json"
        path.write_text(json.dumps(doc), encoding="utf-8")
        return path

    return write


@pytest.fixture
def spans() -> Iterator[tuple[TracerProvider, InMemorySpanExporter]]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield provider, exporter
    provider.shutdown()


@pytest.fixture
def make_engine(
    registry_doc: dict[str, Any], tmp_path: Path,
    spans: tuple[TracerProvider, InMemorySpanExporter],
) -> Callable[..., Engine]:
    def make(doc: dict[str, Any] | None = None, **kwargs: Any) -> Engine:
        kwargs.setdefault("trace_path", tmp_path / "traces" / "test.jsonl")
        kwargs.setdefault("cache_dir", tmp_path / "cache")
        kwargs.setdefault("threads", 1)  # tiny models: one thread is faster and steadier
        kwargs.setdefault("embeddings", False)  # rule routing: no 7 s embedding model load
        # A chunk per token, whatever the machine's speed: tests count and cut chunks.
        kwargs.setdefault("stream_interval_ms", 0.0)
        kwargs.setdefault("tracer_provider", spans[0])
        return Engine(registry=Registry.from_dict(doc or registry_doc), **kwargs)

    return make


def read_trace_lines(path: Path) -> list[dict[str, Any]]:
    # Split on "\n" only: str.splitlines() also breaks at U+2028, \x1c... that JSON keeps raw.
    return [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n") if line]


# The async libraries keep idle worker threads for later `to_thread` calls (anyio ~10 s, trio
# ~10 s): those are not ours to stop. Any other new thread, or one still running our code, is.
_POOL_THREAD_NAMES = ("AnyIO worker thread", "Trio thread ")


def leaked_threads(before: Collection[threading.Thread]) -> list[str]:
    """Threads started since `before` that are not idle workers of the async library's pool
    (a generation still running, or a thread something of ours started), with where they are."""
    frames = sys._current_frames()
    leaked = []
    for thread in threading.enumerate():
        if thread in before or thread.ident is None or thread.ident not in frames:
            continue
        ours = [f"{Path(f.filename).name}:{f.lineno}"
                for f in traceback.extract_stack(frames[thread.ident])
                if f"{os.sep}orion_fsm{os.sep}" in f.filename]
        if ours or not thread.name.startswith(_POOL_THREAD_NAMES):
            leaked.append(f"{thread.name} at {ours}")
    return leaked


async def assert_no_thread_leaked(before: Collection[threading.Thread],
                                  within_s: float = 2.0) -> None:
    """Give stopped generations `within_s` to notice and return, then expect none left."""
    # Polled: a thread's end is no event an async task can wait on.
    for _ in range(int(within_s / 0.01)):
        if not leaked_threads(before):
            break
        await anyio.sleep(0.01)
    assert leaked_threads(before) == []
