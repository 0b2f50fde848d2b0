"""`--server URL` (or $ORION_FSM_SERVER): the commands ask a running `orion-fsm serve` instead
of starting an Engine, so nothing loads between commands. An httpx client of its endpoints.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, Final

from orion_fsm import (
    API_KEY_ENV,
    SERVER_ENV,
    Citation,
    OrionError,
    PhaseTiming,
    RequestFailed,
    Result,
    TokenUsage,
    ToolCall,
)

if TYPE_CHECKING:
    import httpx

_CONNECT_TIMEOUT_S: Final = 10.0  # reads wait as long as a generation takes


def add_server_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--server", metavar="URL", default=os.environ.get(SERVER_ENV),
                        help=f"ask this running `orion-fsm serve` (default: ${SERVER_ENV}; "
                        "unset: work in-process)")
    parser.add_argument("--api-key", default=os.environ.get(API_KEY_ENV),
                        help=f"the server's API key (default: ${API_KEY_ENV})")


def result_from(doc: dict[str, Any], text: str | None) -> Result:
    """A Result from the `orion` object of a response (its `as_dict()` without the text;
    None: the answer was a tool call, whose text is the call as the model wrote it)."""
    calls = tuple(ToolCall(c["id"], c["function"]["name"], json.loads(c["function"]["arguments"]))
                  for c in doc.get("tool_calls") or ())
    if text is None:
        text = "".join(call.as_text() for call in calls)
    return Result(
        request_id=doc["request_id"], trace_id=doc["trace_id"], state=doc["state"], text=text,
        agent=doc["agent"], requested_agent=doc["requested_agent"], fallback=doc["fallback"],
        agents_tried=tuple(doc["agents_tried"]),
        phases=tuple(PhaseTiming(p["state"], p["start_ms"], p["ms"]) for p in doc["phases"]),
        tokens=TokenUsage(doc["tokens"]["input"], doc["tokens"]["output"]),
        ttft_ms=doc["ttft_ms"], total_ms=doc["total_ms"], finish_reason=doc["finish_reason"],
        error=doc["error"], error_reason=doc["error_reason"], routing=doc["routing"],
        cache=doc["cache"], error_field=doc.get("error_field"), parsed=doc.get("parsed"),
        tool_calls=calls,
        citations=tuple(Citation(**c) for c in doc.get("citations") or ()))


def _failed(doc: dict[str, Any], text: str = "") -> RequestFailed:
    error = doc.get("error") or {}
    orion = doc.get("orion")
    result = result_from(orion, text) if isinstance(orion, dict) else None
    reason = result.error_reason if result is not None else error.get("code")
    return RequestFailed(str(error.get("message", "the server refused the request")),
                         reason=reason or "error",
                         request_id=result.request_id if result else None, result=result)


def _events(lines: Iterator[str] | list[str]) -> Iterator[dict[str, Any]]:
    for line in lines:
        if line.startswith("data: ") and line != "data: [DONE]":
            yield json.loads(line[6:])


class Remote:
    """The endpoints of one server, for one command."""

    def __init__(self, client: httpx.AsyncClient, url: str) -> None:
        self._client = client
        self.url = url

    async def get(self, path: str) -> Any:
        response = await self._client.get(path)
        return self._json(response)

    async def post(self, path: str, doc: dict[str, Any]) -> Any:
        response = await self._client.post(path, json=doc)
        return self._json(response)

    def _json(self, response: httpx.Response) -> Any:
        doc = response.json()
        if response.status_code != 200:
            message = doc.get("error", {}).get("message") if isinstance(doc, dict) else doc
            raise OrionError(f"{self.url} answered {response.status_code}: {message}")
        return doc

    async def chat(self, body: dict[str, Any]) -> Result:
        """One non-streamed chat completion; RequestFailed as the engine would raise it."""
        response = await self._client.post("/v1/chat/completions", json=body)
        doc = response.json()
        if response.status_code != 200:
            raise _failed(doc)
        return result_from(doc["orion"], doc["choices"][0]["message"]["content"])

    async def stream_chat(self, body: dict[str, Any]) -> AsyncIterator[str | Result]:
        """Text as it comes, then the Result; RequestFailed as the engine would raise it."""
        parts: list[str] = []
        async with self._client.stream("POST", "/v1/chat/completions",
                                       json={**body, "stream": True}) as response:
            if response.status_code != 200:
                raise _failed(json.loads(await response.aread()))
            async for line in response.aiter_lines():
                for event in _events([line]):
                    if "error" in event:
                        raise _failed(event, "".join(parts))
                    delta = event["choices"][0].get("delta") or {}
                    if delta.get("tool_calls"):
                        continue  # the Result at the end carries the call
                    text = delta.get("content") or ""
                    if text:
                        parts.append(text)
                        yield text
                    if "orion" in event:
                        yield result_from(event["orion"], "".join(parts) or None)


@asynccontextmanager
async def connect(args: argparse.Namespace) -> AsyncIterator[Remote]:
    import httpx  # only the commands that talk to a server pay for it

    url = str(args.server).rstrip("/")
    headers = {"authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    timeout = httpx.Timeout(_CONNECT_TIMEOUT_S, read=None)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=timeout) as client:
        try:
            yield Remote(client, url)
        except httpx.TransportError as exc:
            raise OrionError(f"cannot reach the server at {url} ({exc}); start one with "
                             "`orion-fsm serve`, or drop --server to work in-process") from None
