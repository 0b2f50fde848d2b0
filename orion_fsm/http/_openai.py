"""The OpenAI wire format: request bodies read into engine calls, Results and text chunks
written as OpenAI's responses, chunks and errors (with our `orion` object riding along).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from orion_fsm import RequestFailed, Result, ToolCall

AUTO: Final = "auto"  # the model id that lets the router pick the agent
EMBEDDING_MODEL: Final = "all-MiniLM-L6-v2"
RETRY_AFTER_S: Final = 1
# Engine field names that OpenAI spells differently.
_PARAM_NAMES: Final = {"agent": "model"}


class ApiError(Exception):
    """An error answered in OpenAI's shape: `{"error": {message, type, param, code}}`."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: Mapping[str, str] | None = None,
                 result: Result | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type = status, message, type
        self.param, self.code = param, code
        self.headers = dict(headers or {})
        self.result = result

    def body(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"error": {"message": self.message, "type": self.type,
                                         "param": self.param, "code": self.code}}
        if self.result is not None:
            doc["orion"] = orion_object(self.result)
        return doc


def failure(exc: RequestFailed) -> ApiError:
    """The HTTP status and error of a request that ended in `error`, by its reason."""
    result = exc.result if isinstance(exc.result, Result) else None
    field_name = result.error_field if result is not None else None
    reason, message = exc.reason, exc.message
    if reason == "invalid" and field_name == "agent":
        return ApiError(404, message, param="model", code="model_not_found", result=result)
    if reason == "invalid":
        param = _PARAM_NAMES.get(field_name or "", field_name)
        return ApiError(400, message, param=param, code="invalid_value", result=result)
    if reason == "overloaded":
        return ApiError(503, message, type="server_error", code="overloaded",
                        headers={"retry-after": str(RETRY_AFTER_S)}, result=result)
    if reason == "timeout":
        return ApiError(504, message, type="server_error", code="timeout", result=result)
    if reason == "cancelled":  # nginx's "client closed request": nobody reads it
        return ApiError(499, message, type="server_error", code="cancelled", result=result)
    return ApiError(500, message, type="server_error", code=reason, result=result)


# --- requests -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Generation:
    """One chat or completion request, as engine arguments."""

    prompt: list[dict[str, str]]
    agent: str | None  # None: the router picks
    model: str  # as the client named it
    stream: bool
    params: dict[str, Any] = field(default_factory=dict)
    tools: bool = False  # tools were offered: a streamed answer may be a call, sent whole


def parse_json(body: bytes) -> dict[str, Any]:
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise ApiError(400, "the request body is not valid JSON") from None
    if not isinstance(doc, dict):
        raise ApiError(400, "the request body must be a JSON object")
    return doc


def _model(doc: Mapping[str, Any]) -> tuple[str, str | None]:
    model = doc.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(400, f"model must be an agent id or {AUTO!r}, got {model!r}",
                       param="model")
    return model, None if model == AUTO else model


