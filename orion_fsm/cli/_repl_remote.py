"""`orion-fsm repl --server URL`: the same session against a running server. Answers stream
over SSE; Ctrl-C closes the stream, which the server reads as the client leaving (the request
ends `cancelled`); slash commands read the server's views instead of a local Engine's.
"""

from __future__ import annotations

import argparse
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any, TextIO

from orion_fsm import OrionError, RequestFailed, Result
from orion_fsm.replay import replay

from ._common import CommandLoop
from ._remote import Remote
from ._replay import report_lines
from ._trace import bar_width, waterfall


class RemoteSession(CommandLoop):
    """One REPL session whose engine is the server's."""

    def __init__(self, server: Remote, args: argparse.Namespace, out: TextIO,
                 *, help_text: str, footer: Callable[[Result], str]) -> None:
        self.server = server
        self.agent: str | None = args.agent
        self.max_tokens: int | None = args.max_tokens
        self.temperature: float | None = args.temperature
        self.cache_dir: str | None = args.cache_dir
        self.registry: str | None = args.registry  # for /replay; default: the recorded one
        self.out = out
        self.results: list[Result] = []
        self.cancelled = 0
        self.last_id: str | None = None
        self._help_text, self._footer = help_text, footer
        self._commands: dict[str, Callable[[str], Awaitable[bool]]] = {
            "/agents": self._agents, "/agent": self._agent, "/stats": self._stats,
            "/schema": self.schema, "/context": self.context_command,
            "/cache": self._cache, "/mem": self._mem, "/breakers": self._breakers,
            "/trace": self._trace, "/replay": self._replay, "/help": self._help,
            "/good": self.good, "/bad": self.bad, "/fix": self.fix,
            "/quit": self._quit, "/exit": self._quit,
        }

    async def ask(self, prompt: str) -> None:
        body: dict[str, Any] = {"model": self.agent or "auto",
                                "messages": [{"role": "user", "content": prompt}]}
        body.update({k: v for k, v in (("max_tokens", self.max_tokens),
                                       ("temperature", self.temperature),
                                       ("response_format", self.response_format),
                                       ("context", self.context)) if v is not None})
        result: Result | None = None
        async with self.interruptible():
            try:
                async for item in self.server.stream_chat(body):
                    if isinstance(item, Result):
                        result = item
                    else:
                        self.out.write(item)
                        self.out.flush()
            except RequestFailed as exc:
                result = exc.result if isinstance(exc.result, Result) else None
                if result is None:
                    self.say(f"\nerror ({exc.reason}): {exc.message}")
        self.end_turn(result, self._footer)

    async def rate(self, request_id: str, score: int, correction: str | None) -> None:
        await self.server.post("/v1/feedback", {"request_id": request_id, "score": score,
                                                "correction": correction})

    # --- commands -------------------------------------------------------------------------

    async def use_store(self, name: str) -> None:
        # The server names a store it does not have at the first prompt.
        self.context = name
        self.say(f"prompts now retrieve from {name} on the server")

    async def _help(self, _: str) -> bool:
        self.say(self._help_text)
        return True

    async def _quit(self, _: str) -> bool:
        return False

    async def _models(self) -> list[dict[str, Any]]:
        models: list[dict[str, Any]] = (await self.server.get("/v1/models"))["data"]
        return [m for m in models if m["orion"]["role"] not in ("router", "embeddings")]

    async def _agents(self, _: str) -> bool:
        for model in await self._models():
            mark = "*" if model["id"] == self.agent else " "
            fallback = model["orion"].get("fallback")
            self.say(f"{mark} {model['id']:<16} {model['orion']['role']}"
                     f"{' → ' + fallback if fallback else ''}")
        if self.agent is None:
            self.say("  prompts are routed; /agent NAME sends them to one agent")
        return True

    async def _agent(self, name: str) -> bool:
        if not name:
            self.say(f"prompts go to {self.agent or 'the routed agent'}")
        elif name == "auto":
            self.agent = None
            self.say("prompts are routed again")
        else:
            known = [m["id"] for m in await self._models()]
            if name not in known:
                raise OrionError(f"unknown agent {name!r}; known agents: {', '.join(known)}")
            self.agent = name
            self.say(f"prompts now go to {self.agent}")
        return True

    async def _stats(self, _: str) -> bool:
        states = Counter(r.state for r in self.results)
        parts = [f"{n} {s}" for s, n in states.most_common()]
        if self.cancelled:
            parts.append(f"{self.cancelled} cancelled")
        count = len(self.results) + self.cancelled
        self.say(f"requests: {count}" + (f" ({', '.join(parts)})" if parts else ""))
        stats = await self.server.get("/v1/orion/stats")
        loader, admission = stats["loader"], stats["admission"]
        self.say(f"server loader: {loader['loads']} loads, {loader['unloads']} unloads, "
                 f"{loader['evictions']} evictions, {loader['refusals']} refusals · loaded: "
                 f"{', '.join(loader['models']) or 'none'} · in flight "
                 f"{admission['in_flight']}, queued {admission['queued']}")
        return True

    async def _cache(self, _: str) -> bool:
        return self.show_cache((await self.server.get("/v1/orion/cache"))["levels"])

    async def _mem(self, _: str) -> bool:
        snap = await self.server.get("/v1/orion/mem")
        self.say(f"pressure {snap['level']} · server {snap['process_rss_mb']} MB · "
                 f"available {snap['system_available_mb']} MB ({snap['available_pct']}%) · "
                 f"budget {snap['budget_mb']} MB")
        for m in snap["models"]:
            self.say(f"  {m['model']:<36} {m['estimate_mb']:>8} MB  pins {m['pins']}  "
                     f"idle {m['idle_s']} s")
        for line in snap["recommendations"]:
            self.say(f"  {line}")
        return True

    async def _breakers(self, _: str) -> bool:
        for agent, state in (await self.server.get("/v1/orion/breakers"))["breakers"].items():
            self.say(f"  {agent:<16} {state.get('state', '?'):<10} failed "
                     f"{state.get('window_failures', 0)}/{state.get('window_calls', 0)} "
                     f"in its window  last failure "
                     f"{state.get('last_failure') or '-'}")
        return True

    async def _record(self) -> dict[str, Any] | None:
        if self.last_id is None:
            self.say("no request yet")
            return None
        record: dict[str, Any] = await self.server.get(f"/v1/orion/traces/{self.last_id}")
        return record

    async def _trace(self, _: str) -> bool:
        record = await self._record()
        if record is not None:
            self.say(waterfall(record, bar_width()))
        return True

    async def _replay(self, _: str) -> bool:
        record = await self._record()
        if record is not None:  # here, on the recorded effects: no model is loaded
            report = await replay(record, registry=self.registry, cache_dir=self.cache_dir)
            self.say("\n".join(report_lines(report)))
        return True
