"""Validation of a registry document: JSON Schema first, then the rules a schema cannot say.

Every refusal is a `RegistryError` naming the JSON path to fix and what was expected there.
"""

from __future__ import annotations

import difflib
import functools
import importlib
import json
import math
import re
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from orion_fsm._exceptions import RegistryError
from orion_fsm._resources import data_file
from orion_fsm.services.models._chat_templates import CHAT_TEMPLATE_PRESETS, template_fields

if TYPE_CHECKING:
    # jsonschema is imported where a registry is validated: it costs ~35 ms, a third of
    # `import orion_fsm`, and a program that never loads a registry should not pay it.
    import jsonschema
    from jsonschema.exceptions import ValidationError as SchemaError

__all__ = ["MAX_DEPTH", "NonFinite", "generation_bounds", "nested_repeat", "validate"]


def validate(doc: object) -> dict[str, Any]:
    """`doc` itself once it is a well-formed registry; otherwise the first thing to fix."""
    from jsonschema.exceptions import best_match  # see TYPE_CHECKING above

    _check_plain_data(doc)
    error = best_match(_validator().iter_errors(doc))
    if error is not None:
        path, message = _describe_schema_error(error)
        raise RegistryError(message, json_path=path)
    assert isinstance(doc, dict)  # the schema guarantees it; this tells the type checker
    _check_semantics(doc)
    return doc


def nested_repeat(pattern: str) -> bool:
    """Whether `pattern` repeats without bound something that itself repeats without bound
    (`(a+)+`, `(\\w+\\s?)*`): the shape that backtracks exponentially."""
    # The parser `re` compiles with (no stubs; its shape is stable since 3.11).
    parser: Any = importlib.import_module("re._parser")

    repeats = {parser.MAX_REPEAT, parser.MIN_REPEAT, parser.POSSESSIVE_REPEAT}

    def walk(items: Any, inside: bool) -> bool:
        for op, arg in items:
            if op in repeats:
                _, high, sub = arg
                unbounded = high == parser.MAXREPEAT
                if (unbounded and inside and op is not parser.POSSESSIVE_REPEAT) \
                        or walk(sub, inside or unbounded):
                    return True
                continue
            if op is parser.SUBPATTERN:
                children = [arg[-1]]
            elif op is parser.BRANCH:
                children = list(arg[1])
            elif op in (parser.ASSERT, parser.ASSERT_NOT):
                children = [arg[1]]
            else:
                continue
            if any(walk(child, inside) for child in children):
                return True
        return False

    return walk(parser.parse(pattern), False)



@functools.cache
def _schema_document() -> dict[str, Any]:
    schema: dict[str, Any] = json.loads(data_file("models.schema.json").read_text(encoding="utf-8"))
    return schema


@functools.cache
def _schema() -> dict[str, Any]:
    import jsonschema  # see TYPE_CHECKING above

    schema = _schema_document()
    jsonschema.Draft202012Validator.check_schema(schema)
    return schema


@functools.cache
def generation_bounds() -> Mapping[str, tuple[float, float]]:
    """Inclusive `(low, high)` of each numeric generation parameter, read from the schema.

    models.schema.json is the one home of these bounds: a request's parameters and an agent's
    defaults are held to the same numbers. An exclusive bound becomes the nearest value inside
    it (the next float, or the next integer), so `low <= value <= high` is the whole test.
    Built on first use, without jsonschema: reading the schema is all it needs.
    """
    properties = _schema_document()["$defs"]["generation"]["properties"]
    bounds: dict[str, tuple[float, float]] = {}
    for name, spec in properties.items():
        if spec.get("type") not in ("integer", "number"):
            continue
        integral = spec["type"] == "integer"
        low = spec.get("minimum", -math.inf)
        if "exclusiveMinimum" in spec:
            low = _inside(spec["exclusiveMinimum"], up=True, integral=integral)
        high = spec.get("maximum", math.inf)
        if "exclusiveMaximum" in spec:
            high = _inside(spec["exclusiveMaximum"], up=False, integral=integral)
        bounds[name] = (low, high)
    return MappingProxyType(bounds)


