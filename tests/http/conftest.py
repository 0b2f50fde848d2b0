"""A real uvicorn server on 127.0.0.1 (a free port) in a thread, started and stopped by the
fixture within bounds, over an engine made by `make_engine`; and the app in-process."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from starlette.applications import Starlette

from orion_fsm import Engine
from orion_fsm.http import bind, create_app, url_of
from tests.conftest import read_trace_lines

_START_S = 60.0  # a cold machine converts the tiny models and opens the caches first
_STOP_S = 30.0


@dataclass(frozen=True)
class Live:
    url: str
    trace_path: Path
    app: Starlette

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"


@contextmanager
def serving(app: Starlette, trace_path: Path) -> Iterator[Live]:
    sock = bind("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(app, lifespan="on", log_config=None,
                                           access_log=False, timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]},
                              name="uvicorn-test", daemon=True)
    thread.start()
    deadline = time.monotonic() + _START_S
    while not server.started:
        assert thread.is_alive(), "the server thread ended during start-up"
        assert time.monotonic() < deadline, "the server did not start"
        time.sleep(0.01)
    try:
        yield Live(url_of(sock), trace_path, app)
    finally:
        server.should_exit = True
        thread.join(_STOP_S)
        sock.close()
        assert not thread.is_alive(), "the server did not stop"


MakeServer = Callable[..., Any]


@pytest.fixture
def make_server(make_engine: Callable[..., Engine], tmp_path: Path) -> Iterator[MakeServer]:
    """`with make_server(api_key=..., **engine_kwargs) as live:` a fresh server per call."""

    @contextmanager
    def make(*, api_key: str | None = None, max_body_bytes: int = 1 << 20,
             **engine_kwargs: Any) -> Iterator[Live]:
        trace_path = engine_kwargs.setdefault("trace_path", tmp_path / "traces" / "http.jsonl")
        app = create_app(lambda meter_provider: make_engine(meter_provider=meter_provider,
                                                            **engine_kwargs),
                         api_key=api_key, max_body_bytes=max_body_bytes)
        with serving(app, trace_path) as live:
            yield live

    yield make


@pytest.fixture
def live(make_server: MakeServer) -> Iterator[Live]:
    with make_server() as server:
        yield server


def wait_for_trace(path: Path, request_id: str, within_s: float = 10.0) -> dict[str, Any]:
    """The trace line of `request_id` (the writer appends in the background)."""
    import json

    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if path.is_file():
            for line in path.read_text(encoding="utf-8").splitlines():
                record = json.loads(line)
                if record["request_id"] == request_id:
                    return dict(record)
        time.sleep(0.02)
    raise AssertionError(f"no trace line for request {request_id} in {path}")


def wait_for_lines(path: Path, count: int, within_s: float = 10.0) -> list[dict[str, Any]]:
    """The trace file once it holds `count` lines (the writer appends in the background)."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if path.is_file() and len(records := read_trace_lines(path)) >= count:
            return records
        time.sleep(0.02)
    raise AssertionError(f"fewer than {count} trace lines in {path}")


def sse_events(lines: list[str]) -> list[Any]:
    """`data:` payloads of a Server-Sent Events body, `[DONE]` kept as the string."""
    import json

    return [line[6:] if line == "data: [DONE]" else json.loads(line[6:])
            for line in lines if line.startswith("data: ")]


def client(live: Live, **kwargs: Any) -> httpx.Client:
    return httpx.Client(base_url=live.url, timeout=60, **kwargs)
