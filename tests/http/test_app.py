"""The ASGI app in-process (httpx.ASGITransport, lifespan entered by hand) under asyncio and
trio: the endpoints, their trace lines, /metrics parsed with Prometheus's own text parser.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from orion_fsm import ConfigurationError, Engine, Registry
from orion_fsm.http import check_bind, create_app
from orion_fsm.replay import replay
from tests.conftest import read_trace_lines
from tests.http.conftest import sse_events

pytestmark = pytest.mark.anyio
HELLO = [{"role": "user", "content": "hello"}]


@asynccontextmanager
async def in_process(make_engine: Callable[..., Engine], **kwargs: object
                     ) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(lambda meter_provider: make_engine(meter_provider=meter_provider, **kwargs))
    async with app.router.lifespan_context(app), httpx.AsyncClient(
            transport=httpx.ASGITransport(app), base_url="http://orion") as http:
        yield http


async def test_chat_stream_and_errors_in_process_leave_one_trace_line_each(
        make_engine: Callable[..., Engine], tmp_path: Path) -> None:
    async with in_process(make_engine) as http:
        plain = await http.post("/v1/chat/completions", json={
            "model": "conversation", "messages": HELLO, "max_tokens": 3})
        streamed = await http.post("/v1/completions", json={
            "model": "auto", "prompt": "hello", "max_tokens": 3, "stream": True})
        unknown = await http.post("/v1/chat/completions", json={
            "model": "nope", "messages": HELLO})
        not_json = await http.post("/v1/chat/completions", content=b"{")
        parts = await http.post("/v1/chat/completions", json={
            "model": "auto", "messages": [{"role": "user", "content": [
                {"type": "text", "text": "hel"}, {"type": "text", "text": "lo"}]}],
            "max_tokens": 3})
    assert plain.status_code == 200 and plain.json()["choices"][0]["message"]["content"]
    events = sse_events(streamed.text.splitlines())
    assert events[-1] == "[DONE]" and events[-2]["object"] == "text_completion"
    assert unknown.status_code == 404 and unknown.json()["error"]["param"] == "model"
    assert not_json.status_code == 400 and "JSON" in not_json.json()["error"]["message"]
    assert parts.json()["orion"]["agent"] == "conversation"
    records = read_trace_lines(tmp_path / "traces" / "test.jsonl")
    # The malformed body never reached the engine; every other request has its line.
    assert [r["result"]["state"] for r in records] == ["success", "success", "error",
                                                       "success"]
    assert records[0]["request_id"] == plain.headers["x-orion-request-id"]


async def test_requests_that_came_over_http_replay_from_their_trace_lines(
        make_engine: Callable[..., Engine], registry_doc: dict[str, object],
        tmp_path: Path) -> None:
    async with in_process(make_engine) as http:
        await http.post("/v1/chat/completions", json={
            "model": "auto", "messages": [{"role": "user", "content": "a python function"}],
            "max_tokens": 4, "seed": 3, "temperature": 0.9, "stream": True})
        await http.post("/v1/completions", json={"model": "code", "prompt": "hello",
                                                  "max_tokens": 3})
    records = read_trace_lines(tmp_path / "traces" / "test.jsonl")
    assert [r["result"]["agent"] for r in records] == ["code", "code"]
    for record in records:
        report = await replay(record, registry=Registry.from_dict(registry_doc))
        assert report.ok, report.first


async def test_metrics_expose_requests_ttft_phases_tokens_caches_breakers_and_memory(
        make_engine: Callable[..., Engine]) -> None:
    async with in_process(make_engine) as http:
        for _ in range(2):  # a miss, then an L1 hit
            await http.post("/v1/chat/completions", json={
                "model": "conversation", "messages": HELLO, "max_tokens": 3})
        await http.post("/v1/chat/completions", json={
            "model": "conversation", "messages": HELLO, "max_tokens": -1})
        text = (await http.get("/metrics")).text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    requests = {(s.labels["orion_final_state"], s.labels["orion_error_reason"],
                 s.labels["cache_level"]): s.value
                for s in families["orion_requests"].samples if s.name.endswith("_total")}
    assert requests == {("success", "", ""): 1.0, ("success", "", "L1"): 1.0,
                        ("error", "invalid", ""): 1.0}
    ttft = families["gen_ai_server_time_to_first_token_seconds"]
    assert ttft.type == "histogram"
    assert [s.value for s in ttft.samples if s.name.endswith("_count")] == [1.0]
    phases = {s.labels["orion_phase"] for s in families["orion_phase_duration_seconds"].samples}
    assert {"validating", "routing", "loading_agent", "inferencing"} <= phases
    tokens = {(s.labels["orion_agent"], s.labels["gen_ai_token_type"]): s.value
              for s in families["orion_tokens"].samples if s.name.endswith("_total")}
    assert tokens[("conversation", "output")] == 6.0 and tokens[("conversation", "input")] > 0
    assert any(s.value >= 1 for s in families["orion_cache_hits"].samples)
    # One breaker per model instance (agents on one model share it), labelled by its key.
    keys = {s.labels["orion_breaker_key"] for s in families["orion_breaker_state"].samples}
    assert len(keys) >= 2 and all("@" in key for key in keys)
    for name in ("orion_memory_pressure", "orion_models_loaded", "orion_admission_queued",
                 "orion_admission_in_flight", "gen_ai_server_request_duration_seconds"):
        assert name in families, name


async def test_health_is_503_until_the_engine_runs(make_engine: Callable[..., Engine]) -> None:
    app = create_app(lambda meter_provider: make_engine(meter_provider=meter_provider))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app),
                                 base_url="http://orion") as http:
        before = await http.get("/health")
        async with app.router.lifespan_context(app):
            during = await http.get("/health")
    assert before.status_code == 503 and before.json()["status"] == "starting"
    assert during.status_code == 200 and during.json()["status"] == "ready"


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.10", "::"])
def test_a_network_address_needs_a_key_or_an_explicit_flag(host: str) -> None:
    with pytest.raises(ConfigurationError, match="--allow-insecure-bind"):
        check_bind(host, None, allow_insecure=False)
    check_bind(host, "key", allow_insecure=False)
    check_bind(host, None, allow_insecure=True)
    check_bind("127.0.0.1", None, allow_insecure=False)
    check_bind("::1", None, allow_insecure=False)