def _inside(bound: float, *, up: bool, integral: bool) -> float:
    """The nearest value strictly beyond an exclusive `bound`, upwards or downwards."""
    if integral:
        return bound + 1 if up else bound - 1
    return math.nextafter(bound, math.inf if up else -math.inf)


@functools.cache
def _validator() -> jsonschema.Draft202012Validator:
    import jsonschema  # see TYPE_CHECKING above

    return jsonschema.Draft202012Validator(_schema())


_IDENTIFIER = re.compile(r"^[A-Za-z_$][A-Za-z0-9_$]*$")


def _json_path(parts: Sequence[str | int]) -> str:
    out = "$"
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        elif _IDENTIFIER.match(part):
            out += f".{part}"
        else:
            out += f"[{json.dumps(part)}]"
    return out


def _show(value: object) -> str:
    text = repr(value) if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 60 else text[:57] + "..."


_TYPE_NAMES = {
    "integer": "an integer",
    "number": "a number",
    "string": "a string",
    "boolean": "true or false",
    "array": "an array",
    "object": "an object",
    "null": "null",
}


def _expected(schema: object) -> str:
    """Say in words what a (sub)schema accepts, e.g. 'an integer ≥ 64'."""
    if not isinstance(schema, Mapping):
        return "nothing (this field is not allowed here)"
    if "title" in schema:
        return str(schema["title"])
    if "$ref" in schema:
        return _expected(_schema()["$defs"][schema["$ref"].rsplit("/", 1)[-1]])
    if "const" in schema:
        return _show(schema["const"])
    if "enum" in schema:
        return "one of " + ", ".join(_show(v) for v in schema["enum"])
    for key in ("oneOf", "anyOf"):
        if key in schema:
            return " or ".join(_expected(s) for s in schema[key])
    types = schema.get("type", [])
    types = [types] if isinstance(types, str) else types
    words = " or ".join(_TYPE_NAMES.get(t, t) for t in types) or "a value"
    if schema.get("minLength") == 1:
        words = "a non-empty string"
    bounds = [
        f"{sym} {schema[key]}"
        for key, sym in (
            ("minimum", "≥"),
            ("exclusiveMinimum", ">"),
            ("maximum", "≤"),
            ("exclusiveMaximum", "<"),
        )
        if key in schema
    ]
    if bounds:
        words += " " + " and ".join(bounds)
    if "pattern" in schema:
        words += f" matching {schema['pattern']}"
    if schema.get("uniqueItems"):
        words += " without duplicates"
    return words


def _describe_schema_error(error: SchemaError) -> tuple[str, str]:
    """Turn the most relevant schema error into (JSON path, what was expected)."""
    parts = list(error.absolute_path)
    instance = error.instance
    schema = error.schema if isinstance(error.schema, Mapping) else {}
    if error.validator == "required" and isinstance(instance, Mapping):
        required: list[str] = list(error.validator_value)  # type: ignore[arg-type]
        missing = next(k for k in required if k not in instance)
        field = schema.get("properties", {}).get(missing, {})
        return _json_path([*parts, missing]), (
            f"missing required field {missing!r} (expected {_expected(field)})"
        )
    if error.validator == "additionalProperties" and isinstance(instance, Mapping):
        allowed = list(schema.get("properties", {}))
        extra = next(k for k in instance if k not in allowed)
        hint = difflib.get_close_matches(extra, allowed, n=1)
        suggestion = f"did you mean {hint[0]!r}? " if hint else ""
        return _json_path([*parts, extra]), (
            f"unknown field {extra!r}; {suggestion}allowed fields: {', '.join(allowed)}"
        )
    if error.validator in ("oneOf", "anyOf") and isinstance(instance, Mapping) and error.context:
        branch = _closest_branch(error)
        if branch is not None:
            return _describe_schema_error(branch)
    if error.validator == "minItems":
        return _json_path(parts), (
            f"expected at least {error.validator_value} item(s), got {_show(instance)}"
        )
    if error.validator in ("maxItems", "uniqueItems"):
        return _json_path(parts), error.message
    return _json_path(parts), f"expected {_expected(error.schema)}, got {_show(instance)}"


