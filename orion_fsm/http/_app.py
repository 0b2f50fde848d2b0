"""The ASGI app: OpenAI-compatible endpoints, /health, /metrics and the views the CLI's
`--server` mode reads, over one Engine entered in the app's lifespan. A client of the
public `orion_fsm` API, like the CLI.
"""

from __future__ import annotations

import base64
import hmac
import struct
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any, Final

import anyio
import anyio.to_thread
from opentelemetry.metrics import MeterProvider
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from orion_fsm import (
    DEFAULT_MAX_BODY_BYTES,
    EmbeddingError,
    EmbeddingRouter,
    Engine,
    FeedbackError,
    OrionError,
    find_traces,
)

from ._openai import (
    AUTO,
    EMBEDDING_MODEL,
    ApiError,
    Generation,
    chat_request,
    completion_request,
    embedding_inputs,
    parse_json,
)
from ._responses import completion, event_stream, send_error, send_json

EngineFactory = Callable[[MeterProvider], Engine]
_TRACE_POLLS, _TRACE_POLL_S = 100, 0.02
_OPEN_PATHS: Final = frozenset({"/health"})  # reachable without the API key (probes)


class _KeyAndSize:
    """ASGI middleware: the bearer API key (constant-time compare, never logged) and the body
    size limit, before any endpoint runs."""

    def __init__(self, app: ASGIApp, api_key: str | None, max_body_bytes: int) -> None:
        self.app = app
        self._key = api_key.encode() if api_key else None
        self._limit = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        if self._key is not None and scope["path"] not in _OPEN_PATHS:
            given = headers.get(b"authorization", b"")
            scheme, _, token = given.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self._key):
                await send_error(send, ApiError(
                    401, "missing or wrong API key: send `Authorization: Bearer KEY`",
                    code="invalid_api_key", headers={"www-authenticate": "Bearer"}))
                return
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self._limit:
            await send_error(send, _too_large(self._limit))
            return
        await self.app(scope, receive, send)


def _too_large(limit: int) -> ApiError:
    return ApiError(413, f"the request body is larger than {limit} bytes",
                    code="request_too_large")


async def _body(request: Request, limit: int) -> dict[str, Any]:
    """The JSON body, read up to `limit` bytes (a chunked upload has no Content-Length)."""
    parts, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        parts.append(chunk)
    return parse_json(b"".join(parts))


class _Endpoint:
    """An endpoint whose ApiErrors are answered in OpenAI's shape."""

    def __init__(self, handle: Callable[[Request], Any]) -> None:
        self._handle = handle

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive)
        try:
            answer = await self._handle(request)
        except ApiError as error:
            await send_error(send, error)
            return
        await answer(scope, receive, send)


