"""Running the app: uvicorn on a socket bound here (so port 0 works and the real port is
known), the bind policy (no open network port without an API key unless told), and a SIGTERM
that drains: in-flight requests finish, or end `cancelled` past the grace period.
"""

from __future__ import annotations

import ipaddress
import signal
import socket

from starlette.applications import Starlette

from orion_fsm import DEFAULT_SHUTDOWN_GRACE_S, ConfigurationError


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_bind(host: str, api_key: str | None, *, allow_insecure: bool) -> None:
    """Refuse to serve a non-loopback address without an API key, unless explicitly allowed."""
    if not is_loopback(host) and not api_key and not allow_insecure:
        raise ConfigurationError(
            "--host", host, "a loopback address (127.0.0.1, ::1) unless an API key is set "
            "(--api-key or ORION_FSM_API_KEY); --allow-insecure-bind serves it without one")


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto IPPROTO_TCP: asyncio turns Nagle off only on sockets that say they are TCP;
    # with proto 0 every response body waited ~40 ms for the client's delayed ACK.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ConfigurationError("--port", port, f"a free port on {host} ({exc.strerror})") \
            from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://{f'[{host}]' if ':' in host else host}:{port}"


def run_server(app: Starlette, sock: socket.socket, *, grace_s: int = DEFAULT_SHUTDOWN_GRACE_S,
               access_log: bool = False) -> None:
    """Serve `app` on `sock` until SIGINT or SIGTERM; returns once the Engine has closed.
    Connections made before the Engine is ready wait in the socket's backlog; /health says
    when it is."""
    import uvicorn

    config = uvicorn.Config(app, lifespan="on", log_config=None, access_log=access_log,
                            timeout_graceful_shutdown=grace_s, http="h11")
    server = uvicorn.Server(config)
    # uvicorn re-raises the signal it caught once it has shut down: a SIGTERM that drained
    # is a clean exit, not a kill.
    previous = signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        server.run(sockets=[sock])
    finally:
        signal.signal(signal.SIGTERM, previous)