def _closest_branch(error: SchemaError) -> SchemaError | None:
    """For an object matching no alternative, pick the alternative sharing the most field names.

    `{"package": "x"}` is then reported as missing `file`, not as "not a model source"; a tie
    (fields of two alternatives mixed) keeps the general message.
    """
    keys = set(error.instance)  # type: ignore[arg-type]
    alternatives: list[object] = list(error.validator_value)  # type: ignore[arg-type]
    scored: dict[int, int] = {}
    for branch, sub in enumerate(alternatives):
        if isinstance(sub, Mapping) and sub.get("type") == "object":
            scored[branch] = len(keys & set(sub.get("properties", {})))
    ranked = sorted(scored.items(), key=lambda item: -item[1])
    if not ranked or ranked[0][1] == 0 or (len(ranked) > 1 and ranked[1][1] == ranked[0][1]):
        return None
    branch_errors = [e for e in error.context if e.relative_schema_path[0] == ranked[0][0]]
    from jsonschema.exceptions import best_match  # see TYPE_CHECKING above

    chosen: SchemaError | None = best_match(branch_errors)
    return chosen


MAX_DEPTH = 32  # the schema's deepest path is 5 levels; anything far deeper is not a registry


class NonFinite(str):
    """What `NaN`, `Infinity` and `-Infinity` parse to, so that they are reported by path."""


def _check_plain_data(doc: object) -> None:
    """Refuse non-finite numbers and absurd nesting before the schema walks the document.

    Walked with an explicit stack: jsonschema recurses, and a 100,000-deep document would end
    in RecursionError; NaN compares false with every bound, so a schema lets it through.
    """
    stack: list[tuple[object, tuple[str | int, ...]]] = [(doc, ())]
    while stack:
        value, parts = stack.pop()
        if len(parts) > MAX_DEPTH:
            raise RegistryError(
                f"nested deeper than {MAX_DEPTH} levels; a registry is a shallow document",
                json_path=_json_path(parts[:MAX_DEPTH]),
            )
        if isinstance(value, NonFinite) or (isinstance(value, float) and not math.isfinite(value)):
            raise RegistryError(
                f"{value} is not a number JSON allows; write a finite number",
                json_path=_json_path(parts),
            )
        if isinstance(value, Mapping):
            stack.extend((v, (*parts, str(k))) for k, v in value.items())
        elif isinstance(value, list | tuple):
            stack.extend((v, (*parts, i)) for i, v in enumerate(value))


def _check_semantics(doc: Mapping[str, Any]) -> None:
    """Rules JSON Schema cannot express; each error names the JSON path to fix."""
    agents: Sequence[Mapping[str, Any]] = doc["agents"]
    index: dict[str, int] = {}
    for i, agent in enumerate(agents):
        if agent["id"] in index:
            raise RegistryError(
                f"duplicate agent id {agent['id']!r} (already defined at "
                f"$.agents[{index[agent['id']]}]); agent ids must be unique",
                json_path=f"$.agents[{i}].id",
            )
        index[agent["id"]] = i
    known = ", ".join(index)

    if doc["default_agent"] not in index:
        raise RegistryError(
            f"default_agent {doc['default_agent']!r} is not an agent; known agents: {known}",
            json_path="$.default_agent",
        )

    for i, agent in enumerate(agents):
        fallback = agent.get("fallback")
        if fallback is not None and fallback not in index:
            raise RegistryError(
                f"fallback {fallback!r} is not an agent; known agents: {known}, or null",
                json_path=f"$.agents[{i}].fallback",
            )

    # A cycle is reported at its first member in document order, never at an agent that
    # merely leads into it (a self-fallback on agents[1] is agents[1]'s error).
    for i, agent in enumerate(agents):
        chain = [agent["id"]]
        nxt = agent.get("fallback")
        while nxt is not None:
            if nxt in chain and nxt != agent["id"]:
                break
            if nxt in chain:
                cycle = " -> ".join([*chain, nxt])
                raise RegistryError(
                    f"fallback cycle {cycle}; end the chain with a null fallback",
                    json_path=f"$.agents[{i}].fallback",
                )
            chain.append(nxt)
            nxt = agents[index[nxt]].get("fallback")

    for i, agent in enumerate(agents):
        _check_agent(agent, f"$.agents[{i}]")
    _check_virtual(doc.get("virtual_agents", ()), index)


