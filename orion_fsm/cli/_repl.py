"""`orion-fsm repl`: type a prompt, watch the tokens stream, on the Engine an app would embed.

Prompts are turns of one conversation (an engine Session: each turn re-sends the history, and
the slot holding it evaluates only the new turn); Ctrl-C stops the current generation and
keeps the conversation; slash commands look into the engine (/agents /stats /cache /mem ...).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, TextIO

import anyio

from orion_fsm import (
    TRACE_FILE_ENV,
    Engine,
    OrionError,
    RequestFailed,
    Result,
    find_traces,
    repl_history_path,
    resolve_cache_dir,
    sanitize_text,
)
from orion_fsm.replay import replay

from ._common import CommandLoop, Progress, add_rerank_option
from ._remote import add_server_options, connect
from ._repl_remote import RemoteSession
from ._replay import report_lines
from ._trace import bar_width, terminal_safe, waterfall

if TYPE_CHECKING:
    from prompt_toolkit import PromptSession

_RECORD_WAIT_S: Final = 2.0  # the trace writer appends in the background, within milliseconds
_HELP: Final = """\
Type a prompt and press Enter; Ctrl-C stops the generation, Ctrl-D or /quit leaves.
  /agents        the registry's agents (* marks the one prompts go to)
  /agent NAME    send prompts to NAME; /agent auto routes them again
  /schema FILE   answers are JSON valid under the schema in FILE; /schema json: any
                 JSON object; /schema off: free text again
  /new           start a new conversation (forget the turns so far)
  /stats         this session's requests, the loader's figures, slots and queues
  /cache         hits, misses and size of each cache level
  /mem           memory pressure, loaded models, recommendations
  /breakers      each agent's circuit breaker
  /trace         the last request's phases, as a waterfall
  /replay        replay the last request from its trace line
  /context NAME  answer from context store NAME (cited); /context off; /context: what is on
  /good /bad     rate the last answer (kept for `orion-fsm feedback export`)
  /fix TEXT      the answer the last one should have been (a training example)
  /memory POLICY a new conversation whose old turns are summarised into its own store and
                 retrieved (adaptive, aggressive or conservative); /memory off
  /help /quit"""


def add_parser(sub: Any) -> None:
    repl = sub.add_parser("repl", help="interactive prompt: streamed answers, Ctrl-C cancels, "
                          "slash commands inspect the engine")
    repl.add_argument("--agent", help="send prompts to this agent instead of routing them")
    repl.add_argument("--router", choices=("embedding", "rules"), default="embedding",
                      help="how to pick the agent when none is set (default: embedding)")
    repl.add_argument("--max-tokens", type=int)
    repl.add_argument("--temperature", type=float)
    repl.add_argument("--trace-file", default=os.environ.get(TRACE_FILE_ENV),
                      help="JSONL trace file (default: $ORION_FSM_TRACE_FILE, else "
                      "$XDG_STATE_HOME/orion-fsm/traces/orion-fsm.jsonl)")
    repl.add_argument("--history", help="history file (default: repl-history in the cache dir)")
    add_server_options(repl)
    add_rerank_option(repl)
    # prompt_toolkit runs on asyncio only.
    repl.set_defaults(handler=lambda args: anyio.run(_repl, args, backend="asyncio"))


class Session(CommandLoop):
    """One REPL session: a client of the public Engine API and nothing more."""

    def __init__(self, engine: Engine, args: argparse.Namespace, out: TextIO) -> None:
        self.engine = engine
        self.agent: str | None = args.agent
        self.max_tokens: int | None = args.max_tokens
        self.temperature: float | None = args.temperature
        self.response_format: dict[str, Any] | None = None
        self.context: str | None = None  # a context store prompts retrieve from
        self.memory: str | None = None  # the conversation's memory policy
        self.cache_dir: str | None = args.cache_dir
        self.out = out
        self.results: list[Result] = []
        self.cancelled = 0
        self.last_id: str | None = None  # None: the newest line of the trace file
        self.asked = False
        self.conversation = engine.session(agent=self.agent)
        self._commands: dict[str, Callable[[str], Awaitable[bool]]] = {
            "/agents": self._agents, "/agent": self._agent, "/schema": self.schema,
            "/stats": self._stats, "/new": self._new,
            "/cache": self._cache, "/mem": self._mem, "/breakers": self._breakers,
            "/trace": self._trace, "/replay": self._replay, "/help": self._help,
            "/context": self.context_command, "/memory": self._memory,
            "/good": self.good, "/bad": self.bad, "/fix": self.fix,
            "/quit": self._quit, "/exit": self._quit,
        }

    async def ask(self, prompt: str) -> None:
        """Stream the answer; Ctrl-C (SIGINT) cancels it and the request ends `cancelled`."""
        self.asked = True
        self.conversation.agent = self.agent or self.conversation.agent
        stream = self.conversation.stream(prompt, max_tokens=self.max_tokens,
                                          temperature=self.temperature,
                                          response_format=self.response_format,
                                          context=self.context)
        self.last_id = stream.request_id
        result: Result | None = None
        async with self.interruptible():
            try:
                async for text in stream:
                    self.out.write(text)
                    self.out.flush()
                result = stream.result
            except RequestFailed as exc:
                result = exc.result if isinstance(exc.result, Result) else None
        self.end_turn(result, _footer)

    async def rate(self, request_id: str, score: int, correction: str | None) -> None:
        await self.engine.feedback(request_id, score, correction)

    # --- commands -------------------------------------------------------------------------

    async def _help(self, _: str) -> bool:
        self.say(_HELP)
        return True

    async def _quit(self, _: str) -> bool:
        return False

    async def _agents(self, _: str) -> bool:
        registry = self.engine.registry
        for spec in registry.agents.values():
            mark = "*" if spec.id == self.agent else " "
            default = " (default)" if spec.id == registry.default_agent else ""
            fallback = f" → {spec.fallback}" if spec.fallback else ""
            self.say(f"{mark} {spec.id:<16} {spec.role}{default}{fallback}")
        if self.agent is None:
            self.say("  prompts are routed; /agent NAME sends them to one agent")
        return True

    async def use_store(self, name: str) -> None:
        stats = await (await self.engine.context(name, create=False)).stats()
        self.context = name
        self.say(f"prompts now retrieve from {name} ({stats.documents} documents, "
                 f"{stats.tokens} tokens)")

    async def _agent(self, name: str) -> bool:
        if not name:
            self.say(f"prompts go to {self.agent or 'the routed agent'}")
        elif name == "auto":
            self.agent = self.conversation.agent = None
            self.say("prompts are routed again")
        else:
            self.agent = self.engine.registry.get(name).id  # unknown -> names the known ones
            self.say(f"prompts now go to {self.agent}")
        return True

    async def _new(self, _: str) -> bool:
        self.conversation = self.engine.session(agent=self.agent, memory=self.memory)
        self.say("new conversation")
        return True

    async def _memory(self, policy: str) -> bool:
        if not policy:
            self.say(f"session memory: {self.memory}, {self.conversation.summarised} turns "
                     "summarised" if self.memory else
                     "no session memory: /memory adaptive|aggressive|conservative")
            return True
        memory = None if policy == "off" else policy
        # A bad policy raises ConfigurationError here, naming the known ones.
        self.conversation = self.engine.session(agent=self.agent, memory=memory)
        self.memory = memory
        self.say("new conversation without session memory" if memory is None else
                 f"new conversation; turns past the window are summarised ({memory}) into "
                 f"{self.conversation.id}'s store and retrieved")
        return True

    async def _stats(self, _: str) -> bool:
        results = self.results
        states = Counter(r.state for r in results)
        count = len(results) + self.cancelled
        parts = [f"{n} {s}" for s, n in states.most_common()]
        if self.cancelled:
            parts.append(f"{self.cancelled} cancelled")
        self.say(f"requests: {count}" + (f" ({', '.join(parts)})" if parts else ""))
        served = [r for r in results if r.state == "success"]
        if served:
            ttfts = [r.ttft_ms for r in served if r.ttft_ms is not None]
            tokens = sum(r.tokens.output for r in served)
            seconds = sum(r.total_ms for r in served) / 1e3
            ttft = f"{sum(ttfts) / len(ttfts):.1f} ms" if ttfts else "-"
            self.say(f"tokens out: {tokens} · mean ttft {ttft} · "
                     f"{tokens / seconds if seconds else 0:.0f} tokens/s")
        stats = self.engine.loader.stats
        models = ", ".join(m.label for m in self.engine.loader.models()) or "none"
        self.say(f"loader: {stats.loads} loads, {stats.unloads} unloads, {stats.evictions} "
                 f"evictions, {stats.refusals} refusals · loaded: {models}")
        now = self.engine.stats()
        self.say(f"requests now: {now.in_flight} in flight, {now.queued} queued for admission")
        for m in now.models:
            self.say(f"  {m.model:<36} slots {m.slots}/{m.parallel}  running {m.running}  "
                     f"queued {m.queued}  quarantined {m.quarantined}")
        if now.cores is not None:
            c = now.cores
            self.say(f"cores: {c.in_use}/{c.capacity} in use of {c.cores} usable "
                     f"(other processes busy: {c.external_busy:g})")
        turns = len(self.conversation.messages) // 2
        self.say(f"conversation: {turns} turn(s)"
                 + (f", on {self.conversation.agent}" if self.conversation.agent else ""))
        return True

    async def _cache(self, _: str) -> bool:
        return self.show_cache(self.engine.cache_stats())

    async def _mem(self, _: str) -> bool:
        snap = self.engine.memory.snapshot().as_dict()
        self.say(f"pressure {snap['level']} · process {snap['process_rss_mb']} MB · "
                 f"available {snap['system_available_mb']} MB ({snap['available_pct']}%) · "
                 f"budget {snap['budget_mb']} MB")
        for m in snap["models"]:
            self.say(f"  {m['model']:<36} {m['estimate_mb']:>8} MB  pins {m['pins']}  "
                     f"idle {m['idle_s']} s")
        for line in snap["recommendations"]:
            self.say(f"  {line}")
        return True

    async def _breakers(self, _: str) -> bool:
        # One breaker per model instance, shared by the agents it serves.
        for key, state in self.engine.breakers.snapshot().items():
            agents = ", ".join(state.get("agents") or [key])
            self.say(f"  {key:<24} {state.get('state', '?'):<10} failed "
                     f"{state.get('window_failures', 0)}/{state.get('window_calls', 0)} "
                     f"in its window  last failure "
                     f"{state.get('last_failure') or '-'}  agents {agents}")
        return True

    async def _trace(self, _: str) -> bool:
        record = await self._last_record()
        if record is not None:
            self.say(terminal_safe(waterfall(record, bar_width())))
        return True

    async def _replay(self, _: str) -> bool:
        record = await self._last_record()
        if record is None:
            return True
        report = await replay(record, registry=self.engine.registry, cache_dir=self.cache_dir)
        self.say("\n".join(report_lines(report)))
        return True

    async def _last_record(self) -> dict[str, Any] | None:
        path = self.engine.trace_path
        if path is None:
            self.say("tracing is off (no trace file)")
            return None
        if not self.asked:
            self.say("no request yet")
            return None
        with anyio.move_on_after(_RECORD_WAIT_S):
            while True:
                record = await anyio.to_thread.run_sync(_newest, path, self.last_id)
                if record is not None:
                    return record
                await anyio.sleep(0.02)
        self.say(f"the last request is not in {path} yet")
        return None


def _newest(path: Path, request_id: str | None) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        records = find_traces(path, request_id)
    except OrionError:
        return None
    return records[-1] if records else None


def _footer(result: Result) -> str:
    agent = result.agent or "-"
    if result.fallback and result.agent:
        agent += f" (fallback from {result.requested_agent})"
    head = f"── {result.state} · {agent}"
    if result.cache:
        head += f" · {result.cache}"
    ttft = "-" if result.ttft_ms is None else f"{result.ttft_ms:.0f} ms"
    head += f" · {result.tokens.output} tokens · ttft {ttft} · {result.total_ms:.0f} ms"
    if result.slot is not None:
        head += f" · slot {result.slot}, {result.reused_prefix_tokens or 0} tokens reused"
    for i, c in enumerate(result.citations, 1):
        head += f"\n[{i}] {c.store}: {c.document} #{c.position} (chunk {c.chunk_id})"
    if result.error:
        head += f"\n[error ({result.error_reason}): {result.error}]"
    return head


async def _repl(args: argparse.Namespace) -> int:
    from prompt_toolkit import PromptSession
    from prompt_toolkit.history import FileHistory

    class RedactedHistory(FileHistory):
        """Prompts typed in the REPL are kept across sessions, with their secrets redacted."""

        def store_string(self, string: str) -> None:
            super().store_string(sanitize_text(string))

    history = Path(args.history) if args.history else repl_history_path(
        resolve_cache_dir(args.cache_dir))
    history.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    # What someone typed is theirs only: the file is created private, and made so if it was not.
    os.close(os.open(history, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600))
    history.chmod(0o600)
    prompts: PromptSession[str] = PromptSession(history=RedactedHistory(str(history)))
    if args.server is not None:
        async with connect(args) as server:
            await _loop(prompts, RemoteSession(server, args, sys.stdout, help_text=_HELP,
                                               footer=_footer))
        return 0
    progress = Progress(enabled=sys.stderr.isatty())
    engine = Engine(registry=args.registry, trace_path=args.trace_file, progress=progress,
                    cache_dir=args.cache_dir, rerank=args.rerank,
                    embeddings=None if args.router == "embedding" else False)
    async with engine:
        await _loop(prompts, Session(engine, args, sys.stdout))
    progress.close()
    return 0


async def _loop(prompts: PromptSession[str], session: Session | RemoteSession) -> None:
    session.say("orion-fsm repl · /help for commands · Ctrl-C stops a generation")
    while True:
        try:
            line = await prompts.prompt_async(session.prompt)
        except KeyboardInterrupt:
            continue  # Ctrl-C at the prompt clears the line, as in a shell
        except EOFError:
            break
        if not await session.handle(line):
            break
