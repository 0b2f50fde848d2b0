"""`orion-fsm repl` driven through a pseudo-terminal: prompts stream, Ctrl-C cancels only the
generation, commands inspect the engine, history survives the session."""

from __future__ import annotations

import json
import os
import shlex
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pexpect
import pytest

from orion_fsm.cli import main
from orion_fsm.testing import make_tiny_llama_gguf
from tests.conftest import agent, read_trace_lines

PROMPT = r"(orion|code)> "
UP = "\x1b[A"


@pytest.fixture(scope="module")
def slow_registry(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model big enough that 2000 streamed tokens take seconds: time to press Ctrl-C."""
    root = tmp_path_factory.mktemp("repl")
    model = make_tiny_llama_gguf(root / "model" / "tiny.gguf", n_layers=4, n_embd=256, seed=3,
                                 context_length=4096)
    doc = {"version": 1, "default_agent": "conversation", "agents": [
        agent("conversation", model, context_length=4096,
              routing={"keywords": ["hello"], "patterns": [], "examples": []}),
        agent("code", model, context_length=4096, fallback="conversation",
              routing={"keywords": ["python"], "patterns": [], "examples": []}),
    ]}
    path = root / "models.json"
    path.write_text(json.dumps(doc), encoding="utf-8")
    return path


class Repl:
    def __init__(self, registry: Path, root: Path, max_tokens: int) -> None:
        self.trace = root / "trace.jsonl"
        self.cache = root / "cache"
        argv = [sys.executable, "-c", "import sys; from orion_fsm.cli import main; "
                "sys.exit(main())", "--registry", str(registry), "--cache-dir", str(self.cache),
                "repl", "--router", "rules", "--max-tokens", str(max_tokens),
                "--trace-file", str(self.trace)]
        # stderr to a file: it is not a terminal then, so no progress bars mix with the answer.
        command = f"exec {shlex.join(argv)} 2>>{shlex.quote(str(root / 'stderr.txt'))}"
        env = {**os.environ, "TERM": "dumb", "PROMPT_TOOLKIT_NO_CPR": "1"}
        self.child = pexpect.spawn("/bin/sh", ["-c", command], env=env, encoding="utf-8",
                                   timeout=30, dimensions=(40, 120))
        self.child.expect(PROMPT)

    def run(self, line: str) -> str:
        """Type `line`, return what the REPL printed before its next prompt."""
        self.child.sendline(line)
        self.child.expect(PROMPT)
        lines: list[str] = self.child.before.split("\n")
        # Drop the echo of the typed line (a busy terminal may redraw it more than once).
        while lines and lines[0].strip() == line.strip():
            lines.pop(0)
        return "\n".join(lines)

    def records(self, count: int) -> list[dict[str, Any]]:
        """The trace file's records once it holds `count`: the writer appends in the background."""
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.trace.exists() and len(records := read_trace_lines(self.trace)) >= count:
                return records
            time.sleep(0.02)
        raise AssertionError(f"{self.trace} never held {count} records")

    def quit(self, line: str = "/quit") -> int | None:
        self.child.sendline(line)
        self.child.expect(pexpect.EOF)
        self.child.close()
        status: int | None = self.child.exitstatus
        return status


@pytest.fixture
def repl(slow_registry: Path, tmp_path: Path) -> Iterator[Repl]:
    session = Repl(slow_registry, tmp_path, max_tokens=2000)
    yield session
    if session.child.isalive():
        session.child.terminate(force=True)


def test_ctrl_c_stops_the_generation_and_the_session_goes_on(repl: Repl) -> None:
    child = repl.child
    child.sendline("hello")
    child.expect(r"hello\r+\n")
    child.expect(r"[ -~]{20}")  # tokens are streaming
    child.sendintr()
    child.expect(r"\[cancelled\]")
    child.expect(PROMPT)
    (record,) = repl.records(1)
    assert record["result"]["error_reason"] == "cancelled"
    assert record["transitions"][-1]["source"] == "inferencing"  # stopped mid-generation
    assert 0 < len(record["result"]["token_ids"]) < 2000

    waterfall = repl.run("/trace")
    assert f"request {record['request_id']} · error" in waterfall
    assert "inferencing" in waterfall and "| abort" in waterfall
    assert "error (cancelled): the caller cancelled the request" in waterfall
    assert repl.run("/replay").startswith(f"PASS {record['request_id']} validating")
    assert "requests: 1 (1 cancelled)" in repl.run("/stats")
    assert repl.quit() == 0


def test_commands_look_into_the_engine(slow_registry: Path, tmp_path: Path) -> None:
    repl = Repl(slow_registry, tmp_path, max_tokens=6)
    assert "/replay" in repl.run("/help")
    agents = repl.run("/agents")
    assert "conversation" in agents and "code" in agents and "→ conversation" in agents
    assert "prompts now go to code" in repl.run("/agent code")
    assert repl.child.after == "code> "
    assert "* code" in repl.run("/agents")
    answer = repl.run("write it in python")
    assert "── success · code · 6 tokens" in answer
    assert "unknown agent 'nope'; known agents: conversation, code" in repl.run("/agent nope")
    assert "prompts are routed again" in repl.run("/agent auto")
    assert "requests: 1 (1 success)" in repl.run("/stats")
    cache = repl.run("/cache").splitlines()
    assert cache[0].split()[:3] == ["level", "hits", "misses"]
    assert "pressure" in repl.run("/mem")
    breakers = repl.run("/breakers")
    assert "closed" in breakers and "code" in breakers
    assert "unknown command /nope; /help lists them" in repl.run("/nope")
    assert repl.quit() == 0


def test_history_survives_the_session(slow_registry: Path, tmp_path: Path) -> None:
    first = Repl(slow_registry, tmp_path, max_tokens=4)
    assert "── success · conversation" in first.run("hello there")
    assert first.quit() == 0
    second = Repl(slow_registry, tmp_path, max_tokens=4)
    # Back past "/quit" to the previous session's prompt: Enter sends it again.
    second.child.send(UP + UP)
    answer = second.run("")
    assert "── success · conversation · L1" in answer  # the same request, served from L1
    assert second.quit("\x04") == 0  # Ctrl-D leaves too
    sent = [r["request"]["messages"][0]["content"] for r in second.records(2)]
    assert sent == ["hello there", "hello there"]


def test_history_is_private_and_keeps_no_secret(slow_registry: Path, tmp_path: Path) -> None:
    repl = Repl(slow_registry, tmp_path, max_tokens=2)
    assert "── success" in repl.run("my password is Hunter2024! and hello")
    assert repl.quit() == 0
    history = repl.cache / "repl-history"
    assert history.stat().st_mode & 0o777 == 0o600
    text = history.read_text(encoding="utf-8")
    assert "Hunter2024!" not in text and "[REDACTED:spoken_secret]" in text


def test_context_command_answers_from_a_store_with_citations(slow_registry: Path,
                                                             tmp_path: Path) -> None:
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "fuel.md").write_text("# Fuel\n\nThe lamp burns paraffin for eleven hours.\n",
                                  encoding="utf-8")
    assert main(["--registry", str(slow_registry), "--cache-dir", str(tmp_path / "cache"),
                 "context", "add", str(docs), "--store", "lh", "--lexical-only"]) == 0
    repl = Repl(slow_registry, tmp_path, max_tokens=4)
    assert "no context store" in repl.run("/context")
    assert "no context store named 'nope'" in repl.run("/context nope")
    assert "prompts now retrieve from lh (1 documents" in repl.run("/context lh")
    answer = repl.run("how long does the paraffin burn")
    assert "[1] lh: docs/fuel.md #0" in answer
    assert "no longer retrieve" in repl.run("/context off")
    assert repl.quit() == 0