def _check_virtual(virtual: Sequence[Mapping[str, Any]], index: Mapping[str, int]) -> None:
    known = ", ".join(index)
    seen: set[str] = set()
    for i, spec in enumerate(virtual):
        at = f"$.virtual_agents[{i}]"
        if spec["id"] in index or spec["id"] in seen:
            raise RegistryError(f"duplicate agent id {spec['id']!r}; agent and virtual agent "
                                "ids must be unique", json_path=f"{at}.id")
        seen.add(spec["id"])
        roles = [m["role"] for m in spec["members"]]
        if len(set(roles)) != len(roles):
            raise RegistryError(f"members share the role {roles[0]!r}; give one member the "
                                "role solution and the other explanation",
                                json_path=f"{at}.members")
        for k, member in enumerate(spec["members"]):
            if member["agent"] not in index:
                raise RegistryError(f"member {member['agent']!r} is not an agent; known "
                                    f"agents: {known}", json_path=f"{at}.members[{k}].agent")
        fallback = spec.get("fallback")
        if fallback is not None and fallback not in index:
            raise RegistryError(f"fallback {fallback!r} is not an agent; known agents: "
                                f"{known}, or null", json_path=f"{at}.fallback")
        _check_agent({"chat_template": "chatml", **spec}, at)  # its routing patterns


def _check_agent(agent: Mapping[str, Any], at: str) -> None:
    template = agent["chat_template"]
    if isinstance(template, str):
        if template not in CHAT_TEMPLATE_PRESETS:
            raise RegistryError(
                f"unknown chat template preset {template!r}; known presets: "
                f"{', '.join(CHAT_TEMPLATE_PRESETS)}, or an object with system, user, "
                "assistant and assistant_prefix",
                json_path=f"{at}.chat_template",
            )
    else:
        for key in ("system", "user", "assistant"):
            try:
                fields = template_fields(template[key])
            except ValueError as exc:
                raise RegistryError(
                    f"invalid template ({exc}); only {{content}} may be substituted, "
                    "write literal braces as {{ and }}",
                    json_path=f"{at}.chat_template.{key}",
                ) from None
            if fields:
                raise RegistryError(
                    f"template field {fields[0]} is not allowed; only a bare {{content}} may be "
                    "substituted (no format spec, conversion or attribute), write literal "
                    "braces as {{ and }}",
                    json_path=f"{at}.chat_template.{key}",
                )

    for k, pattern in enumerate(agent.get("routing", {}).get("patterns", ())):
        try:
            re.compile(pattern)
        except re.error as exc:
            raise RegistryError(
                f"invalid regular expression {pattern!r}: {exc}",
                json_path=f"{at}.routing.patterns[{k}]",
            ) from None
        if nested_repeat(pattern):
            raise RegistryError(
                f"regular expression {pattern!r} nests an unbounded repetition inside another "
                "(as in (a+)+): it can take exponential time on a hostile prompt; bound the "
                "inner one (e.g. {1,20}) or remove the outer one",
                json_path=f"{at}.routing.patterns[{k}]",
            )

    seen: set[str] = set()
    for k, variant in enumerate(agent.get("quantization", ())):
        if variant["name"] in seen:
            raise RegistryError(
                f"duplicate quantization variant {variant['name']!r}",
                json_path=f"{at}.quantization[{k}].name",
            )
        seen.add(variant["name"])

    max_tokens = agent.get("generation", {}).get("max_tokens")
    if max_tokens is not None and max_tokens >= agent["context_length"]:
        raise RegistryError(
            f"max_tokens {max_tokens} leaves no room for the prompt in a context of "
            f"{agent['context_length']} tokens; lower it or raise context_length",
            json_path=f"{at}.generation.max_tokens",
        )
