"""Routing: which agent serves a request. `RuleRouter` is the first router (the seam is
`orion_fsm._seams.Router`).

The rule router scores each agent by the keywords and patterns of its registry routing hints;
an explicit agent always wins, and nothing matching means the registry's default agent.
"""

from __future__ import annotations

import importlib
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import anyio

from orion_fsm.services.models._registry import Registry

if TYPE_CHECKING:
    from orion_fsm.services.routing._embeddings import EmbeddingBatch

RoutingSource = Literal["explicit", "rules", "default", "embedding"]

_WORD = re.compile(r"\w+", re.UNICODE)
# Rules see the head of the text: a registry pattern that backtracks costs a bounded time,
# whatever the prompt's length (keywords and patterns that decide sit near the start).
MAX_RULE_CHARS = 2048
# Longer texts are matched in a worker thread, so that the event loop never waits on a
# pattern; the request's deadline still holds (the thread is abandoned at it).
_THREAD_FROM_CHARS = 512
# A pattern still searching after this long is taken as not matching (and logged once).
PATTERN_TIMEOUT_S = 0.1
_log = logging.getLogger("orion_fsm.routing")
_slow_patterns: set[str] = set()


def _search(pattern: Any, text: str) -> bool:
    try:
        return pattern.search(text, concurrent=True, timeout=PATTERN_TIMEOUT_S) is not None
    except TimeoutError:
        if pattern.pattern not in _slow_patterns:
            _slow_patterns.add(pattern.pattern)
            _log.warning("routing pattern timed out, taken as no match", extra={
                "pattern": pattern.pattern, "timeout_s": PATTERN_TIMEOUT_S})
        return False


@dataclass(frozen=True, slots=True)
class RoutingDecision:
    agent: str
    source: RoutingSource
    score: float = 0.0
    runner_up: str | None = None
    margin: float = 0.0
    matched: tuple[str, ...] = field(default=())
    # True when the preferred router could not decide (e.g. no embedding model) and a
    # fallback router did; `note` says why.
    degraded: bool = False
    note: str | None = None
    # Every agent's score when the router scored them all (embeddings), best first: what the
    # decision was made from, so that a trace replays it through the current decision logic.
    scores: Mapping[str, float] = field(default_factory=dict)
    # The embedding batch the request's text went through (None: not embedded now). Not part
    # of the decision: neither compared, cached nor replayed.
    batch: EmbeddingBatch | None = field(default=None, compare=False)

    def as_dict(self) -> dict[str, Any]:
        return {
            "agent": self.agent,
            "source": self.source,
            "score": round(self.score, 4),
            "runner_up": self.runner_up,
            "margin": round(self.margin, 4),
            "matched": list(self.matched),
            "degraded": self.degraded,
            "note": self.note,
            # Unrounded: a score rounded onto a threshold would replay as another decision.
            "scores": dict(self.scores),
        }


@dataclass(frozen=True, slots=True)
class _AgentRules:
    agent: str
    keywords: frozenset[str]
    phrases: tuple[str, ...]  # multi-word keywords, matched as substrings
    patterns: tuple[Any, ...]  # regex.Pattern
    priority: int


class RuleRouter:
    """Keyword and regex rules from the registry's routing hints.

    Score = matched keywords + 2 x matched patterns (a pattern is a stronger, deliberate hint);
    ties go to the higher priority, then to registry order.
    """

    def __init__(self, registry: Registry) -> None:
        # mrab-regex, not re: its matcher releases the GIL (`concurrent`) and takes a timeout,
        # so a registry pattern that backtracks never stalls the event loop nor runs on.
        # Imported here (no stubs; ~10 ms): a router is built once per engine.
        regex: Any = importlib.import_module("regex")

        self._registry = registry
        rules = []
        for spec in registry.agents.values():
            words = [k.lower() for k in spec.routing.keywords]
            rules.append(
                _AgentRules(
                    agent=spec.id,
                    keywords=frozenset(w for w in words if " " not in w),
                    phrases=tuple(w for w in words if " " in w),
                    patterns=tuple(regex.compile(p, regex.IGNORECASE)
                                   for p in spec.routing.patterns),
                    priority=spec.routing.priority,
                )
            )
        self._rules = tuple(rules)
        self._limiter: anyio.CapacityLimiter | None = None  # made on first use, in a loop

    def warm_texts(self) -> tuple[str, ...]:
        """Rules embed nothing: nothing to warm up."""
        return ()

    async def route(self, text: str, *, requested: str | None) -> RoutingDecision:
        if requested is None and len(text) > _THREAD_FROM_CHARS:
            if self._limiter is None:
                self._limiter = anyio.CapacityLimiter(1)
            return await anyio.to_thread.run_sync(self.decide, text, abandon_on_cancel=True,
                                                  limiter=self._limiter)
        return self.decide(text, requested=requested)

    def decide(self, text: str, *, requested: str | None = None) -> RoutingDecision:
        if requested is not None:
            self._registry.get(requested)  # unknown agent -> RegistryError naming the known ones
            return RoutingDecision(agent=requested, source="explicit", score=1.0)
        text = text[:MAX_RULE_CHARS]
        lowered = text.lower()
        words = set(_WORD.findall(lowered))
        scored: list[tuple[float, int, int, str, tuple[str, ...]]] = []
        for order, rule in enumerate(self._rules):
            matched = [w for w in rule.keywords if w in words]
            matched += [p for p in rule.phrases if p in lowered]
            score = float(len(matched))
            for pattern in rule.patterns:
                if _search(pattern, text):
                    score += 2.0
                    matched.append(pattern.pattern)
            scored.append((score, rule.priority, -order, rule.agent, tuple(sorted(matched))))
        scored.sort(reverse=True)
        best = scored[0]
        runner_up = scored[1] if len(scored) > 1 else None
        if best[0] <= 0:
            return RoutingDecision(agent=self._registry.default_agent, source="default")
        return RoutingDecision(
            agent=best[3],
            source="rules",
            score=best[0],
            runner_up=runner_up[3] if runner_up else None,
            margin=best[0] - (runner_up[0] if runner_up else 0.0),
            matched=best[4],
        )