def test_good_bad_and_fix_rate_the_last_answer(slow_registry: Path, tmp_path: Path) -> None:
    from orion_fsm import FeedbackStore, default_feedback_path

    repl = Repl(slow_registry, tmp_path, max_tokens=4)
    assert "no answer to rate yet" in repl.run("/good")
    assert "── success · conversation" in repl.run("hello there")
    (first,) = repl.records(1)
    assert f"rated good (request {first['request_id']})" in repl.run("/good")
    assert "── success" in repl.run("hello again")
    second = repl.records(2)[1]
    assert "rated bad" in repl.run("/bad")
    assert "/fix TEXT" in repl.run("/fix")
    assert "correction kept" in repl.run("/fix Hello! How can I help?")
    assert repl.quit() == 0
    records = {r.request_id: r for r in FeedbackStore(default_feedback_path()).records()}
    assert records[first["request_id"]].score == 5
    assert records[first["request_id"]].trace_id == first["trace_id"]
    assert records[second["request_id"]].correction == "Hello! How can I help?"
    assert records[second["request_id"]].history[0] == ("user", "hello there")


def test_memory_command_starts_a_conversation_with_session_memory(slow_registry: Path,
                                                                   tmp_path: Path) -> None:
    repl = Repl(slow_registry, tmp_path, max_tokens=2)
    assert "no session memory" in repl.run("/memory")
    assert "memory policy" in repl.run("/memory forgetful")
    assert "summarised (aggressive)" in repl.run("/memory aggressive")
    assert "── success" in repl.run("hello there")
    assert "session memory: aggressive, 0 turns summarised" in repl.run("/memory")
    assert "without session memory" in repl.run("/memory off")
    assert repl.quit() == 0
