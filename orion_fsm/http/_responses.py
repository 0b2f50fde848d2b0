"""Answers that watch the client: a request runs while a task listens for `http.disconnect`,
and a client that leaves cancels it (the generation stops; the request ends `cancelled`).
Streams start only with their first text, so an error before it still gets its HTTP status.
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable, Mapping
from contextlib import aclosing
from typing import Any

import anyio
from starlette.types import Receive, Scope, Send

from orion_fsm import RequestFailed, ResponseStream

from ._openai import ApiError, Chunks, completion_body, failure, result_headers


def _raw(headers: Mapping[str, str]) -> list[tuple[bytes, bytes]]:
    return [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]


async def send_json(send: Send, status: int, doc: Any,
                    headers: Mapping[str, str] | None = None) -> None:
    body = json.dumps(doc, ensure_ascii=False).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": _raw({"content-type": "application/json",
                                 "content-length": str(len(body)), **(headers or {})})})
    await send({"type": "http.response.body", "body": body})


async def send_error(send: Send, error: ApiError) -> None:
    await send_json(send, error.status, error.body(), error.headers)


async def _start_events(send: Send, headers: Mapping[str, str]) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": _raw({
        "content-type": "text/event-stream; charset=utf-8", "cache-control": "no-cache",
        "x-accel-buffering": "no", **headers})})  # no proxy buffering of the events


class Watched:
    """An ASGI response running `answer(send)` until done or until the client disconnects."""

    def __init__(self, answer: Callable[[Send], Awaitable[None]]) -> None:
        self._answer = answer

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async with anyio.create_task_group() as tg:

            async def watch() -> None:
                # The body was read before: what comes now is the disconnect.
                while (await receive())["type"] != "http.disconnect":
                    pass
                tg.cancel_scope.cancel()

            tg.start_soon(watch)
            await self._answer(send)
            tg.cancel_scope.cancel()


def completion(kind: str, run: Callable[[], Awaitable[Any]]) -> Watched:
    """A non-streamed chat or text completion: `run()` is the engine's `infer`."""

    async def answer(send: Send) -> None:
        try:
            result = await run()
        except RequestFailed as exc:
            await send_error(send, failure(exc))
            return
        await send_json(send, 200, completion_body(kind, result, int(time.time())),
                        result_headers(result))

    return Watched(answer)


def event_stream(kind: str, stream: ResponseStream, model: str, *,
                 whole: bool = False) -> Watched:
    """A streamed chat or text completion: Server-Sent Events from the first text on.
    `whole` (tools were offered) holds the answer back until it ends: only then is it known
    to be a tool call, which OpenAI's clients expect as `tool_calls`, not as text."""

    async def answer(send: Send) -> None:
        chunks = Chunks(kind, stream.request_id, model, int(time.time()))
        started = False
        # aclosing: a client gone mid-stream closes the engine's stream here, which stops the
        # generation and ends the request `cancelled`, with its trace line.
        async with aclosing(stream):
            try:
                async for text in stream:
                    if whole:
                        continue
                    if not started:
                        await _start_events(send, {"x-orion-request-id": stream.request_id})
                        started = True
                    await send({"type": "http.response.body", "body": chunks.text(text),
                                "more_body": True})
                result = stream.result
            except RequestFailed as exc:
                if not started:
                    await send_error(send, failure(exc))
                    return
                body = Chunks.error(failure(exc))
            else:
                # Held back: the whole answer first (which opens the message), then the end.
                body = chunks.calls(result) if whole else b""
                body += chunks.end(result)
                if not started:  # nothing generated: still a stream, with its last chunk
                    await _start_events(send, result_headers(result))
        await send({"type": "http.response.body", "body": body, "more_body": False})

    return Watched(answer)
