"""`orion-fsm serve`: one warm Engine behind an OpenAI-compatible HTTP API, /health and
Prometheus /metrics; other commands reach it with `--server URL`. SIGTERM drains.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from opentelemetry.metrics import MeterProvider

from orion_fsm import (
    API_KEY_ENV,
    DEFAULT_HTTP_HOST,
    DEFAULT_HTTP_PORT,
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_SHUTDOWN_GRACE_S,
    TRACE_FILE_ENV,
    Engine,
)

from ._common import add_rerank_option


def add_parser(sub: Any) -> None:
    serve = sub.add_parser("serve", help="serve the engine over HTTP (OpenAI-compatible API, "
                           "/health, /metrics)")
    serve.add_argument("--host", default=DEFAULT_HTTP_HOST,
                       help=f"address to listen on (default: {DEFAULT_HTTP_HOST})")
    serve.add_argument("--port", type=int, default=DEFAULT_HTTP_PORT,
                       help=f"port (default: {DEFAULT_HTTP_PORT}; 0 picks a free one)")
    serve.add_argument("--api-key", default=os.environ.get(API_KEY_ENV),
                       help=f"require `Authorization: Bearer KEY` (default: ${API_KEY_ENV})")
    serve.add_argument("--allow-insecure-bind", action="store_true",
                       help="serve a non-loopback address without an API key")
    serve.add_argument("--router", choices=("embedding", "rules"), default="embedding",
                       help="how `model: auto` picks the agent (default: embedding)")
    serve.add_argument("--trace-file", default=os.environ.get(TRACE_FILE_ENV),
                       help="JSONL trace file (default: traces/orion-fsm.jsonl)")
    serve.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES,
                       help=f"largest request body accepted (default: {DEFAULT_MAX_BODY_BYTES})")
    serve.add_argument("--max-in-flight", type=int,
                       help="requests generating at once (default: the engine's)")
    serve.add_argument("--max-queue", type=int,
                       help="requests waiting past that; more get 503 (default: the engine's)")
    serve.add_argument("--timeout", type=float, help="deadline per request, seconds")
    serve.add_argument("--batch-window-ms", type=float,
                       help="how long a burst's routing embeddings wait for one another; a lone "
                       "request never waits (default: the engine's, 50; 0 turns it off)")
    serve.add_argument("--stream-interval-ms", type=float,
                       help="a stream sends text at most this often after its first token, "
                       "what was made meanwhile as one chunk (default: the engine's, 20; 0: "
                       "every token at once)")
    serve.add_argument("--grace", type=int, default=DEFAULT_SHUTDOWN_GRACE_S,
                       help="on SIGTERM, seconds in-flight requests get to finish before they "
                       f"are cancelled (default: {DEFAULT_SHUTDOWN_GRACE_S})")
    serve.add_argument("--threads", type=int, help="ggml threads per model")
    add_rerank_option(serve)
    serve.add_argument("--access-log", action="store_true", help="log every HTTP request")
    serve.set_defaults(handler=_serve)


def _serve(args: argparse.Namespace) -> int:
    # Here, not at the top: the other commands never pay for the server's imports.
    from orion_fsm.http import bind, check_bind, create_app, run_server, url_of

    check_bind(args.host, args.api_key, allow_insecure=args.allow_insecure_bind)
    limits = {name: value for name, value in (("max_in_flight", args.max_in_flight),
                                              ("max_queue", args.max_queue),
                                              ("timeout_s", args.timeout),
                                              ("batch_window_ms", args.batch_window_ms),
                                              ("stream_interval_ms", args.stream_interval_ms),
                                              ("threads", args.threads)) if value is not None}

    def engine(meter_provider: MeterProvider) -> Engine:
        return Engine(registry=args.registry, trace_path=args.trace_file,
                      cache_dir=args.cache_dir, meter_provider=meter_provider,
                      embeddings=None if args.router == "embedding" else False,
                      rerank=args.rerank, **limits)

    app = create_app(engine, api_key=args.api_key, max_body_bytes=args.max_body_bytes)
    sock = bind(args.host, args.port)
    url = url_of(sock)
    print(f"orion-fsm serving on {url}  (OpenAI base URL {url}/v1; GET /health is ready "
          f"once the engine is)", file=sys.stderr, flush=True)
    run_server(app, sock, grace_s=args.grace, access_log=args.access_log)
    return 0
