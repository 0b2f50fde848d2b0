"""Output formats a request asks for, in OpenAI's shapes (`response_format`, `tools`,
`tool_choice`): checked and compiled in `validating`, enforced token by token by the backend's
mask, and the finished output checked against them (jsonschema) before the request succeeds.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from ._exceptions import GrammarError, OutputRejected, ValidationError
from ._types import TOOL_CALL_CLOSE as _CALL_CLOSE
from ._types import TOOL_CALL_OPEN as _CALL_OPEN
from ._types import Message, Request, ToolCall
from .backends import Grammar, MaskStats, compile_grammar

FORMAT_TYPES: Final = ("text", "json_object", "json_schema", "regex", "grammar")
TOOL_CHOICES: Final = ("auto", "none", "required")
_TOOL_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
# Compact JSON inside a Lark grammar too: no whitespace runs for a small model to loop in.
_COMPACT: Final = {"whitespace_flexible": False}


@dataclass(frozen=True, slots=True, eq=False)
class OutputFormat:
    """What a request's output must be, compiled: the grammar the mask runs and the checks."""

    kind: str  # json_object | json_schema | regex | grammar | tools
    grammar: Grammar
    schema: Mapping[str, Any] | None = None  # JSON kinds: what the output validates against
    tools: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)  # name -> parameters
    tool_prompt: str | None = None  # the tools' description, added to the system prompt


@dataclass(frozen=True, slots=True)
class CheckedOutput:
    parsed: Any = None
    tool_calls: tuple[ToolCall, ...] = ()


def output_format(request: Request) -> OutputFormat | None:
    """The request's format compiled, None for free text; ValidationError naming the field."""
    response_format, tools, choice = request.response_format, request.tools, request.tool_choice
    if tools or choice is not None:
        if response_format is not None and response_format.get("type") != "text":
            raise ValidationError(
                "pass either response_format or tools, not both: a tool call is already JSON",
                field="tools")
        return _tools_format(tools, choice)
    if response_format is None:
        return None
    if not isinstance(response_format, Mapping):
        raise ValidationError("response_format must be an object such as "
                              '{"type": "json_object"}', field="response_format")
    kind = response_format.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return _json_format("json_object", {"type": "object"}, "response_format")
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        where = "response_format.json_schema.schema"
        if not isinstance(spec, Mapping) or not isinstance(spec.get("schema"), Mapping):
            raise ValidationError(f"{where} is missing: give the JSON schema the output must "
                                  'follow, as {"json_schema": {"name": ..., "schema": {...}}}',
                                  field=where)
        return _json_format("json_schema", spec["schema"], where)
    if kind in ("regex", "grammar"):
        key = "pattern" if kind == "regex" else "lark"
        source = response_format.get(key)
        where = f"response_format.{key}"
        if not isinstance(source, str) or not source:
            raise ValidationError(f"{where} must be a non-empty string", field=where)
        return OutputFormat(kind, _compiled("regex" if kind == "regex" else "lark", source, where))
    raise ValidationError(f"response_format.type {kind!r} is not supported; expected one of "
                          f"{', '.join(FORMAT_TYPES)}", field="response_format.type")


def _compiled(kind: str, source: str | dict[str, Any], where: str) -> Grammar:
    try:
        return compile_grammar(kind, source)
    except GrammarError as exc:
        raise ValidationError(f"{where} cannot be enforced: {exc}", field=where) from None


def _checked_schema(schema: Any, where: str) -> dict[str, Any]:
    from jsonschema import SchemaError
    from jsonschema.validators import validator_for

    if not isinstance(schema, Mapping):
        raise ValidationError(f"{where} must be a JSON schema object", field=where)
    checked: dict[str, Any] = dict(schema)
    try:
        validator_for(checked).check_schema(checked)
    except SchemaError as exc:
        at = "/".join(str(p) for p in exc.absolute_path)
        raise ValidationError(f"{where} is not a valid JSON schema: {exc.message}"
                              + (f" (at {at})" if at else ""), field=where) from None
    return checked


def _json_format(kind: str, schema: Any, where: str) -> OutputFormat:
    checked = _checked_schema(schema, where)
    return OutputFormat(kind, _compiled("json_schema", checked, where), schema=checked)


def _tools_format(tools: Sequence[Mapping[str, Any]],
                  choice: str | Mapping[str, Any] | None) -> OutputFormat | None:
    if not tools:
        raise ValidationError("tool_choice is set but no tools are given", field="tool_choice")
    params: dict[str, dict[str, Any]] = {}
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        function = tool.get("function") if isinstance(tool, Mapping) else None
        if not isinstance(function, Mapping) or tool.get("type", "function") != "function":
            raise ValidationError(f'{where} must be {{"type": "function", "function": '
                                  '{"name": ..., "parameters": {...}}}', field=where)
        name = function.get("name")
        if not isinstance(name, str) or not _TOOL_NAME.fullmatch(name):
            raise ValidationError(f"{where}.function.name must be 1-64 letters, digits, _ or -; "
                                  f"got {name!r}", field=f"{where}.function.name")
        if name in params:
            raise ValidationError(f"{where}: two tools are named {name!r}", field=where)
        params[name] = _checked_schema(
            function.get("parameters", {"type": "object", "properties": {}}),
            f"{where}.function.parameters")
    names = _chosen(choice, params)
    if not names:
        return None  # tool_choice "none": free text, tools not offered
    call: dict[str, Any] = (
        {"anyOf": [_call_schema(n, params[n]) for n in names]} if len(names) > 1
        else _call_schema(names[0], params[names[0]]))
    call["x-guidance"] = _COMPACT
    body = f"call: {json.dumps(_CALL_OPEN)} %json {json.dumps(call)} {json.dumps(_CALL_CLOSE)}\n"
    # auto: free text (not starting like a call) or one call; otherwise a call only.
    start = "start: /[^<][\\s\\S]*/ | call\n" if choice in (None, "auto") else "start: call\n"
    grammar = _compiled("lark", start + body, "tools")
    return OutputFormat("tools", grammar, tools={n: params[n] for n in names},
                        tool_prompt=_tool_prompt(tools))


