"""The server as clients nobody here wrote see it: the official `openai` package (sync, async,
streaming; chat, completions, models, error types) and raw httpx SSE parsing, against a real
uvicorn server on loopback. Each request leaves one trace line, as in-process.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.http.conftest import (
    Live,
    MakeServer,
    client,
    sse_events,
    wait_for_lines,
    wait_for_trace,
)

HELLO = [{"role": "user", "content": "hello"}]


def _openai(live: Live, **kwargs: Any) -> openai.OpenAI:
    kwargs.setdefault("api_key", "unused")
    return openai.OpenAI(base_url=live.base_url, max_retries=0, timeout=60, **kwargs)


def test_chat_completion_with_the_openai_client_matches_its_trace_line(live: Live) -> None:
    with _openai(live) as api:
        raw = api.chat.completions.with_raw_response.create(
            model="conversation", messages=HELLO, max_tokens=4)  # type: ignore[arg-type]
        completion = raw.parse()
    assert completion.object == "chat.completion"
    assert completion.model == "conversation"
    choice = completion.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason in ("stop", "length")
    assert completion.usage is not None and 0 < completion.usage.completion_tokens <= 4
    record = wait_for_trace(live.trace_path, raw.headers["x-orion-request-id"])
    assert record["trace_id"] == raw.headers["x-orion-trace-id"]
    assert record["result"]["text"] == choice.message.content
    assert record["result"]["tokens"]["output"] == completion.usage.completion_tokens
    assert raw.headers["x-orion-agent"] == "conversation"
    assert raw.headers["x-orion-cache"] in ("miss", "L1")
    timing = [part.split(";")[0] for part in raw.headers["server-timing"].split(", ")]
    assert timing[:2] == ["validating", "routing"]
    extras = completion.model_extra or {}
    assert extras["orion"]["request_id"] == record["request_id"]


def test_auto_lets_the_router_pick_the_agent(live: Live) -> None:
    with _openai(live) as api:
        completion = api.chat.completions.create(
            model="auto", messages=[{"role": "user", "content": "write a python function"}],
            max_tokens=2)
    assert completion.model == "code"  # the rule router's keywords


def test_streamed_chat_with_the_openai_client_ends_with_usage(live: Live) -> None:
    with _openai(live) as api:
        chunks = list(api.chat.completions.create(
            model="conversation", messages=HELLO, max_tokens=5, stream=True, seed=7,
            temperature=0.8))
    assert chunks and all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    last = chunks[-1]
    assert last.choices[0].finish_reason in ("stop", "length")
    assert last.usage is not None and last.usage.completion_tokens > 0
    extras = last.model_extra or {}
    record = wait_for_trace(live.trace_path, extras["orion"]["request_id"])
    assert record["result"]["text"] == text and record["streaming"] is True


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # the openai client runs on asyncio
async def test_async_client_chat_completions_and_streamed_completions(live: Live) -> None:
    async with openai.AsyncOpenAI(base_url=live.base_url, api_key="x", max_retries=0,
                                  timeout=60) as api:
        chat = await api.chat.completions.create(model="code", messages=HELLO, max_tokens=3)
        text = await api.completions.create(model="conversation", prompt="Once upon",
                                            max_tokens=3)
        stream = await api.completions.create(model="conversation", prompt="Once upon",
                                              max_tokens=3, stream=True)
        parts = [chunk async for chunk in stream]
    assert chat.model == "code" and chat.choices[0].message.content is not None
    assert text.object == "text_completion" and text.choices[0].text is not None
    assert parts[-1].choices[0].finish_reason in ("stop", "length")
    assert "".join(p.choices[0].text for p in parts) == text.choices[0].text  # greedy


def test_models_lists_the_agents_and_auto(live: Live) -> None:
    with _openai(live) as api:
        ids = [m.id for m in api.models.list()]
        one = api.models.retrieve("code")
        with pytest.raises(openai.NotFoundError):
            api.models.retrieve("nobody")
    assert ids[0] == "auto" and {"conversation", "code", "broken"} <= set(ids)
    assert "all-MiniLM-L6-v2" not in ids  # this engine routes by rules: no embeddings
    assert one.id == "code" and one.owned_by == "orion-fsm"


def test_models_lists_virtual_agents_with_their_members(
        make_server: MakeServer, registry_doc: dict[str, Any]) -> None:
    duo = {"id": "duo", "description": "code then an explanation",
           "members": [{"agent": "code", "role": "solution", "weight": 0.7},
                       {"agent": "conversation", "role": "explanation", "weight": 0.3}]}
    with make_server(doc={**registry_doc, "virtual_agents": [duo]}) as live, \
            _openai(live) as api:
        ids = [m.id for m in api.models.list()]
        listed = api.models.retrieve("duo")
        # What the listing offers can be asked for by that name.
        chat = api.chat.completions.create(model="duo", messages=HELLO, max_tokens=2)
    assert "duo" in ids and {"code", "conversation"} <= set(ids)
    orion = (listed.model_extra or {})["orion"]
    assert orion["role"] == "virtual" and orion["description"] == duo["description"]
    assert orion["members"] == [{"agent": "code", "role": "solution", "weight": 0.7},
                                {"agent": "conversation", "role": "explanation",
                                 "weight": 0.3}]
    assert orion["fusion"] == "sections" and orion["context_length"] > 0
    assert chat.model == "duo"


def test_errors_have_openai_types_statuses_and_the_field(live: Live) -> None:
    with _openai(live) as api:
        with pytest.raises(openai.NotFoundError) as missing:
            api.chat.completions.create(model="gpt-4o", messages=HELLO)
        with pytest.raises(openai.BadRequestError) as bad:
            api.chat.completions.create(model="auto", messages=HELLO, temperature=9)
        with pytest.raises(openai.BadRequestError) as streamed_bad:
            api.chat.completions.create(model="auto", messages=HELLO, max_tokens=0,
                                        stream=True)
        with pytest.raises(openai.BadRequestError) as no_messages:
            api.chat.completions.create(model="auto", messages=[])
    assert missing.value.status_code == 404 and missing.value.code == "model_not_found"
    assert missing.value.param == "model" and "gpt-4o" in missing.value.message
    assert bad.value.status_code == 400 and bad.value.param == "temperature"
    assert streamed_bad.value.param == "max_tokens"
    assert no_messages.value.param == "messages"
    # Refused by the engine, each with its trace line ending invalid.
    reasons = [r["result"]["error_reason"] for r in wait_for_lines(live.trace_path, 3)]
    assert reasons == ["invalid"] * 3


def test_a_full_queue_answers_503_with_retry_after(make_server: MakeServer) -> None:
    with make_server(max_in_flight=1, max_queue=0, caches=False) as live:
        started = threading.Event()
        done: list[int] = []

        def long_stream() -> None:
            with client(live) as http, http.stream("POST", "/v1/chat/completions", json={
                    "model": "long", "messages": HELLO, "max_tokens": 3000,
                    "stream": True}) as response:
                for _ in response.iter_lines():
                    started.set()
                done.append(response.status_code)

        thread = threading.Thread(target=long_stream)
        thread.start()
        try:
            assert started.wait(60)
            with _openai(live) as api, pytest.raises(openai.InternalServerError) as refused:
                api.chat.completions.create(model="conversation", messages=HELLO)
        finally:
            thread.join(60)
    assert refused.value.status_code == 503 and refused.value.code == "overloaded"
    assert refused.value.response.headers["retry-after"] == "1"
    assert done == [200]


def test_a_deadline_answers_504(make_server: MakeServer) -> None:
    with (make_server(timeout_s=0.001, caches=False) as live, _openai(live) as api,
          pytest.raises(openai.InternalServerError) as late):
        api.chat.completions.create(model="conversation", messages=HELLO)
    assert late.value.status_code == 504 and late.value.code == "timeout"


def test_raw_sse_framing_ends_with_done(live: Live) -> None:
    body = {"model": "conversation", "messages": HELLO, "max_tokens": 4, "stream": True}
    with client(live) as http, http.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = b"".join(r.iter_bytes()).decode()
    assert raw.endswith("data: [DONE]\n\n")
    frames = raw.split("\n\n")[:-1]
    assert all(frame.startswith("data: ") and "\n" not in frame for frame in frames)
    events = sse_events(raw.splitlines())
    assert events[-1] == "[DONE]"
    final = events[-2]
    assert final["choices"][0]["finish_reason"] in ("stop", "length")
    assert final["usage"]["completion_tokens"] == final["orion"]["tokens"]["output"]


def test_a_client_that_disconnects_mid_stream_stops_the_generation(make_server: MakeServer
                                                                  ) -> None:
    max_tokens = 3000  # seconds of generation on the tiny model: it is still running
    with make_server(caches=False) as live:
        body = {"model": "long", "messages": HELLO, "max_tokens": max_tokens, "stream": True}
        with client(live) as http, http.stream("POST", "/v1/chat/completions",
                                               json=body) as response:
            request_id = response.headers["x-orion-request-id"]
            lines = response.iter_lines()
            assert next(lines).startswith("data: ")
        # Leaving the block closed the connection mid-stream.
        record = wait_for_trace(live.trace_path, request_id)
    result = record["result"]
    assert result["state"] == "error" and result["error_reason"] == "cancelled"
    assert 0 < result["tokens"]["output"] < max_tokens


def test_a_client_that_disconnects_before_the_answer_cancels_it(make_server: MakeServer
                                                               ) -> None:
    with make_server(caches=False) as live:
        with client(live) as http, pytest.raises(httpx.ReadTimeout):
            http.post("/v1/chat/completions", timeout=httpx.Timeout(60, read=0.5), json={
                "model": "long", "messages": HELLO, "max_tokens": 3000})
        records = wait_for_lines(live.trace_path, 1)  # once the server noticed
    assert records[0]["result"]["error_reason"] == "cancelled"
    assert records[0]["result"]["tokens"]["output"] < 3000


def test_api_key_is_required_except_for_health(make_server: MakeServer) -> None:
    with make_server(api_key="s3cret") as live:
        with _openai(live, api_key="wrong") as api, pytest.raises(
                openai.AuthenticationError) as refused:
            api.models.list()
        with _openai(live, api_key="s3cret") as api:
            assert next(m.id for m in api.models.list()) == "auto"
        with client(live) as http:
            assert http.get("/health").status_code == 200
            assert http.get("/metrics").status_code == 401
    assert refused.value.status_code == 401 and "s3cret" not in refused.value.message


def test_an_oversized_body_is_refused_with_413(make_server: MakeServer) -> None:
    with make_server(max_body_bytes=1000) as live, client(live) as http:
        big = {"model": "auto", "messages": [{"role": "user", "content": "x" * 2000}]}
        sized = http.post("/v1/chat/completions", json=big)
        chunked = http.post("/v1/chat/completions",
                            content=iter([json.dumps(big).encode()]))  # no Content-Length
    assert sized.status_code == chunked.status_code == 413
    assert sized.json()["error"]["code"] == "request_too_large"


def test_health_says_ready(live: Live) -> None:
    with client(live) as http:
        health = http.get("/health").json()
    assert health["status"] == "ready" and health["embeddings"] == "off"


@pytest.mark.slow
def test_embeddings_with_the_openai_client_use_the_shared_minilm(make_server: MakeServer,
                                                                 tmp_path: Path) -> None:
    with make_server(embeddings=None) as live, _openai(live) as api:
        with client(live) as http:  # warm-up loads MiniLM and embeds the examples
            for _ in range(1200):
                if http.get("/health").json()["embeddings"] == "ready":
                    break
                threading.Event().wait(0.1)
        vectors = api.embeddings.create(model="all-MiniLM-L6-v2",
                                        input=["bonjour", "def main():"])  # base64 on the wire
        with client(live) as http:
            floats = http.post("/v1/embeddings", json={
                "model": "all-MiniLM-L6-v2", "input": "bonjour",
                "encoding_format": "float"}).json()
        with pytest.raises(openai.NotFoundError):
            api.embeddings.create(model="text-embedding-3-small", input="x")
        ids = [m.id for m in api.models.list()]
    assert [len(v.embedding) for v in vectors.data] == [384, 384]
    assert sum(x * x for x in vectors.data[0].embedding) == pytest.approx(1.0, abs=1e-3)
    # L2 keeps float16 vectors: the same text reads back within float16 precision.
    assert floats["data"][0]["embedding"] == pytest.approx(vectors.data[0].embedding, abs=1e-3)
    assert vectors.usage.prompt_tokens > 2
    assert "all-MiniLM-L6-v2" in ids


# --- structured output, tool calls and context stores over HTTP -----------------------------

PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age"],
          "properties": {"name": {"type": "string", "maxLength": 12},
                         "age": {"type": "integer", "minimum": 0, "maximum": 120}}}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "additionalProperties": False, "required": ["city"],
                   "properties": {"city": {"type": "string", "maxLength": 10}}}}}


def test_response_format_is_enforced_not_ignored(live: Live) -> None:
    with _openai(live) as api:
        completion = api.chat.completions.create(
            model="long", messages=HELLO, max_tokens=200, temperature=0.9, seed=3,
            response_format={"type": "json_schema", "json_schema": {  # type: ignore[arg-type]
                "name": "person", "schema": PERSON, "strict": True}})
    content = completion.choices[0].message.content
    assert content is not None
    value = json.loads(content)
    assert set(value) == {"name", "age"} and 0 <= value["age"] <= 120
    assert (completion.model_extra or {})["orion"]["parsed"] == value


def test_a_tool_call_comes_back_in_openais_shape_and_the_next_turn_takes_it(
        live: Live) -> None:
    with _openai(live) as api:
        completion = api.chat.completions.create(
            model="long", messages=HELLO, max_tokens=200, tools=[WEATHER],  # type: ignore[list-item]
            tool_choice="required")
        choice = completion.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        (call,) = choice.message.tool_calls or ()
        assert call.type == "function" and call.function.name == "get_weather"
        assert set(json.loads(call.function.arguments)) == {"city"}
        # The caller runs the tool and sends its result back, as with OpenAI's API.
        turn = api.chat.completions.create(
            model="long", max_tokens=4, tools=[WEATHER],  # type: ignore[list-item]
            messages=[*HELLO, choice.message.model_dump(exclude_none=True),  # type: ignore[list-item]
                      {"role": "tool", "tool_call_id": call.id, "content": '{"temp": 21}'}],
            tool_choice="none")
    assert turn.choices[0].message.content is not None
    record = wait_for_trace(live.trace_path, (turn.model_extra or {})["orion"]["request_id"])
    said = [m["content"] for m in record["request"]["messages"]]
    assert said[1].startswith("<tool_call>\n") and '"get_weather"' in said[1]
    assert said[2] == '{"temp": 21}'


def test_a_streamed_tool_call_arrives_as_tool_call_deltas(live: Live) -> None:
    with _openai(live) as api:
        stream = api.chat.completions.create(
            model="long", messages=HELLO, max_tokens=200, tools=[WEATHER],  # type: ignore[list-item]
            tool_choice="required", stream=True)
        chunks = list(stream)
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert not any(d.content for d in deltas)  # the call's text is not sent as content
    (call,) = [t for d in deltas for t in d.tool_calls or ()]
    assert call.function is not None and call.function.name == "get_weather"
    assert set(json.loads(call.function.arguments or "")) == {"city"}
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_bad_formats_and_unknown_stores_are_400_naming_the_field(live: Live) -> None:
    with _openai(live) as api:
        with pytest.raises(openai.BadRequestError) as bad_format:
            api.chat.completions.create(model="long", messages=HELLO,
                                        response_format={"type": "yaml"})  # type: ignore[arg-type,typeddict-item]
        with pytest.raises(openai.BadRequestError) as no_store:
            api.chat.completions.create(model="long", messages=HELLO,
                                        extra_body={"context": "nope"})
        with pytest.raises(openai.BadRequestError) as bad_call:
            api.chat.completions.create(model="long", messages=[
                *HELLO, {"role": "assistant", "tool_calls": [  # type: ignore[list-item]
                    {"id": "x", "type": "function",
                     "function": {"name": "f", "arguments": "not json"}}]}])
    assert bad_format.value.body["param"] == "response_format.type"  # type: ignore[index]
    assert no_store.value.body["param"] == "context"  # type: ignore[index]
    assert "no context store named 'nope'" in no_store.value.message
    assert bad_call.value.body["param"] == "messages[1].tool_calls"  # type: ignore[index]
