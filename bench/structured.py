"""Structured output on SmolLM2: constrained vs free decoding speed (same prompt, one run,
interleaved), mask time per token, schema compile time, validity over 30 schemas at
temperature 0 and 0.7, and tool choice / argument validity over 32 labelled prompts.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from typing import Any

import anyio

from bench._common import check, percentile

AGENT = "conversation"  # SmolLM2-135M-Instruct in the packaged registry


def _obj(required: list[str] | None = None, **props: Any) -> dict[str, Any]:
    return {"type": "object", "properties": props, "additionalProperties": False,
            "required": list(props) if required is None else required}


S = {"type": "string", "maxLength": 40}
I = {"type": "integer"}  # noqa: E741 - reads as the schema type
B = {"type": "boolean"}

# (prompt, schema): nested objects, arrays with bounds, enums, bounded numbers, patterns,
# formats, anyOf, optional properties.
SCHEMAS: list[tuple[str, dict[str, Any]]] = [
    ("Alice is 31 and lives in Paris.", _obj(name=S, age=I, city=S)),
    ("Describe a book: Dune by Frank Herbert, 1965.", _obj(title=S, author=S, year=I)),
    ("Is the sky blue? Answer with a boolean and a reason.", _obj(answer=B, reason=S)),
    ("Pick a colour for a sunset.", _obj(colour={"enum": ["red", "orange", "purple", "blue"]})),
    ("Rate this movie from 1 to 5: it was great.",
     _obj(stars={"type": "integer", "minimum": 1, "maximum": 5})),
    ("Give the temperature in Celsius of a warm day.",
     _obj(celsius={"type": "number", "minimum": -50, "maximum": 60})),
    ("List three fruits.", _obj(fruits={"type": "array", "items": S, "minItems": 3,
                                        "maxItems": 3})),
    ("List between one and four prime numbers.",
     _obj(primes={"type": "array", "items": {"type": "integer", "minimum": 2, "maximum": 100},
                  "minItems": 1, "maxItems": 4})),
    ("A user: Bob, bob@example.com.",
     _obj(name=S, email={"type": "string", "format": "email"})),
    ("Give a French postcode for Lyon.",
     _obj(postcode={"type": "string", "pattern": "^[0-9]{5}$"})),
    ("Give an ISO date for the first day of 2024.",
     _obj(date={"type": "string", "format": "date"})),
    ("Give a product code like AB-123.",
     _obj(code={"type": "string", "pattern": "^[A-Z]{2}-[0-9]{3}$"})),
    ("A person with an address in Berlin.",
     _obj(name=S, address=_obj(street=S, city=S, zip={"type": "string",
                                                     "pattern": "^[0-9]{5}$"}))),
    ("An order with two items.",
     _obj(order_id=I, items={"type": "array", "minItems": 2, "maxItems": 2,
                             "items": _obj(sku=S, qty={"type": "integer", "minimum": 1,
                                                       "maximum": 10})})),
    ("Classify the sentiment of: I love it!",
     _obj(sentiment={"enum": ["positive", "negative", "neutral"]},
          confidence={"type": "number", "minimum": 0, "maximum": 1})),
    ("Either a number of apples or the word none.",
     _obj(apples={"anyOf": [{"type": "integer", "minimum": 0, "maximum": 99},
                            {"const": "none"}]})),
    ("A pet: a cat called Tom, maybe with an age.",
     _obj(["species", "name"], species={"enum": ["cat", "dog", "bird"]}, name=S,
          age={"type": "integer", "minimum": 0, "maximum": 30})),
    ("Contact info for a shop, phone optional.",
     _obj(["shop"], shop=S, phone={"type": "string", "pattern": "^[0-9 +]{6,15}$"})),
    ("A meeting at 10:30.",
     _obj(title=S, time={"type": "string", "pattern": "^[0-2][0-9]:[0-5][0-9]$"})),
    ("Weather report for London.",
     _obj(city=S, condition={"enum": ["sunny", "cloudy", "rain", "snow"]},
          high={"type": "integer", "minimum": -30, "maximum": 50})),
    ("A recipe name and three steps.",
     _obj(name=S, steps={"type": "array", "items": S, "minItems": 3, "maxItems": 3})),
    ("A yes/no answer: is water wet?", _obj(answer={"enum": ["yes", "no"]})),
    ("A 2D point near the origin.",
     _obj(x={"type": "number", "minimum": -1, "maximum": 1},
          y={"type": "number", "minimum": -1, "maximum": 1})),
    ("A team of two people with roles.",
     _obj(team={"type": "array", "minItems": 2, "maxItems": 2,
                "items": _obj(name=S, role={"enum": ["lead", "dev", "qa"]})})),
    ("A URL for the example website.", _obj(url={"type": "string", "format": "uri"})),
    ("Tags for a post about Python.",
     _obj(tags={"type": "array", "items": {"type": "string", "pattern": "^[a-z]{2,12}$"},
                "minItems": 1, "maxItems": 5})),
    ("Either an error message or a result number.",
     {"anyOf": [_obj(error=S), _obj(result=I)]}),
    ("A flight: from CDG to JFK, 2 passengers.",
     _obj(origin={"type": "string", "pattern": "^[A-Z]{3}$"},
          destination={"type": "string", "pattern": "^[A-Z]{3}$"},
          passengers={"type": "integer", "minimum": 1, "maximum": 9})),
    ("A settings object with nested flags.",
     _obj(theme={"enum": ["light", "dark"]}, flags=_obj(beta=B, telemetry=B))),
    ("A price in euros with a currency code.",
     _obj(amount={"type": "number", "minimum": 0, "maximum": 10000},
          currency={"enum": ["EUR", "USD", "GBP"]})),
    ("A short list of numbers, possibly empty.",
     _obj(values={"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9},
                  "maxItems": 3})),
    ("A student record with grades.",
     _obj(name=S, grades={"type": "array", "minItems": 1, "maxItems": 3,
                          "items": {"type": "integer", "minimum": 0, "maximum": 20}},
          passed=B)),
]


def _tool(name: str, description: str, **props: Any) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name, "description": description,
                                             "parameters": _obj(**props)}}


TOOLS = [
    _tool("get_weather", "Get the current weather for a city", city=S),
    _tool("send_email", "Send an email to someone", to=S, subject=S),
    _tool("calculate", "Evaluate an arithmetic expression", expression=S),
    _tool("set_timer", "Start a countdown timer", minutes={"type": "integer", "minimum": 1,
                                                          "maximum": 600}),
]
TOOL_PROMPTS: list[tuple[str, str]] = [
    ("What's the weather in Paris?", "get_weather"),
    ("Is it raining in London right now?", "get_weather"),
    ("How hot is it in Madrid today?", "get_weather"),
    ("Tell me the forecast for Tokyo.", "get_weather"),
    ("Do I need an umbrella in Berlin?", "get_weather"),
    ("What's the temperature outside in Rome?", "get_weather"),
    ("Is it snowing in Oslo?", "get_weather"),
    ("Weather in New York please.", "get_weather"),
    ("Email Bob that the meeting moved to 3pm.", "send_email"),
    ("Send a message to alice@example.com saying hello.", "send_email"),
    ("Write an email to my boss asking for Friday off.", "send_email"),
    ("Notify the team by email that the build is green.", "send_email"),
    ("Send an email to support about my broken order.", "send_email"),
    ("Email Carol the report.", "send_email"),
    ("Mail Dave: lunch at noon?", "send_email"),
    ("Send my landlord an email about the rent.", "send_email"),
    ("What is 17 times 23?", "calculate"),
    ("Compute 2 to the power of 10.", "calculate"),
    ("How much is 1234 divided by 2?", "calculate"),
    ("Add 45 and 78.", "calculate"),
    ("What's the square root of 144?", "calculate"),
    ("Calculate 15% of 80.", "calculate"),
    ("What is 9 minus 14?", "calculate"),
    ("Multiply 6 by 7.", "calculate"),
    ("Set a timer for 10 minutes.", "set_timer"),
    ("Remind me in 5 minutes.", "set_timer"),
    ("Start a 25 minute pomodoro.", "set_timer"),
    ("Timer for half an hour please.", "set_timer"),
    ("Count down 3 minutes for my eggs.", "set_timer"),
    ("Set an alarm to go off in 45 minutes.", "set_timer"),
    ("Start a one hour timer.", "set_timer"),
    ("Wake me in 20 minutes.", "set_timer"),
]
THROUGHPUT_SCHEMA = _obj(name=S, age=I, city=S, hobbies={"type": "array", "items": S,
                                                         "maxItems": 3}, email=S)
THROUGHPUT_PROMPT = ("Describe a fictional person as JSON with name, age, city, hobbies "
                     "and email.")


def _fmt(schema: dict[str, Any]) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": "bench", "schema": schema}}


def structured_throughput(quick: bool = False) -> dict[str, Any]:
    """Decode tokens/s of SmolLM2, constrained by a JSON schema vs free, on the same prompt ids,
    through the backend's generation loop, interleaved in one run; the mask's time per token."""
    from orion_fsm import Engine
    from orion_fsm.backends import SamplingParams, compile_grammar

    runs, max_tokens = (3 if quick else 7), 40
    grammar = compile_grammar("json_schema", THROUGHPUT_SCHEMA)
    rates: dict[str, list[float]] = {"free": [], "constrained": []}
    mask_ms: list[float] = []
    forced: list[int] = []

    async def main() -> None:
        async with Engine(trace_path=False, embeddings=False, caches=False, threads=1) as engine:
            spec = engine.registry.get(AGENT)
            async with engine.loader.lease(spec) as lease:
                model = lease.model
                prompt = spec.chat_template.render([("system", spec.system_prompt),
                                                    ("user", THROUGHPUT_PROMPT)])
                ids = model.tokenizer.encode(prompt)

                def decode(constrained: bool) -> tuple[float, Any]:
                    stamps: list[float] = []
                    # Free text runs to max_tokens; constrained stops when the object closes.
                    params = SamplingParams(max_tokens=max_tokens, temperature=0, top_k=1,
                                            grammar=grammar if constrained else None)
                    outcome = model.generate(
                        ids, params, on_event=lambda e: stamps.append(time.perf_counter()),
                        should_stop=lambda: False)
                    n = len(outcome.token_ids)
                    return (n - 1) / (stamps[-1] - stamps[0]), outcome

                await anyio.to_thread.run_sync(decode, True)  # warm: tokenizer, grammar
                await anyio.to_thread.run_sync(decode, False)
                for i in range(runs):
                    order = (True, False) if i % 2 else (False, True)
                    for constrained in order:
                        rate, outcome = await anyio.to_thread.run_sync(decode, constrained)
                        rates["constrained" if constrained else "free"].append(rate)
                        if constrained:
                            mask_ms.extend(outcome.mask.mask_ms)
                            forced.append(outcome.mask.forced)

    anyio.run(main)
    free, constrained = statistics.median(rates["free"]), statistics.median(rates["constrained"])
    ratio = constrained / free
    p50, p99 = percentile(mask_ms, 0.5), percentile(mask_ms, 0.99)
    return {"runs": runs, "free_tok_s": [round(x, 1) for x in rates["free"]],
            "constrained_tok_s": [round(x, 1) for x in rates["constrained"]],
            "free_median_tok_s": round(free, 1),
            "constrained_median_tok_s": round(constrained, 1),
            "mask_ms_p50": round(p50, 4), "mask_ms_p99": round(p99, 4),
            "mask_tokens": len(mask_ms), "forced_tokens_per_run": forced,
            "checks": [
                check("constrained / free decode tokens/s (median)", ratio, ">= 0.9",
                      ratio >= 0.9),
                check("mask ms per token p50", p50, "<= 0.5", p50 <= 0.5),
                check("mask ms per token p99", p99, "<= 3", p99 <= 3),
            ]}


def structured_validity(quick: bool = False) -> dict[str, Any]:
    """Every output of SmolLM2 under 30+ schemas parses and validates, at temperature 0 and
    0.7; compile time per schema (cold, then cached by digest)."""
    from jsonschema.validators import validator_for

    from orion_fsm import Engine, RequestFailed
    from orion_fsm.backends import _constrained

    schemas = SCHEMAS[:8] if quick else SCHEMAS
    compile_ms: list[float] = []
    cached_ms: list[float] = []
    for _, schema in schemas:
        _constrained._validated.cache_clear()
        t = time.perf_counter()
        _constrained.compile_grammar("json_schema", schema)
        compile_ms.append((time.perf_counter() - t) * 1e3)
        t = time.perf_counter()
        _constrained.compile_grammar("json_schema", schema)
        cached_ms.append((time.perf_counter() - t) * 1e3)
    outcomes: dict[str, int] = {"valid": 0, "invalid": 0, "cut_off": 0, "failed": 0}
    failures: list[str] = []
    tokens: list[int] = []

    async def main() -> None:
        async with Engine(trace_path=False, embeddings=False, caches=False, threads=1) as engine:
            for temperature in (0.0, 0.7):
                for i, (prompt, schema) in enumerate(schemas):
                    try:
                        result = await engine.infer(
                            f"{prompt} Answer in JSON.", agent=AGENT, temperature=temperature,
                            seed=i, max_tokens=160, response_format=_fmt(schema))
                    except RequestFailed as exc:
                        kind = "cut_off" if "cut off" in exc.message else "failed"
                        outcomes[kind] += 1
                        failures.append(f"t={temperature} #{i}: {exc.message[:160]}")
                        continue
                    tokens.append(result.tokens.output)
                    value = json.loads(result.text)
                    errors = list(validator_for(schema)(schema).iter_errors(value))
                    outcomes["invalid" if errors else "valid"] += 1
                    if errors:
                        failures.append(f"t={temperature} #{i}: {errors[0].message}")

    anyio.run(main)
    total = sum(outcomes.values())
    rate = outcomes["valid"] / total
    return {"schemas": len(schemas), "requests": total, **outcomes,
            "output_tokens_median": statistics.median(tokens) if tokens else 0,
            "compile_ms_p50": round(percentile(compile_ms, 0.5), 3),
            "compile_ms_max": round(max(compile_ms), 3),
            "compile_cached_ms_p50": round(percentile(cached_ms, 0.5), 4),
            "failures": failures,
            "checks": [check("outputs that parse and validate (T=0 and 0.7)", rate, "== 1.0",
                             rate == 1.0)]}


def tool_use(quick: bool = False) -> dict[str, Any]:
    """Which tool SmolLM2 picks on 32 labelled prompts over 4 tools (tool_choice=required:
    the choice is the model's skill), and whether every call's arguments validate (the mask's
    guarantee). Also how often `auto` calls a tool at all."""
    from jsonschema.validators import validator_for

    from orion_fsm import Engine, RequestFailed

    prompts = TOOL_PROMPTS[::4] if quick else TOOL_PROMPTS
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    right = valid = calls = auto_calls = 0
    confusion: dict[str, dict[str, int]] = {}
    errors: list[str] = []

    async def main() -> None:
        nonlocal right, valid, calls, auto_calls
        async with Engine(trace_path=False, embeddings=False, caches=False, threads=1) as engine:
            for prompt, expected in prompts:
                for choice in ("required", "auto"):
                    try:
                        result = await engine.infer(prompt, agent=AGENT, temperature=0,
                                                    max_tokens=80, tools=TOOLS,
                                                    tool_choice=choice)
                    except RequestFailed as exc:
                        errors.append(f"{choice} {prompt!r}: {exc.message[:160]}")
                        continue
                    if choice == "auto":
                        auto_calls += bool(result.tool_calls)
                        continue
                    for call in result.tool_calls:
                        calls += 1
                        schema = schemas[call.name]
                        valid += not list(validator_for(schema)(schema).iter_errors(
                            dict(call.arguments)))
                        right += call.name == expected
                        row = confusion.setdefault(expected, {})
                        row[call.name] = row.get(call.name, 0) + 1

    anyio.run(main)
    validity = valid / calls if calls else 0.0
    return {"prompts": len(prompts), "tools": len(TOOLS), "calls": calls,
            "right_tool": right, "right_tool_rate": round(right / len(prompts), 3),
            "auto_called_a_tool": auto_calls, "confusion": confusion, "errors": errors,
            "checks": [
                check("tool arguments that validate (required)", validity, "== 1.0",
                      validity == 1.0 and calls == len(prompts)),
                check("right tool chosen (model skill, reported)", right / len(prompts),
                      "reported", True),
            ]}


BENCHMARKS: dict[str, Callable[..., dict[str, Any]]] = {
    "structured_throughput": structured_throughput,
    "structured_validity": structured_validity,
    "tool_use": tool_use,
}
