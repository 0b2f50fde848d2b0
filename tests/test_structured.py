"""Structured output through the public API on tiny random-weight models: the mask alone makes
their garbage fit every format (JSON schema, JSON object, regex, Lark, tool calls); bad formats
are refused in validating, cut-off output fails with its reason, constrained runs replay.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from orion_fsm import Engine, Message, RequestFailed, ToolCall, read_traces
from orion_fsm.services.observability import _attributes as attr
from orion_fsm.testing.replay import assert_replays
from tests.conftest import agent

pytestmark = pytest.mark.anyio

MakeEngine = Callable[..., Engine]
LONG = "long"  # the tiny agent with a 4096-token context: room for the tools' prompt

SCHEMAS: dict[str, dict[str, Any]] = {
    "flat": {"type": "object", "additionalProperties": False, "required": ["name", "age"],
             "properties": {"name": {"type": "string", "maxLength": 12},
                            "age": {"type": "integer", "minimum": 0, "maximum": 120}}},
    "nested": {"type": "object", "additionalProperties": False, "required": ["user"],
               "properties": {"user": {
                   "type": "object", "additionalProperties": False, "required": ["id", "ok"],
                   "properties": {"id": {"type": "integer", "minimum": 1, "maximum": 999},
                                  "ok": {"type": "boolean"}}}}},
    "array": {"type": "array", "minItems": 2, "maxItems": 4,
              "items": {"type": "integer", "minimum": -5, "maximum": 5}},
    "enum": {"type": "object", "additionalProperties": False, "required": ["colour"],
             "properties": {"colour": {"enum": ["red", "green", "blue"]}}},
    "number": {"type": "object", "additionalProperties": False, "required": ["x"],
               "properties": {"x": {"type": "number", "minimum": 0.5, "maximum": 2.5}}},
    "pattern": {"type": "object", "additionalProperties": False, "required": ["code"],
                "properties": {"code": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{3}$"}}},
    "any_of": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 9},
                         {"type": "string", "enum": ["none", "all"]}]},
    "optional": {"type": "object", "additionalProperties": False, "required": ["a"],
                 "properties": {"a": {"type": "boolean"},
                                "b": {"type": "string", "maxLength": 4}}},
}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "additionalProperties": False, "required": ["city"],
                   "properties": {"city": {"type": "string", "maxLength": 10}}}}}
CLOCK = {"type": "function", "function": {
    "name": "get_time", "description": "Time in a zone",
    "parameters": {"type": "object", "additionalProperties": False, "required": ["zone"],
                   "properties": {"zone": {"enum": ["UTC", "CET"]}}}}}


def json_format(schema: dict[str, Any]) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": "t", "schema": schema,
                                                   "strict": True}}


@pytest.mark.parametrize("name", sorted(SCHEMAS))
@pytest.mark.parametrize("temperature", [0.0, 0.9])
async def test_every_output_of_a_random_model_parses_and_validates(
        make_engine: MakeEngine, name: str, temperature: float) -> None:
    schema = SCHEMAS[name]
    async with make_engine() as engine:
        for seed in (1, 2):
            result = await engine.infer("hello", agent=LONG, max_tokens=300, seed=seed,
                                        temperature=temperature,
                                        response_format=json_format(schema))
            assert json.loads(result.text) == result.parsed
            jsonschema.validate(result.parsed, schema)
            assert result.finish_reason == "stop"
            assert [p.state for p in result.phases] == [
                "validating", "routing", "loading_agent", "inferencing", "checking_output"]


async def test_a_streamed_json_output_is_the_parsed_value(make_engine: MakeEngine) -> None:
    async with make_engine() as engine, engine.stream("hello", agent=LONG, max_tokens=200,
                             response_format=json_format(SCHEMAS["nested"])) as stream:
        text = "".join([t async for t in stream])
    assert stream.result.parsed == json.loads(text)
    jsonschema.validate(stream.result.parsed, SCHEMAS["nested"])


async def test_output_cut_off_by_max_tokens_is_refused_with_the_reason(
        make_engine: MakeEngine) -> None:
    async with make_engine() as engine:
        with pytest.raises(RequestFailed) as failed:
            await engine.infer("hello", agent=LONG, max_tokens=3,
                               response_format=json_format(SCHEMAS["flat"]))
    assert failed.value.reason == "exhausted"  # the agent has no fallback left
    assert "cut off after 3 tokens" in str(failed.value)
    assert failed.value.result is not None and failed.value.result.parsed is None


async def test_cut_off_streamed_output_ends_in_error_with_the_reason(
        make_engine: MakeEngine) -> None:
    async with make_engine() as engine:
        with pytest.raises(RequestFailed) as failed:
            async with engine.stream("hello", agent=LONG, max_tokens=4,
                                     response_format={"type": "json_object"}) as stream:
                async for _ in stream:
                    pass
    assert failed.value.reason == "inference_failed"
    assert "cut off" in str(failed.value)


async def test_a_cut_off_output_falls_back_to_the_next_agent(
        make_engine: MakeEngine, registry_doc: dict[str, Any], tiny_models: dict[str, Path],
) -> None:
    registry_doc["agents"].append(agent("stingy", tiny_models["small"], fallback="conversation",
                                        generation={"max_tokens": 2, "temperature": 0}))
    async with make_engine() as engine:
        result = await engine.infer("hello", agent="stingy",
                                    response_format={"type": "regex", "pattern": "[0-9]{5}"})
    assert result.fallback and result.agent == "conversation"
    assert re.fullmatch("[0-9]{5}", result.text) and result.parsed == result.text
    assert [p.state for p in result.phases][3:] == [
        "inferencing", "checking_output", "fallback", "loading_agent", "inferencing",
        "checking_output"]


@pytest.mark.parametrize(("fmt", "pattern"), [
    ({"type": "regex", "pattern": r"[0-9]{3}-[a-z]{2}"}, r"[0-9]{3}-[a-z]{2}"),
    ({"type": "grammar", "lark": 'start: "yes" | "no" | "maybe " NUM\nNUM: /[0-9]/'},
     r"yes|no|maybe [0-9]"),
])
async def test_regex_and_lark_formats_are_enforced(make_engine: MakeEngine,
                                                   fmt: dict[str, Any], pattern: str) -> None:
    async with make_engine() as engine:
        for temperature in (0.0, 1.0):
            result = await engine.infer("hello", max_tokens=20, temperature=temperature,
                                        seed=3, response_format=fmt)
            assert re.fullmatch(pattern, result.text), result.text
            assert result.parsed == result.text


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"response_format": json_format({"type": "strin"})}, "response_format.json_schema.schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
     "response_format.json_schema.schema"),
    ({"response_format": {"type": "xml"}}, "response_format.type"),
    ({"response_format": {"type": "regex", "pattern": "[a-"}}, "response_format.pattern"),
    ({"response_format": {"type": "grammar", "lark": "start: undefined_rule"}},
     "response_format.lark"),
    ({"tools": [{"type": "function", "function": {"name": "no spaces"}}]},
     "tools[0].function.name"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [WEATHER], "response_format": {"type": "json_object"}}, "tools"),
])
async def test_a_format_that_cannot_be_enforced_is_refused_in_validating(
        make_engine: MakeEngine, kwargs: dict[str, Any], field: str) -> None:
    async with make_engine() as engine:
        with pytest.raises(RequestFailed) as failed:
            await engine.infer("hello", **kwargs)
    assert failed.value.reason == "invalid"
    assert field in str(failed.value)
    result = failed.value.result
    assert result is not None and [p.state for p in result.phases] == ["validating"]


async def test_a_required_tool_call_has_arguments_valid_under_its_schema_and_round_trips(
        make_engine: MakeEngine) -> None:
    async with make_engine() as engine:
        for choice in ("required", {"type": "function", "function": {"name": "get_time"}}):
            result = await engine.infer("What time is it?", agent=LONG, max_tokens=200,
                                        tools=[WEATHER, CLOCK], tool_choice=choice)
            (call,) = result.tool_calls
            assert isinstance(call, ToolCall) and call.id.startswith("call_")
            schema = (WEATHER if call.name == "get_weather" else CLOCK)["function"]
            jsonschema.validate(call.arguments, schema["parameters"])  # type: ignore[index]
            assert call.as_dict()["function"]["arguments"] == json.dumps(call.arguments)
        assert call.name == "get_time"
        # The caller runs the tool and sends its result back as a `tool` message.
        answer = await engine.infer(
            [Message("user", "What time is it?"), Message("assistant", result.text),
             Message("tool", json.dumps({"time": "12:00"}))],
            agent=LONG, max_tokens=6, tools=[WEATHER, CLOCK])
        assert answer.ok and answer.tokens.input > result.tokens.input


async def test_tool_choice_auto_and_none(make_engine: MakeEngine) -> None:
    async with make_engine() as engine:
        auto = await engine.infer("hello", agent=LONG, max_tokens=30, tools=[WEATHER])
        assert auto.tool_calls == () or auto.text.startswith("<tool_call>")
        none = await engine.infer("hello", agent=LONG, max_tokens=5, tools=[WEATHER],
                                  tool_choice="none")
        assert none.tool_calls == () and none.tokens.input < auto.tokens.input


async def test_the_l1_key_tells_formats_apart_and_a_hit_is_decoded_again(
        make_engine: MakeEngine) -> None:
    async with make_engine() as engine:
        digits = await engine.infer("hello", temperature=0, max_tokens=5,
                                    response_format={"type": "regex", "pattern": "[0-9]{2}"})
        letters = await engine.infer("hello", temperature=0, max_tokens=5,
                                     response_format={"type": "regex", "pattern": "[a-z]{2}"})
        flat = await engine.infer("hello", agent=LONG, temperature=0, max_tokens=200,
                                  response_format=json_format(SCHEMAS["flat"]))
        again = await engine.infer("hello", agent=LONG, temperature=0, max_tokens=200,
                                   response_format=json_format(SCHEMAS["flat"]))
    assert digits.cache is None and letters.cache is None and digits.text != letters.text
    assert again.cache == "L1" and again.parsed == flat.parsed is not None


async def test_spans_carry_the_format_and_the_mask_figures(
        make_engine: MakeEngine, spans: tuple[TracerProvider, InMemorySpanExporter]) -> None:
    async with make_engine() as engine:
        await engine.infer("hello", max_tokens=20,
                           response_format={"type": "regex", "pattern": "[0-9]{4}"})
    attributes: dict[str, Any] = {}
    for span in spans[1].get_finished_spans():
        attributes.update(span.attributes or {})
    assert attributes[attr.OUTPUT_FORMAT] == "regex"
    assert len(attributes[attr.OUTPUT_GRAMMAR_DIGEST]) == 64
    assert attributes[attr.OUTPUT_MASK_FORCED] >= 0
    assert attributes[attr.GEN_AI_OUTPUT_TYPE] == "text"


async def test_constrained_requests_replay_recorded_and_live(
        make_engine: MakeEngine, tmp_path: Path) -> None:
    async with make_engine() as engine:
        await engine.infer("hello", agent=LONG, max_tokens=200, temperature=0.8, seed=4,
                           response_format=json_format(SCHEMAS["nested"]))
        async with engine.stream("hello", agent=LONG, max_tokens=200, tools=[WEATHER],
                                 tool_choice="required") as stream:
            async for _ in stream:
                pass
    records = list(read_traces(tmp_path / "traces" / "test.jsonl"))
    assert [r["sampling"]["grammar"]["kind"] for r in records] == ["json_schema", "lark"]
    for record in records:  # the mask runs again on every recorded token
        await assert_replays(record, registry=engine.registry)
    # Live: the sampled (seeded) JSON regenerates token for token under its mask.
    await assert_replays(records[0], registry=engine.registry, live=True,
                         cache_dir=tmp_path / "cache")


@pytest.mark.slow
async def test_smollm2_fills_a_simple_schema_and_calls_the_right_tool(tmp_path: Path) -> None:
    schema = {"type": "object", "additionalProperties": False, "required": ["name", "age"],
              "properties": {"name": {"type": "string", "maxLength": 20},
                             "age": {"type": "integer", "minimum": 0, "maximum": 150}}}
    async with Engine(trace_path=tmp_path / "t.jsonl", embeddings=False, caches=False,
                      threads=1) as engine:
        person = await engine.infer("Alice is 31 years old. Give her name and age as JSON.",
                                    agent="conversation", temperature=0, max_tokens=40,
                                    response_format=json_format(schema))
        weather = await engine.infer("What's the weather in Paris?", agent="conversation",
                                     temperature=0, max_tokens=60, tools=[WEATHER, CLOCK],
                                     tool_choice="required")
    jsonschema.validate(person.parsed, schema)
    assert person.parsed["name"] == "Alice"
    (call,) = weather.tool_calls
    jsonschema.validate(call.arguments, WEATHER["function"]["parameters"])  # type: ignore[index]
