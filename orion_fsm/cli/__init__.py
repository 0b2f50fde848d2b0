"""`orion-fsm`: the command line, a client of the public API.

Each command lives in its own module with an `add_parser(subparsers)` that sets `handler`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from orion_fsm import OrionError, configure_logging

from . import (
    _breakers,
    _cache,
    _context,
    _diagram,
    _eval,
    _feedback,
    _mem,
    _models,
    _repl,
    _replay,
    _route,
    _run,
    _serve,
    _trace,
)

_COMMANDS = (_run, _serve, _models, _route, _cache, _context, _mem, _breakers, _diagram, _trace,
             _replay, _repl, _feedback, _eval)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="orion-fsm",
        description="Serve local language models through a per-request state machine: answer "
        "prompts, serve them over HTTP, and inspect models, caches, context stores and traces.",
        epilog="`orion-fsm COMMAND --help` describes a command.")
    parser.add_argument("--registry", help="models.json to use (default: the packaged one)")
    parser.add_argument("--cache-dir", help="where converted models and the L1/L2/L3 caches "
                        "are kept (default: $ORION_FSM_CACHE or ~/.cache/orion-fsm)")
    parser.add_argument("--log-level", default="WARNING", type=str.upper,
                        choices=("DEBUG", "INFO", "WARN", "WARNING", "ERROR", "CRITICAL"),
                        help="DEBUG, INFO, WARNING, ERROR or CRITICAL (default: WARNING); "
                        "INFO logs every transition of every request")
    parser.add_argument("--log-format", choices=("json", "text"), default="json",
                        help="JSON events on stderr, or readable key=value lines (development)")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in _COMMANDS:
        command.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    configure_logging(args.log_level, json=args.log_format == "json",
                      verbose=args.log_format == "text")
    try:
        code: int = args.handler(args)
        return code
    except OrionError as exc:
        print(f"orion-fsm: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BaseExceptionGroup as group:
        # A task group (anyio) wraps what its tasks raise: the user's error is inside.
        leaf = _first_leaf(group)
        if isinstance(leaf, OrionError):
            print(f"orion-fsm: {leaf}", file=sys.stderr)
            return 2
        if isinstance(leaf, KeyboardInterrupt):
            return 130
        raise
    except OSError as exc:
        # A file or folder named on the command line that cannot be used; what each command
        # expects is in its --help.
        where = f" {exc.filename}" if exc.filename else ""
        print(f"orion-fsm: cannot use{where}: {exc.strerror or exc}", file=sys.stderr)
        return 2


def _first_leaf(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The first exception in a (nested) group that is not itself a group."""
    first = group.exceptions[0]
    return _first_leaf(first) if isinstance(first, BaseExceptionGroup) else first


if __name__ == "__main__":
    sys.exit(main())
