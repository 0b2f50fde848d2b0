"""Stepping through a recorded request like a debugger over its statechart: for each phase,
what it received and what it decided (router scores, cache key and hit, breaker state, model,
tokens generated so far), where an abort arrived, and whether the replayed phase agreed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from ._compare import ReplayReport, phase_divergence

_SHOWN_TOKENS: Final = 16
_SHOWN_TEXT: Final = 80
# Attributes a step shows in its own words (received/decided); the rest are listed as they are.
_SHOWN_APART: Final = frozenset({
    "orion.agent", "orion.routing.source", "orion.routing.score", "orion.routing.runner_up",
    "orion.routing.margin", "orion.fallback_chain", "cache.l1", "cache.level",
    "orion.attempt", "gen_ai.request.model", "orion.model.sha256", "error.type", "orion.error",
    "orion.messages", "gen_ai.operation.name", "gen_ai.system", "gen_ai.request.max_tokens",
    "gen_ai.request.temperature", "gen_ai.request.top_p", "gen_ai.request.top_k",
    "gen_ai.usage.input_tokens", "orion.model", "orion.model.variant", "orion.model.loaded_now",
    "orion.model.load_ms", "orion.model.estimate_mb", "orion.model.unloaded",
    "orion.model.preloaded", "orion.routing.degraded",
})


@dataclass(frozen=True, slots=True)
class Step:
    """One phase of a recorded request: what it received and decided, the event that left
    it, and what the replayed run did in the same phase (`replayed`)."""

    index: int
    state: str
    ms: float
    received: tuple[str, ...]
    decided: tuple[str, ...]
    event: str | None  # the event that left the phase (None: the record ends in it)
    target: str | None
    replayed: str  # "same decisions", the divergence in this phase, or "not reached"

    def lines(self) -> list[str]:
        leaving = f" --{self.event}--> {self.target}" if self.event else ""
        lines = [f"[{self.index}] {self.state} ({self.ms:.1f} ms){leaving}"]
        lines += [f"    received: {line}" for line in self.received]
        lines += [f"    decided:  {line}" for line in self.decided]
        lines.append(f"    replayed: {self.replayed}")
        return lines


def steps(report: ReplayReport, *, until: str | None = None) -> list[Step]:
    """The recorded request of `report`, phase by phase, up to the first phase in `until`."""
    record = report.recorded
    phases: Sequence[Mapping[str, Any]] = record.get("phases") or []
    transitions: Sequence[Mapping[str, Any]] = record.get("transitions") or []
    replayed: Sequence[Mapping[str, Any]] = (report.replayed or {}).get("phases") or []
    replayed_transitions = (report.replayed or {}).get("transitions") or []
    found: list[Step] = []
    attempt_agents: list[str] = []
    for k, phase in enumerate(phases):
        state = str(phase.get("state"))
        attrs: Mapping[str, Any] = phase.get("attributes") or {}
        leaving = transitions[k + 1] if k + 1 < len(transitions) else None
        if state == "loading_agent" and attrs.get("orion.agent"):
            attempt_agents.append(str(attrs["orion.agent"]))
        received, decided = _explain(record, state, attrs, attempt_agents)
        if leaving is None or leaving.get("event") in ("abort", "rejected"):
            decided += _aborted(record)
        found.append(Step(
            index=k + 1, state=state, ms=float(phase.get("ms", 0.0)),
            received=tuple(received), decided=tuple(decided),
            event=None if leaving is None else str(leaving.get("event")),
            target=None if leaving is None else str(leaving.get("target")),
            replayed=_replayed(phase, replayed[k] if k < len(replayed) else None, leaving,
                               replayed_transitions[k + 1]
                               if k + 1 < len(replayed_transitions) else None)))
        if until is not None and state == until:
            break
    if not phases and transitions and transitions[-1].get("source") == "idle":
        # Refused or cancelled before its first phase: admission is the only step.
        leaving = transitions[-1]
        replayed_leaving = replayed_transitions[-1] if replayed_transitions else None
        found.append(Step(
            index=1, state="idle", ms=0.0, received=("admission to the engine's queue",),
            decided=tuple(_aborted(record)), event=str(leaving.get("event")),
            target=str(leaving.get("target")),
            replayed=_replayed({}, {}, leaving, replayed_leaving)))
    return found


def _explain(record: Mapping[str, Any], state: str, attrs: Mapping[str, Any],
             attempt_agents: Sequence[str]) -> tuple[list[str], list[str]]:
    request: Mapping[str, Any] = record.get("request") or {}
    result: Mapping[str, Any] = record.get("result") or {}
    received: list[str] = []
    decided: list[str] = []
    if state == "validating":
        messages = request.get("messages") or []
        received.append(f"{len(messages)} message(s), last: "
                        f"{_text(str((messages[-1] if messages else {}).get('content', '')))}")
        received.append(f"agent {request.get('agent') or '(any)'}, params "
                        f"{request.get('params') or {}}")
    elif state == "routing":
        received.append(f"requested agent {request.get('agent') or '(none)'}")
        routing: Mapping[str, Any] = result.get("routing") or {}
        scores: Mapping[str, Any] = routing.get("scores") or {}
        if scores:
            ranked = sorted(scores.items(), key=lambda item: -float(item[1]))
            decided.append("scores " + ", ".join(f"{a} {float(s):.3f}" for a, s in ranked))
        if "orion.agent" in attrs:
            decided.append(
                f"agent {attrs['orion.agent']} by {attrs.get('orion.routing.source')} "
                f"(score {_num(attrs.get('orion.routing.score'))}, runner-up "
                f"{attrs.get('orion.routing.runner_up') or '-'}, margin "
                f"{_num(attrs.get('orion.routing.margin'))}); fallback chain "
                f"{' -> '.join(attrs.get('orion.fallback_chain') or [])}"
                + (" (degraded: rules)" if attrs.get("orion.routing.degraded") else ""))
        cache: Mapping[str, Any] = record.get("cache") or {}
        if cache.get("l1_key"):
            hit = attrs.get("cache.l1") or ("hit" if cache.get("level") else "-")
            decided.append(f"L1 {hit}, key {str(cache['l1_key'])[:16]}…")
        elif cache.get("enabled") is False:
            decided.append("no result cache")
        if cache.get("level"):
            decided.append(f"served from {cache['level']}: "
                           f"{len(result.get('token_ids') or [])} token(s), text "
                           f"{_text(str(result.get('text') or ''))}")
    elif state == "loading_agent":
        agent = str(attrs.get("orion.agent"))
        # Keyed by model instance since trace v3 (each lists its agents), by agent before.
        breakers: Mapping[str, Any] = record.get("breakers") or {}
        breaker: Mapping[str, Any] = breakers.get(agent) or next(
            (b for b in breakers.values() if agent in (b.get("agents") or ())), {})
        received.append(f"agent {agent}, attempt {attrs.get('orion.attempt', 0)}, breaker "
                        f"{breaker.get('state', '?')} ({breaker.get('consecutive_failures', 0)} "
                        "consecutive failures at the start)")
        if attrs.get("orion.model.sha256"):
            decided.append(f"model sha256 {str(attrs['orion.model.sha256'])[:12]}…")
        if "orion.model" in attrs:
            how = (f"loaded now in {float(attrs.get('orion.model.load_ms', 0.0)):.0f} ms"
                   if attrs.get("orion.model.loaded_now") else "already resident")
            if attrs.get("orion.model.preloaded"):
                how += ", preloaded"
            unloaded = attrs.get("orion.model.unloaded") or []
            decided.append(f"lease on {attrs['orion.model']}: {how}, estimate "
                           f"{float(attrs.get('orion.model.estimate_mb') or 0.0):.1f} MB"
                           + (f", unloaded {', '.join(map(str, unloaded))}" if unloaded else ""))
    elif state == "inferencing":
        agent = attempt_agents[-1] if attempt_agents else "?"
        received.append(f"agent {agent}, {attrs.get('gen_ai.usage.input_tokens', '?')} prompt "
                        f"tokens, max_tokens {attrs.get('gen_ai.request.max_tokens', '?')}, "
                        f"temperature {attrs.get('gen_ai.request.temperature', '?')}")
        if agent == result.get("agent"):
            ids = list(result.get("token_ids") or [])
            shown = ids[:_SHOWN_TOKENS]
            more = f" … (+{len(ids) - len(shown)})" if len(ids) > len(shown) else ""
            decided.append(f"{len(ids)} token(s) generated so far: {shown}{more}")
            if result.get("text"):
                decided.append(f"text {_text(str(result['text']))}")
        elif "gen_ai.usage.output_tokens" in attrs:
            decided.append(f"{attrs['gen_ai.usage.output_tokens']} token(s) generated")
    if attrs.get("error.type"):
        decided.append(f"error {attrs['error.type']}: {attrs.get('orion.error')}")
    decided += [f"{k} = {_value(v)}" for k, v in attrs.items() if k not in _SHOWN_APART]
    return received, decided


def _aborted(record: Mapping[str, Any]) -> list[str]:
    abort: Mapping[str, Any] | None = record.get("abort")
    if not abort:
        return []
    limit = ""
    if abort.get("timeout_s") is not None:
        limit = f", timeout {abort['timeout_s']:g} s"
    elif abort.get("queue"):
        queue = abort["queue"]
        limit = f", {queue.get('queued')} queued of {queue.get('max_queue')}"
    return [f"aborted here: {abort.get('reason')} while awaiting {abort.get('await')}, after "
            f"{abort.get('tokens', 0)} generated token(s){limit}"]


def _replayed(recorded: Mapping[str, Any], replayed: Mapping[str, Any] | None,
              leaving: Mapping[str, Any] | None, replayed_leaving: Mapping[str, Any] | None,
              ) -> str:
    if replayed is None:
        return "not reached"
    divergence = phase_divergence(recorded, replayed)
    if divergence is not None:
        return str(divergence)
    key = ("event", "target")
    if leaving is not None and (replayed_leaving is None
                                or any(leaving.get(k) != replayed_leaving.get(k) for k in key)):
        shown = "nothing" if replayed_leaving is None else (
            f"--{replayed_leaving.get('event')}--> {replayed_leaving.get('target')}")
        return f"left by {shown}"
    return "same decisions"


def _num(value: object) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def _text(text: str) -> str:
    shown = text if len(text) <= _SHOWN_TEXT else text[: _SHOWN_TEXT - 1] + "…"
    return repr(shown)


def _value(value: object) -> str:
    shown = repr(value) if isinstance(value, str) else str(value)
    return shown if len(shown) <= _SHOWN_TEXT else shown[: _SHOWN_TEXT - 1] + "…"
