"""`orion-fsm feedback stats|export`: the ratings kept in the feedback store, and the training
JSONL (`{"input", "target", "system"}`) `orion-fsm models tune` reads."""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from orion_fsm import FEEDBACK_FILE_ENV, FeedbackStore, OrionError, default_feedback_path

_DEFAULT_MIN_SCORE = 4


def add_parser(sub: Any) -> None:
    feedback = sub.add_parser("feedback", help="ratings of answers, and training data from them")
    commands = feedback.add_subparsers(dest="feedback_command", required=True)
    for name, text in (("stats", "ratings by score and agent"),
                       ("export", "write the training JSONL (input, target, system)")):
        command = commands.add_parser(name, help=text)
        command.add_argument("--store", default=os.environ.get(FEEDBACK_FILE_ENV),
                             help="the feedback store (default: $ORION_FSM_FEEDBACK_FILE, else "
                             "$XDG_STATE_HOME/orion-fsm/feedback.sqlite3)")
        command.add_argument("--min-score", type=int, default=_DEFAULT_MIN_SCORE,
                             help="answers rated below this are left out (a correction is "
                             f"always kept; default {_DEFAULT_MIN_SCORE})")
        command.add_argument("--agent", help="only ratings of this agent's answers")
        if name == "stats":
            command.add_argument("--json", action="store_true")
        else:
            command.add_argument("--output", required=True, help="JSONL file to write")
    feedback.set_defaults(handler=_feedback)


def _feedback(args: argparse.Namespace) -> int:
    store = FeedbackStore(Path(args.store) if args.store else default_feedback_path())
    if args.feedback_command == "stats":
        stats = store.stats(min_score=args.min_score)
        if args.json:
            print(json.dumps(stats.as_dict(), indent=2))
            return 0
        scores = ", ".join(f"{s}: {n}" for s, n in stats.by_score.items()) or "-"
        agents = ", ".join(f"{a}: {n}" for a, n in stats.by_agent.items()) or "-"
        print(f"{stats.total} ratings (by score {scores}) · {stats.corrections} corrections · "
              f"{stats.exportable} training examples at --min-score {stats.min_score}")
        print(f"by agent: {agents}")
        return 0
    examples = list(store.examples(min_score=args.min_score, agent=args.agent))
    _write_lines(Path(args.output), [json.dumps(e.as_dict(), ensure_ascii=False)
                                     for e in examples])
    print(f"{len(examples)} training examples written to {args.output}")
    return 0


def _write_lines(path: Path, lines: list[str]) -> None:
    """All or nothing: a temporary file beside it, renamed over it when complete. Private:
    the lines quote what users typed."""
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise OrionError(f"cannot write {path}: {exc.strerror or exc}; check the folder "
                         "exists and is writable") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.writelines(line + "\n" for line in lines)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
