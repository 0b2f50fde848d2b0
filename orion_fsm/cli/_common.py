"""What the CLI commands share: progress bars on stderr, output-format options."""

from __future__ import annotations

import argparse
import json
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TextIO

import anyio

from orion_fsm import OrionError, Result


class Progress:
    """Conversion/load progress as tqdm bars on stderr, one per stage."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._bars: dict[str, Any] = {}

    def __call__(self, stage: str, done: int, total: int) -> None:
        if not self.enabled:
            return
        from tqdm import tqdm  # only the CLI draws bars

        bar = self._bars.get(stage)
        if bar is None:
            steps = stage.startswith(("epoch", "check"))  # training steps, answers: counts
            bar = self._bars[stage] = tqdm(total=total or None, desc=stage,
                                           unit="it" if steps else "B", unit_scale=not steps,
                                           leave=False, file=sys.stderr)
        bar.update(done - bar.n)
        if total and done >= total:
            bar.close()

    def close(self) -> None:
        for bar in self._bars.values():
            bar.close()


def add_format_options(parser: Any) -> None:
    """--schema / --json-object / --regex / --grammar, and --tools with --tool-choice."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--schema", metavar="FILE.json",
                       help="the answer is JSON valid under this JSON schema (enforced per token)")
    group.add_argument("--json-object", action="store_true", help="the answer is a JSON object")
    group.add_argument("--regex", metavar="PATTERN", help="the answer matches this regex")
    group.add_argument("--grammar", metavar="FILE.lark",
                       help="the answer follows this Lark grammar")
    group.add_argument("--tools", metavar="FILE.json",
                       help='tools the model may call (OpenAI\'s [{"type": "function", ...}])')
    parser.add_argument("--tool-choice", default=None,
                        help="auto (default), none, required or a tool's name")


def _read_file(path: str, what: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise OrionError(f"cannot read the {what} {path}: {exc.strerror}") from None


def add_rerank_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rerank", action="store_true",
                        help="context retrieval: a small LM (Gemma 3 270M on llama.cpp) rereads "
                        "the best 12 chunks and ranks them by how likely the question is after "
                        "each; better recall, ~0.4 s a chunk")


def schema_format(path: str) -> dict[str, Any]:
    """OpenAI's json_schema response_format around the schema in `path`."""
    return {"type": "json_schema", "json_schema": {
        "name": Path(path).stem, "schema": _read_json(path, "JSON schema"), "strict": True}}


def _read_json(path: str, what: str) -> Any:
    try:
        return json.loads(_read_file(path, what))
    except ValueError as exc:
        raise OrionError(f"the {what} {path} is not JSON: {exc}") from None


def format_request(args: argparse.Namespace) -> dict[str, Any]:
    """The `response_format` / `tools` / `tool_choice` keywords the options ask for."""
    options: dict[str, Any] = {}
    if args.schema:
        options["response_format"] = schema_format(args.schema)
    elif args.json_object:
        options["response_format"] = {"type": "json_object"}
    elif args.regex:
        options["response_format"] = {"type": "regex", "pattern": args.regex}
    elif args.grammar:
        options["response_format"] = {"type": "grammar",
                                      "lark": _read_file(args.grammar, "Lark grammar")}
    elif args.tools:
        tools = _read_json(args.tools, "tools file")
        options["tools"] = tools if isinstance(tools, list) else [tools]
    if args.tool_choice is not None:
        choice = args.tool_choice
        options["tool_choice"] = choice if choice in ("auto", "none", "required") else {
            "type": "function", "function": {"name": choice}}
    return options