def _chosen(choice: str | Mapping[str, Any] | None,
            params: Mapping[str, Any]) -> list[str]:
    if choice is None or choice in ("auto", "required"):
        return list(params)
    if choice == "none":
        return []
    if isinstance(choice, Mapping):
        function = choice.get("function")
        name = function.get("name") if isinstance(function, Mapping) else choice.get("name")
        if name in params:
            return [str(name)]
        raise ValidationError(f"tool_choice names {name!r}, which is not among the tools "
                              f"({', '.join(params)})", field="tool_choice")
    raise ValidationError(f"tool_choice must be auto, none, required or "
                          f'{{"type": "function", "function": {{"name": ...}}}}; got {choice!r}',
                          field="tool_choice")


def _call_schema(name: str, parameters: Mapping[str, Any]) -> dict[str, Any]:
    return {"type": "object",
            "properties": {"name": {"const": name}, "arguments": dict(parameters)},
            "required": ["name", "arguments"], "additionalProperties": False}


def _tool_prompt(tools: Sequence[Mapping[str, Any]]) -> str:
    # The Hermes / Qwen2.5 convention, which small instruct models have seen in training.
    listed = "\n".join(json.dumps(dict(t), ensure_ascii=False) for t in tools)
    return ("# Tools\n\nYou may call a function to assist with the user query.\n\n"
            "You are provided with function signatures within <tools></tools> XML tags:\n"
            f"<tools>\n{listed}\n</tools>\n\n"
            "To call a function, return a json object with the function name and arguments "
            "within <tool_call></tool_call> XML tags:\n<tool_call>\n"
            '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>')


def prompt_messages(messages: Sequence[Message], system_prompt: str | None,
                    fmt: OutputFormat | None, instruction: str | None = None
                    ) -> list[tuple[str, str]]:
    """(role, content) turns for the chat template: the agent's system prompt with the tools
    offered, and tool results as user turns wrapped in <tool_response> (Qwen2.5's way).
    `instruction` (a virtual member's part of the answer) ends the system turn."""
    turns = [(m.role, m.content) if m.role != "tool" else
             ("user", f"<tool_response>\n{m.content}\n</tool_response>") for m in messages]
    if system_prompt and not any(role == "system" for role, _ in turns):
        turns.insert(0, ("system", system_prompt))
    if instruction:
        if turns and turns[0][0] == "system":
            turns[0] = ("system", f"{turns[0][1]} {instruction}")
        else:
            turns.insert(0, ("system", instruction))
    tool_prompt = fmt.tool_prompt if fmt is not None else None
    if tool_prompt is None:
        return turns
    if turns and turns[0][0] == "system":
        turns[0] = ("system", f"{turns[0][1]}\n\n{tool_prompt}")
    else:
        turns.insert(0, ("system", tool_prompt))
    return turns


def check_output(fmt: OutputFormat, text: str, mask: MaskStats | None) -> CheckedOutput:
    """The decoded output, or OutputRejected saying why it is not what the format asks."""
    if mask is not None and not mask.complete:
        raise OutputRejected(f"the output was cut off after {mask.steps} tokens before the "
                             f"{fmt.kind} output was complete; raise max_tokens")
    if fmt.kind == "tools":
        return CheckedOutput(tool_calls=_tool_calls(fmt, text))
    if fmt.schema is None:
        return CheckedOutput(parsed=text)
    return CheckedOutput(parsed=_validated(text, fmt.schema, "the output"))


def _validated(text: str, schema: Mapping[str, Any], what: str) -> Any:
    from jsonschema.validators import validator_for

    try:
        value = json.loads(text)
    except ValueError as exc:
        raise OutputRejected(f"{what} is not JSON: {exc}") from None
    error = next(iter(validator_for(schema)(schema).iter_errors(value)), None)
    if error is not None:
        raise OutputRejected(f"{what} does not match its schema: {error.message}")
    return value


def _tool_calls(fmt: OutputFormat, text: str) -> tuple[ToolCall, ...]:
    if not text.startswith(_CALL_OPEN):
        return ()  # the model answered in text (tool_choice auto)
    if not text.endswith(_CALL_CLOSE):
        raise OutputRejected("the tool call is not closed by </tool_call>")
    body = text[len(_CALL_OPEN): -len(_CALL_CLOSE)]
    call = _validated(body, {"type": "object", "required": ["name", "arguments"]},
                      "the tool call")
    name = call["name"]
    if name not in fmt.tools:
        raise OutputRejected(f"the tool call names {name!r}, which was not offered")
    arguments = _validated(json.dumps(call["arguments"]), fmt.tools[name],
                           f"the arguments of {name}")
    # Named by its content: the same call has the same id in a replay.
    call_id = "call_" + hashlib.sha256(body.encode()).hexdigest()[:24]
    return (ToolCall(call_id, name, arguments),)
