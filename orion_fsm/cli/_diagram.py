"""`orion-fsm diagram`: render the request statechart (machines/request.scxml) as Mermaid."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from orion_fsm import OrionError, request_chart


def add_parser(sub: Any) -> None:
    diagram = sub.add_parser("diagram", help="render the request statechart as Mermaid")
    diagram.add_argument("--output", help="write to this file instead of stdout")
    diagram.set_defaults(handler=_diagram)


def _diagram(args: argparse.Namespace) -> int:
    from statemachine.contrib.diagram import formatter

    text = formatter.render(request_chart(), "mermaid")
    if args.output:
        try:
            Path(args.output).write_text(text, encoding="utf-8")
        except (OSError, ValueError) as exc:  # ValueError: a NUL in the path
            why = exc.strerror if isinstance(exc, OSError) else str(exc)
            raise OrionError(f"cannot write the diagram to {args.output!r}: {why}; "
                             "pass a file in an existing folder") from None
        print(f"wrote {args.output}")
    else:
        print(text)
    return 0