class CommandLoop:
    """What the local and the remote REPL share: the prompt, output, and dispatch of a line to
    a prompt (`ask`) or a `/command`; each subclass fills `_commands` and defines `ask`."""

    agent: str | None
    out: TextIO
    _commands: dict[str, Callable[[str], Awaitable[bool]]]

    @property
    def prompt(self) -> str:
        return f"{self.agent or 'orion'}> "

    def say(self, text: str = "") -> None:
        self.out.write(text + "\n")
        self.out.flush()

    async def ask(self, prompt: str) -> None:
        raise NotImplementedError

    # --- what the next prompts ask for -------------------------------------------------------

    response_format: dict[str, Any] | None = None
    context: str | None = None  # a context store prompts retrieve from

    async def context_command(self, name: str) -> bool:
        if not name:
            self.say(f"prompts retrieve from {self.context!r}" if self.context
                     else "no context store: /context NAME answers from one")
        elif name == "off":
            self.context = None
            self.say("prompts no longer retrieve from a context store")
        else:
            await self.use_store(name)
        return True

    async def use_store(self, name: str) -> None:
        """Retrieve from store `name` from the next prompt on."""
        raise NotImplementedError

    async def schema(self, arg: str) -> bool:
        if not arg:
            shown = "free text" if self.response_format is None else json.dumps(
                self.response_format, ensure_ascii=False)
            self.say(f"answers are {shown}")
        elif arg == "off":
            self.response_format = None
            self.say("answers are free text again")
        elif arg == "json":
            self.response_format = {"type": "json_object"}
            self.say("answers are JSON objects")
        else:
            self.response_format = schema_format(arg)  # unreadable -> the error, kept as was
            self.say(f"answers follow the JSON schema in {arg}")
        return True

    # --- one answer: Ctrl-C cancels it; then its footer ------------------------------------

    results: list[Result]
    last_id: str | None
    cancelled: int
    interrupted: bool = False

    @asynccontextmanager
    async def interruptible(self) -> AsyncIterator[None]:
        """The body (one answer), cancelled by Ctrl-C; `interrupted` says whether it was. Only
        while it runs: at the prompt, prompt_toolkit reads Ctrl-C as a key."""
        self.interrupted = False
        async with anyio.create_task_group() as tg:
            with anyio.open_signal_receiver(signal.SIGINT) as signals:

                async def watch() -> None:
                    async for _ in signals:
                        self.interrupted = True
                        tg.cancel_scope.cancel()
                        return

                tg.start_soon(watch)
                try:
                    yield
                finally:
                    tg.cancel_scope.cancel()

    def show_cache(self, levels: dict[str, Any]) -> bool:
        """`/cache`: hits, misses and memory per cache level (the engine's or the server's)."""
        if not levels:
            self.say("caches are off")
            return True
        self.say(f"  {'level':<6}{'hits':>7}{'misses':>8}{'hit rate':>10}{'entries':>9}"
                 f"{'memory KB':>11}")
        for level, s in levels.items():
            self.say(f"  {level:<6}{s['hits']:>7}{s['misses']:>8}{s['hit_rate']:>10.0%}"
                     f"{s['memory_entries']:>9}{s['memory_bytes'] / 1024:>11.1f}")
        return True

    def end_turn(self, result: Result | None, footer: Callable[[Result], str]) -> None:
        """Keep the answer's result (the last one /good rates) and show its footer, or say the
        answer was cancelled."""
        if result is not None:
            self.results.append(result)
            self.last_id = result.request_id
            if result.state == "success":
                self.last_answered = result.request_id
            self.say("\n" + footer(result))
        elif self.interrupted:
            self.cancelled += 1
            self.say("\n[cancelled]")

    # --- feedback on the last answer: /good /bad /fix TEXT ----------------------------------

    last_answered: str | None = None  # request id of the last answer (success) shown

    async def rate(self, request_id: str, score: int, correction: str | None) -> None:
        """Store a rating of `request_id` (the engine's, or the server's)."""
        raise NotImplementedError

    async def _rated(self, score: int, correction: str | None, what: str) -> bool:
        if self.last_answered is None:
            self.say("no answer to rate yet")
            return True
        await self.rate(self.last_answered, score, correction)
        self.say(f"{what} (request {self.last_answered})")
        return True

    async def good(self, _: str) -> bool:
        return await self._rated(5, None, "rated good")

    async def bad(self, _: str) -> bool:
        return await self._rated(0, None, "rated bad")

    async def fix(self, text: str) -> bool:
        if not text:
            self.say("/fix TEXT: the answer it should have given")
            return True
        return await self._rated(0, text, "correction kept")

    async def handle(self, line: str) -> bool:
        """Run one line (a prompt or a command); False when the session should end."""
        line = line.strip()
        if not line:
            return True
        if not line.startswith("/"):
            await self.ask(line)
            return True
        name, _, rest = line.partition(" ")
        command = self._commands.get(name)
        if command is None:
            self.say(f"unknown command {name}; /help lists them")
            return True
        try:
            return await command(rest.strip())
        except OrionError as exc:
            self.say(f"error: {exc}")
            return True
