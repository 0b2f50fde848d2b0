"""orion_fsm.http: the Engine over HTTP, in OpenAI's wire format (chat, completions, embeddings,
models), with /health, Prometheus /metrics and the views `orion-fsm … --server URL` reads.

    app = create_app(lambda meter_provider: Engine(meter_provider=meter_provider))
    run_server(app, bind("127.0.0.1", 8088))
"""

from ._app import EngineFactory, create_app
from ._openai import AUTO, EMBEDDING_MODEL
from ._server import bind, check_bind, is_loopback, run_server, url_of

__all__ = [
    "AUTO",
    "EMBEDDING_MODEL",
    "EngineFactory",
    "bind",
    "check_bind",
    "create_app",
    "is_loopback",
    "run_server",
    "url_of",
]