def _text(content: object, where: str) -> str:
    """A message's content: a string, or OpenAI's list of text parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for i, part in enumerate(content):
            if not (isinstance(part, dict) and part.get("type") == "text"
                    and isinstance(part.get("text"), str)):
                raise ApiError(400, f"{where}[{i}] must be a text part "
                               '({"type": "text", "text": ...}); only text is served',
                               param=where)
            parts.append(part["text"])
        return "".join(parts)
    raise ApiError(400, f"{where} must be a string or a list of text parts, got {content!r}",
                   param=where)


def _params(doc: Mapping[str, Any]) -> dict[str, Any]:
    """The sampling fields the engine takes. Fields it does not (`user`, `metadata`,
    `logit_bias`, penalties, ...) are accepted and ignored, as OpenAI-compatible servers do."""
    n = doc.get("n")
    if n not in (None, 1):
        raise ApiError(400, f"n must be 1 (one choice per request), got {n!r}", param="n")
    max_tokens = doc.get("max_completion_tokens", doc.get("max_tokens"))
    stop = doc.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    elif stop is not None and not (isinstance(stop, list)
                                   and all(isinstance(s, str) for s in stop)):
        raise ApiError(400, f"stop must be a string or a list of strings, got {stop!r}",
                       param="stop")
    params = {"max_tokens": max_tokens, "temperature": doc.get("temperature"),
              "top_p": doc.get("top_p"), "seed": doc.get("seed"), "stop": stop or None}
    for name, value in params.items():
        # The engine checks ranges and names the field; NaN and friends never reach JSON.
        if isinstance(value, float) and not math.isfinite(value):
            raise ApiError(400, f"{name} must be finite", param=name)
    return params


def _stream(doc: Mapping[str, Any]) -> bool:
    stream = doc.get("stream", False)
    if not isinstance(stream, bool) and stream is not None:
        raise ApiError(400, f"stream must be true or false, got {stream!r}", param="stream")
    return bool(stream)


def chat_request(doc: Mapping[str, Any]) -> Generation:
    model, agent = _model(doc)
    messages = doc.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list of {role, content} objects",
                       param="messages")
    prompt = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ApiError(400, f"messages[{i}] must be an object with role and content",
                           param=f"messages[{i}]")
        role = message.get("role")
        role = "system" if role == "developer" else role  # OpenAI's newer name for it
        calls = message.get("tool_calls") if role == "assistant" else None
        content = (_call_text(calls, f"messages[{i}].tool_calls") if calls
                   else _text(message.get("content"), f"messages[{i}].content"))
        prompt.append({"role": str(role), "content": content})
    tools = doc.get("tools")
    params = {**_params(doc), **_extensions(doc), "tools": tools,
              "tool_choice": doc.get("tool_choice")}
    return Generation(prompt, agent, model, _stream(doc), params, tools=bool(tools))


def _call_text(calls: object, where: str) -> str:
    """An assistant turn that called a tool, back as the text the model wrote for it (the
    engine's `<tool_call>` convention): the history a client sends reads as it was said."""
    if not (isinstance(calls, list) and len(calls) == 1 and isinstance(calls[0], dict)):
        raise ApiError(400, f"{where} must be a list of one tool call (one call per answer)",
                       param=where)
    function = calls[0].get("function")
    name = function.get("name") if isinstance(function, dict) else None
    arguments = function.get("arguments") if isinstance(function, dict) else None
    try:
        parsed = json.loads(arguments) if isinstance(arguments, str) else None
    except ValueError:
        parsed = None
    if not isinstance(name, str) or not isinstance(parsed, dict):
        raise ApiError(400, f"{where}[0].function must have a name and JSON object arguments "
                       "(as the server returned them)", param=where)
    return ToolCall(str(calls[0].get("id") or ""), name, parsed).as_text()


def _extensions(doc: Mapping[str, Any]) -> dict[str, Any]:
    """What OpenAI's API does not have and the engine does, as top-level body fields (the
    openai client's `extra_body`): the output format, and a context store to answer from."""
    return {"response_format": doc.get("response_format"), "context": doc.get("context"),
            "context_top_k": doc.get("context_top_k")}


def completion_request(doc: Mapping[str, Any]) -> Generation:
    model, agent = _model(doc)
    prompt = doc.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise ApiError(400, "prompt must be a string (one prompt per request)", param="prompt")
    return Generation([{"role": "user", "content": prompt}], agent, model, _stream(doc),
                      {**_params(doc), **_extensions(doc)})


def embedding_inputs(doc: Mapping[str, Any]) -> tuple[list[str], str]:
    model = doc.get("model")
    if model != EMBEDDING_MODEL:
        raise ApiError(404, f"unknown embedding model {model!r}; this server embeds with "
                       f"{EMBEDDING_MODEL!r}", param="model", code="model_not_found")
    texts = doc.get("input")
    if isinstance(texts, str):
        texts = [texts]
    if not (isinstance(texts, list) and texts and all(isinstance(t, str) for t in texts)):
        raise ApiError(400, "input must be a string or a non-empty list of strings "
                       "(token arrays are not accepted)", param="input")
    encoding = doc.get("encoding_format", "float")
    if encoding not in ("float", "base64"):
        raise ApiError(400, f"encoding_format must be 'float' or 'base64', got {encoding!r}",
                       param="encoding_format")
    return texts, encoding


# --- responses ------------------------------------------------------------------------------


def orion_object(result: Result) -> dict[str, Any]:
    """Our extras in a body: the Result without its text (already in the choices)."""
    doc = result.as_dict()
    del doc["text"]
    return doc


def _finish_reason(result: Result) -> str:
    if result.tool_calls:
        return "tool_calls"
    return "length" if result.finish_reason == "length" else "stop"


def _message(result: Result) -> dict[str, Any]:
    if result.tool_calls:
        return {"role": "assistant", "content": None,
                "tool_calls": [call.as_dict() for call in result.tool_calls]}
    return {"role": "assistant", "content": result.text}


def _usage(result: Result) -> dict[str, int]:
    return {"prompt_tokens": result.tokens.input, "completion_tokens": result.tokens.output,
            "total_tokens": result.tokens.input + result.tokens.output}


def response_id(kind: str, request_id: str) -> str:
    return f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{request_id}"


def completion_body(kind: str, result: Result, created: int) -> dict[str, Any]:
    choice: dict[str, Any] = {"index": 0, "finish_reason": _finish_reason(result),
                              "logprobs": None}
    if kind == "chat":
        choice["message"] = _message(result)
    else:
        choice["text"] = result.text
    return {"id": response_id(kind, result.request_id),
            "object": "chat.completion" if kind == "chat" else "text_completion",
            "created": created, "model": result.agent, "system_fingerprint": None,
            "choices": [choice], "usage": _usage(result), "orion": orion_object(result)}


class Chunks:
    """Server-Sent Events of one streamed response: OpenAI's chunk objects, then `[DONE]`."""

    def __init__(self, kind: str, request_id: str, model: str, created: int) -> None:
        self.kind, self.model, self.created = kind, model, created
        self.id = response_id(kind, request_id)
        self._first = True

    def _event(self, choice: dict[str, Any], **extra: Any) -> bytes:
        doc = {"id": self.id,
               "object": "chat.completion.chunk" if self.kind == "chat" else "text_completion",
               "created": self.created, "model": self.model, "system_fingerprint": None,
               "choices": [choice], **extra}
        return b"data: " + json.dumps(doc, ensure_ascii=False).encode() + b"\n\n"

    def text(self, text: str) -> bytes:
        if self.kind == "chat":
            delta = {"content": text}
            if self._first:
                delta = {"role": "assistant", **delta}
            self._first = False
            return self._event({"index": 0, "delta": delta, "finish_reason": None,
                                "logprobs": None})
        return self._event({"index": 0, "text": text, "finish_reason": None, "logprobs": None})

    def calls(self, result: Result) -> bytes:
        """A chat answer held back until it ended (tools were offered): its tool call as one
        delta in OpenAI's shape, or its text as one content delta."""
        if not result.tool_calls:
            return self.text(result.text)
        self._first = False
        calls = [{"index": i, **call.as_dict()} for i, call in enumerate(result.tool_calls)]
        return self._event({"index": 0, "delta": {"role": "assistant", "content": None,
                                                  "tool_calls": calls},
                            "finish_reason": None, "logprobs": None})

    def end(self, result: Result) -> bytes:
        """The last chunk (finish reason, usage, our extras) and the `[DONE]` sentinel."""
        self.model = result.agent or self.model
        prefix = self.text("") if self.kind == "chat" and self._first else b""
        empty: dict[str, Any] = {"delta": {}} if self.kind == "chat" else {"text": ""}
        last = self._event({"index": 0, **empty, "finish_reason": _finish_reason(result),
                            "logprobs": None}, usage=_usage(result),
                           orion=orion_object(result))
        return prefix + last + b"data: [DONE]\n\n"

    @staticmethod
    def error(error: ApiError) -> bytes:
        """A failure after the stream started: OpenAI's clients raise on an `error` event."""
        return (b"data: " + json.dumps(error.body(), ensure_ascii=False).encode() + b"\n\n"
                + b"data: [DONE]\n\n")


def server_timing(result: Result) -> str:
    """The phase timeline as a Server-Timing header (browsers' devtools draw it)."""
    return ", ".join(f"{p.state};dur={p.ms:.3f}" for p in result.phases)


def result_headers(result: Result) -> dict[str, str]:
    return {"x-orion-request-id": result.request_id, "x-orion-trace-id": result.trace_id,
            "x-orion-agent": result.agent or "", "x-orion-cache": result.cache or "miss",
            "server-timing": server_timing(result)}
