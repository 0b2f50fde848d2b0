"""`orion-fsm serve` as a subprocess: the CLI's `--server` mode against it, the bind policy,
and SIGTERM draining in-flight streams (each ends finished or cancelled, with its trace line).
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from orion_fsm.cli import main
from tests.conftest import read_trace_lines
from tests.http.conftest import sse_events

WriteRegistry = Callable[[dict[str, Any]], Path]
_START_S = 90.0


@contextmanager
def serve(registry: Path, tmp_path: Path, *extra: str
          ) -> Iterator[tuple[str, subprocess.Popen[bytes], Path]]:
    trace = tmp_path / "serve.jsonl"
    log = tmp_path / "serve.log"
    argv = [sys.executable, "-c", "import sys; from orion_fsm.cli import main; sys.exit(main())",
            "--registry", str(registry), "--cache-dir", str(tmp_path / "cache"), "serve",
            "--port", "0", "--router", "rules", "--threads", "1", "--trace-file", str(trace),
            *extra]
    with log.open("wb") as err:
        process = subprocess.Popen(argv, stderr=err, stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + _START_S
        url = None
        while url is None:
            assert process.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "serve printed no URL"
            found = re.search(r"serving on (http://\S+)", log.read_text())
            url = found.group(1) if found else None
            time.sleep(0.05)
        while True:  # ready once the engine is
            try:
                if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server never became ready"
            time.sleep(0.05)
        yield url, process, trace
    finally:
        if process.poll() is None:  # SIGTERM: the trace writer drains before the exit
            process.terminate()
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(30)


def test_cli_commands_ask_the_running_server(
        registry_doc: dict[str, Any], write_registry: WriteRegistry, tmp_path: Path,
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    registry = write_registry(registry_doc)
    with serve(registry, tmp_path) as (url, process, trace):
        assert main(["run", "--server", url, "hello", "--max-tokens", "3", "--json"]) == 0
        ran = json.loads(capsys.readouterr().out)
        monkeypatch.setenv("ORION_FSM_SERVER", url)  # as --server
        assert main(["run", "write a python function", "--max-tokens", "3"]) == 0
        streamed = capsys.readouterr().out
        assert main(["route", "def main(): pass", "--json"]) == 0
        routed = json.loads(capsys.readouterr().out)
        assert main(["mem", "--once", "--json"]) == 0
        memory = json.loads(capsys.readouterr().out)
        assert main(["breakers", "--json"]) == 0
        breakers = json.loads(capsys.readouterr().out)
        assert main(["cache", "stats", "--json"]) == 0
        caches = json.loads(capsys.readouterr().out)
        assert main(["run", "hello", "--agent", "nobody"]) == 1
        refused = capsys.readouterr().err
        # Output formats and context stores go to the server too, not dropped on the way.
        assert main(["run", "hello", "--agent", "long", "--regex", "[a-z]{3}",
                     "--max-tokens", "8", "--json"]) == 0
        formatted = json.loads(capsys.readouterr().out)
        assert main(["run", "hello", "--context", "nope"]) == 1
        no_store = capsys.readouterr().err
        process.terminate()
        assert process.wait(60) == 0
    assert ran["state"] == "success" and ran["agent"] == "conversation"
    assert [p["state"] for p in ran["phases"]][:2] == ["validating", "routing"]
    assert "agent code" in streamed and "inferencing" in streamed
    assert routed["agent"] == "code"
    assert [m["model"] for m in memory["models"]]  # the server's loaded models
    (serving,) = [b for b in breakers["breakers"].values() if "conversation" in b["agents"]]
    assert serving["state"] == "closed"
    assert set(caches["levels"]) == {"l1", "l2", "l3"}
    assert "error (invalid)" in refused and "unknown agent 'nobody'" in refused
    assert re.fullmatch("[a-z]{3}", formatted["text"])
    assert "no context store named 'nope'" in no_store
    records = read_trace_lines(trace)
    assert ran["trace_id"] in {r["trace_id"] for r in records}
    assert len(records) == 5  # one line per request that came over HTTP


def test_a_server_nobody_runs_is_one_line_and_exit_2(capsys: pytest.CaptureFixture[str]
                                                     ) -> None:
    assert main(["run", "--server", "http://127.0.0.1:9", "hello"]) == 2
    assert "cannot reach the server at http://127.0.0.1:9" in capsys.readouterr().err


def test_serve_refuses_a_network_address_without_a_key(
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ORION_FSM_API_KEY", raising=False)
    assert main(["serve", "--host", "0.0.0.0", "--port", "0"]) == 2
    assert "--allow-insecure-bind" in capsys.readouterr().err


def test_sigterm_drains_in_flight_streams_each_with_its_trace_line(
        registry_doc: dict[str, Any], write_registry: WriteRegistry, tmp_path: Path) -> None:
    registry = write_registry(registry_doc)
    with serve(registry, tmp_path, "--grace", "1") as (url, process, trace):
        first_bytes = threading.Barrier(3, timeout=60)
        streams: list[dict[str, Any]] = []

        def stream() -> None:
            body = {"model": "long", "messages": [{"role": "user", "content": "hello"}],
                    "max_tokens": 3000, "stream": True, "temperature": 1.0, "seed": 1}
            lines: list[str] = []
            try:
                with httpx.stream("POST", f"{url}/v1/chat/completions", json=body,
                                  timeout=60) as response:
                    request_id = response.headers["x-orion-request-id"]
                    for line in response.iter_lines():
                        if not lines:
                            first_bytes.wait()
                        lines.append(line)
            except httpx.HTTPError:
                pass  # the server may close a cancelled stream before its last chunk
            streams.append({"request_id": request_id, "events": sse_events(lines)})

        threads = [threading.Thread(target=stream) for _ in range(2)]
        for thread in threads:
            thread.start()
        first_bytes.wait()
        process.send_signal(signal.SIGTERM)
        code = process.wait(60)
        for thread in threads:
            thread.join(60)
    assert code == 0
    records = {r["request_id"]: r for r in read_trace_lines(trace)}
    assert len(streams) == 2
    for sent in streams:
        result = records[sent["request_id"]]["result"]  # written before the process ended
        assert (result["state"], result["error_reason"]) in {("success", None),
                                                              ("error", "cancelled")}
        if result["state"] == "success":
            assert sent["events"][-1] == "[DONE]"


@pytest.mark.parametrize(("argv", "window_s"), [((), 0.05), (("--batch-window-ms", "0"), 0.0)])
def test_serve_passes_the_batch_window_to_its_engine(
        monkeypatch: pytest.MonkeyPatch, write_registry: WriteRegistry,
        registry_doc: dict[str, Any], argv: tuple[str, ...], window_s: float) -> None:
    import socket

    import orion_fsm.http

    built: list[Any] = []

    def create_app(engine: Callable[[Any], Any], **_: Any) -> None:
        built.append(engine(None))  # the Engine `serve` would run, built and not entered

    monkeypatch.setattr(orion_fsm.http, "create_app", create_app)
    sock = socket.socket()
    monkeypatch.setattr(orion_fsm.http, "bind", lambda host, port: sock)
    monkeypatch.setattr(orion_fsm.http, "url_of", lambda sock: "http://127.0.0.1:0")
    monkeypatch.setattr(orion_fsm.http, "run_server", lambda *a, **k: None)
    registry = write_registry(registry_doc)
    with sock:
        assert main(["--registry", str(registry), "serve", "--port", "0", *argv]) in (0, None)
    (engine,) = built
    assert engine.embeddings.window_s == window_s
