"""`orion-fsm repl --server URL`: the session's prompts and slash commands against a live
server (uvicorn in a thread), read back as the user sees them."""

from __future__ import annotations

import argparse
import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from orion_fsm.cli._remote import connect
from orion_fsm.cli._repl import _HELP, _footer
from orion_fsm.cli._repl_remote import RemoteSession
from tests.http.conftest import Live

pytestmark = [pytest.mark.anyio, pytest.mark.parametrize("anyio_backend", ["asyncio"])]


async def test_a_remote_session_streams_answers_and_reads_the_server(
        live: Live, registry_doc: dict[str, Any], write_registry: Callable[..., Path]) -> None:
    args = argparse.Namespace(server=live.url, api_key=None, agent=None, max_tokens=3,
                              temperature=None, cache_dir=None,
                              registry=str(write_registry(registry_doc)))
    out = io.StringIO()
    async with connect(args) as server:
        session = RemoteSession(server, args, out, help_text=_HELP, footer=_footer)
        lines = ["hello", "/agent code", "write it", "/agent nobody", "/agents", "/stats",
                 "/cache", "/mem", "/breakers", "/trace", "/replay"]
        for line in lines:
            assert await session.handle(line)
        assert not await session.handle("/quit")
    shown = out.getvalue()
    assert [r.agent for r in session.results] == ["conversation", "code"]
    assert "── success · conversation" in shown and "── success · code" in shown
    assert "unknown agent 'nobody'" in shown
    assert "* code" in shown  # /agents marks the chosen one
    assert "requests: 2 (2 success)" in shown and "server loader: 2 loads" in shown
    assert "inferencing" in shown  # /trace's waterfall of the last request
    assert "PASS" in shown  # /replay of it, from the server's trace line


async def test_a_remote_session_rates_the_last_answer_on_the_server(
        live: Live, registry_doc: dict[str, Any], write_registry: Callable[..., Path]) -> None:
    from orion_fsm import FeedbackStore, default_feedback_path

    args = argparse.Namespace(server=live.url, api_key=None, agent="conversation",
                              max_tokens=3, temperature=None, cache_dir=None,
                              registry=str(write_registry(registry_doc)))
    out = io.StringIO()
    async with connect(args) as server:
        session = RemoteSession(server, args, out, help_text=_HELP, footer=_footer)
        for line in ["/good", "hello", "/fix Hello there!"]:
            assert await session.handle(line)
    shown = out.getvalue()
    assert "no answer to rate yet" in shown and "correction kept" in shown
    (record,) = FeedbackStore(default_feedback_path()).records()
    assert record.request_id == session.results[0].request_id
    assert record.correction == "Hello there!" and record.input == "hello"


async def test_a_remote_session_sends_schema_and_context_to_the_server(
        live: Live, registry_doc: dict[str, Any], write_registry: Callable[..., Path]) -> None:
    args = argparse.Namespace(server=live.url, api_key=None, agent="long", max_tokens=200,
                              temperature=None, cache_dir=None,
                              registry=str(write_registry(registry_doc)))
    out = io.StringIO()
    async with connect(args) as server:
        session = RemoteSession(server, args, out, help_text=_HELP, footer=_footer)
        for line in ["/schema json", "hello", "/schema off", "/context nope", "hello"]:
            assert await session.handle(line)
    shown = out.getvalue()
    (answered,) = session.results[:1]
    assert isinstance(answered.parsed, dict)  # the server enforced the format
    assert "prompts now retrieve from nope on the server" in shown
    assert "no context store named 'nope'" in shown  # the server checked the name