def create_app(engine: Engine | EngineFactory, *, api_key: str | None = None,
               max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
               metrics_registry: CollectorRegistry | None = None) -> Starlette:
    """The ASGI app serving `engine` (entered in the app's lifespan: one Engine per app).

    Given a factory, the app builds the Engine on a MeterProvider whose metrics `/metrics`
    exposes (a Prometheus registry of its own); given an Engine, `/metrics` exposes
    `metrics_registry` (default: prometheus_client's global registry, where an application
    that set up OpenTelemetry's PrometheusMetricReader finds them).
    """
    if isinstance(engine, Engine):
        served = engine
        registry = metrics_registry or REGISTRY
    else:
        from opentelemetry.exporter.prometheus import PrometheusMetricReader
        from opentelemetry.sdk.metrics import MeterProvider as SdkMeterProvider

        registry = metrics_registry or CollectorRegistry()
        reader = PrometheusMetricReader(registry=registry)
        served = engine(SdkMeterProvider(metric_readers=[reader]))
    ready = routed = False

    async def prepare_router(router: EmbeddingRouter) -> None:
        nonlocal routed
        # The examples' index is built on the first route otherwise: not on a user's request.
        await router.prepare()  # False: routing degrades to the rules, nothing to wait for
        routed = True

    @asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        nonlocal ready
        async with served, anyio.create_task_group() as tasks:
            if isinstance(served.router, EmbeddingRouter):
                tasks.start_soon(prepare_router, served.router)
            ready = True
            try:
                yield
            finally:
                ready = False
                tasks.cancel_scope.cancel()

    async def generate(kind: str, request: Request) -> Any:
        doc = await _body(request, max_body_bytes)
        spec: Generation = chat_request(doc) if kind == "chat" else completion_request(doc)
        if spec.stream:
            return event_stream(kind, served.stream(spec.prompt, agent=spec.agent,
                                                    **spec.params), spec.model,
                                whole=spec.tools)
        return completion(kind, lambda: served.infer(spec.prompt, agent=spec.agent,
                                                     **spec.params))

    async def chat(request: Request) -> Any:
        return await generate("chat", request)

    async def completions(request: Request) -> Any:
        return await generate("text", request)

    async def embeddings(request: Request) -> Any:
        texts, encoding = embedding_inputs(await _body(request, max_body_bytes))
        try:
            vectors = await served.embed(texts)
        except EmbeddingError as exc:
            raise ApiError(503, exc.message, type="server_error",
                           code="embeddings_unavailable") from None
        data = [{"object": "embedding", "index": i,
                 "embedding": (base64.b64encode(struct.pack(f"<{len(v)}f", *v)).decode()
                               if encoding == "base64" else v)}
                for i, v in enumerate(vectors)]
        tokens = _embedding_tokens(served, texts)
        return _json({"object": "list", "data": data, "model": EMBEDDING_MODEL,
                      "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})

    def model_objects() -> list[dict[str, Any]]:
        created = int(served.registry.source.stat().st_mtime) if served.registry.source else 0
        models = [{"id": AUTO, "object": "model", "created": created, "owned_by": "orion-fsm",
                   "orion": {"role": "router", "default_agent": served.registry.default_agent}}]
        for spec in served.registry.agents.values():
            models.append({"id": spec.id, "object": "model", "created": created,
                           "owned_by": "orion-fsm",
                           "orion": {"role": spec.role, "description": spec.description,
                                     "capabilities": list(spec.capabilities),
                                     "context_length": spec.context_length,
                                     "fallback": spec.fallback}})
        for virtual in served.registry.virtual.values():
            # Requested by name like any agent: its members answer in parallel, then fused.
            models.append({"id": virtual.id, "object": "model", "created": created,
                           "owned_by": "orion-fsm",
                           "orion": {"role": "virtual", "description": virtual.description,
                                     "members": [{"agent": m.agent, "role": m.role,
                                                  "weight": m.weight}
                                                 for m in virtual.members],
                                     "fusion": virtual.strategy, "weights": virtual.weights,
                                     "early_stop": virtual.early_stop,
                                     "context_length": served.registry.context_length(
                                         virtual.id),
                                     "fallback": virtual.fallback}})
        if served.embeddings is not None:
            models.append({"id": EMBEDDING_MODEL, "object": "model", "created": created,
                           "owned_by": "orion-fsm", "orion": {"role": "embeddings"}})
        return models

    async def list_models(_: Request) -> Any:
        return _json({"object": "list", "data": model_objects()})

    async def get_model(request: Request) -> Any:
        wanted = request.path_params["model"]
        for model in model_objects():
            if model["id"] == wanted:
                return _json(model)
        raise ApiError(404, f"unknown model {wanted!r}; GET /v1/models lists them",
                       param="model", code="model_not_found")

    async def health(_: Request) -> Any:
        service = served.embeddings
        # warming: registry examples still being embedded; a new prompt may wait a batch.
        warming = service is not None and (
            service.stats()["warm_queued"] > 0
            or (isinstance(served.router, EmbeddingRouter) and not routed))
        embeddings = ("off" if service is None else "loading" if not service.loaded
                      else "warming" if warming else "ready")
        doc = {"status": "ready" if ready else "starting", "embeddings": embeddings,
               "agents": list(served.registry.agents)}
        return _json(doc, 200 if ready else 503)

    async def metrics(_: Request) -> Any:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    async def feedback(request: Request) -> Any:
        doc = await _body(request, max_body_bytes)
        request_id = doc.get("request_id")
        score: Any = doc.get("score")  # checked by the engine, which names what is wrong
        if not isinstance(request_id, str) or not request_id:
            raise ApiError(400, "request_id must be the id of an answer (orion.request_id "
                           "of a completion)", param="request_id")
        try:
            record = await served.feedback(request_id, score, doc.get("correction"))
        except FeedbackError as exc:
            status, code = ((404, "request_not_found") if exc.field == "request_id" else
                            (400, None) if exc.field else (503, "feedback_unavailable"))
            raise ApiError(status, exc.message, param=exc.field, code=code,
                           type="invalid_request_error" if status < 500 else "server_error"
                           ) from None
        return _json({"object": "feedback", "request_id": record.request_id,
                      "trace_id": record.trace_id, "agent": record.agent,
                      "score": record.score, "correction": record.correction is not None})

    # --- what `orion-fsm … --server URL` reads -----------------------------------------------

    async def route(request: Request) -> Any:
        text = (await _body(request, max_body_bytes)).get("text")
        if not isinstance(text, str) or not text:
            raise ApiError(400, "text must be a non-empty string", param="text")
        router = served.router
        if isinstance(router, EmbeddingRouter):
            try:
                return _json((await router.explain(text)).as_dict())
            except EmbeddingError:
                pass  # degraded to the rules, as the engine's routing phase does
        return _json((await router.route(text, requested=None)).as_dict())

    async def mem(_: Request) -> Any:
        return _json(served.memory.sample().as_dict())  # now, not the last periodic sample

    async def breakers(_: Request) -> Any:
        return _json({"breakers": served.breakers.snapshot()})

    async def cache(_: Request) -> Any:
        return _json({"levels": served.cache_stats()})

    async def stats(_: Request) -> Any:
        loader = served.loader.stats
        return _json({"admission": served.admission.snapshot(),
                      "loader": {"loads": loader.loads, "unloads": loader.unloads,
                                 "evictions": loader.evictions, "refusals": loader.refusals,
                                 "models": [m.label for m in served.loader.models()]}})

    async def trace(request: Request) -> Any:
        path, wanted = served.trace_path, request.path_params["request_id"]
        if path is None:
            raise ApiError(404, "this server writes no trace file", code="tracing_off")
        # The writer appends in the background, within milliseconds of the answer.
        for _ in range(_TRACE_POLLS):
            if path.is_file():
                try:
                    records = await anyio.to_thread.run_sync(find_traces, path, wanted)
                    return _json(records[-1])
                except OrionError:
                    pass
            await anyio.sleep(_TRACE_POLL_S)
        raise ApiError(404, f"no request {wanted!r} in {path}", param="request_id",
                       code="trace_not_found")

    routes = [
        Route("/v1/chat/completions", _Endpoint(chat), methods=["POST"]),
        Route("/v1/completions", _Endpoint(completions), methods=["POST"]),
        Route("/v1/embeddings", _Endpoint(embeddings), methods=["POST"]),
        Route("/v1/feedback", _Endpoint(feedback), methods=["POST"]),
        Route("/v1/models", _Endpoint(list_models), methods=["GET"]),
        Route("/v1/models/{model:path}", _Endpoint(get_model), methods=["GET"]),
        Route("/health", _Endpoint(health), methods=["GET"]),
        Route("/metrics", _Endpoint(metrics), methods=["GET"]),
        Route("/v1/orion/route", _Endpoint(route), methods=["POST"]),
        Route("/v1/orion/mem", _Endpoint(mem), methods=["GET"]),
        Route("/v1/orion/breakers", _Endpoint(breakers), methods=["GET"]),
        Route("/v1/orion/cache", _Endpoint(cache), methods=["GET"]),
        Route("/v1/orion/stats", _Endpoint(stats), methods=["GET"]),
        Route("/v1/orion/traces/{request_id}", _Endpoint(trace), methods=["GET"]),
    ]
    app = Starlette(routes=routes, lifespan=lifespan)
    app.add_middleware(_KeyAndSize, api_key=api_key, max_body_bytes=max_body_bytes)
    return app


class _Json:
    def __init__(self, doc: Any, status: int) -> None:
        self.doc, self.status = doc, status

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send_json(send, self.status, self.doc)


def _json(doc: Any, status: int = 200) -> _Json:
    return _Json(doc, status)


def _embedding_tokens(engine: Engine, texts: list[str]) -> int:
    """Tokens the embedding model read, by its own tokenizer (loaded: embed() just ran)."""
    model = engine.embeddings.model if engine.embeddings is not None else None
    if model is None:
        return 0
    return sum(len(ids) for ids in model.tokenizer(texts)["input_ids"])

