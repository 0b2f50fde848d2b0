"""What to replay, read from a trace record: each agent's recorded attempts in order (load
outcome, breaker refusal and output; a retried agent has several), the retry decisions, and
where the recorded caller cancelled; `Canceller` cancels the replay there too.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import anyio

from orion_fsm._exceptions import ModelLoadError
from orion_fsm.services.models._loader import LoadInfo
from orion_fsm.services.models._registry import AgentSpec
from orion_fsm.services.models._tiers import DEFAULT_VARIANT

_PROMPT_TOKENS = re.compile(r"the prompt is (\d+) tokens")

AbortPoint = Literal["route", "prepare", "acquire", "lease", "generate"]


@dataclass(frozen=True, slots=True)
class RecordedOutput:
    """One attempt's generation, as recorded: what it emitted and how it ended."""

    token_ids: tuple[int, ...] = ()
    text: str = ""
    finish_reason: str | None = None
    error: str | None = None  # the InferenceError it raised after emitting the above
    cancel: bool = False  # the caller cancelled once it was all emitted


@dataclass(frozen=True, slots=True)
class RecordedAttempt:
    """One agent's turn in loading_agent (and inferencing), as recorded."""

    agent: str
    sha256: str | None
    input_tokens: int | None
    prepare_error: str | None = None
    acquire_error: str | None = None
    breaker_open: bool = False
    load_info: LoadInfo | None = None
    output: RecordedOutput = RecordedOutput()
    final: bool = False


@dataclass(frozen=True, slots=True)
class Abort:
    """Where the recorded caller cancelled: the `call`-th call of `point` for `agent`."""

    point: AbortPoint
    agent: str | None = None
    call: int = 1


@dataclass(frozen=True)
class Script:
    """What the stand-ins serve: each agent's recorded attempts, and where to cancel.

    `attempts` holds each agent's last attempt, `turns` all of them in order (an agent retried
    after a transient failure was attempted more than once); `retries` says, for each
    fallback phase in order, whether the recorded run tried the same agent again.
    """

    attempts: Mapping[str, RecordedAttempt]
    abort: Abort | None
    warnings: tuple[str, ...]
    turns: Mapping[str, tuple[RecordedAttempt, ...]] = field(default_factory=dict)
    retries: tuple[bool, ...] = ()
    # Each time a fallback weighed an agent on the model that just failed: was it tried.
    same_model: tuple[bool, ...] = ()

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> Script:
        phases: list[dict[str, Any]] = list(record.get("phases") or [])
        transitions: list[dict[str, Any]] = list(record.get("transitions") or [])
        result: dict[str, Any] = record.get("result") or {}
        model = record.get("model") or {}
        exits = [t.get("event") for t in transitions[1:]]  # phases[k] left by transitions[k+1]
        loading = [k for k, p in enumerate(phases) if p.get("state") == "loading_agent"]
        attempts: dict[str, RecordedAttempt] = {}
        turns: dict[str, list[RecordedAttempt]] = {}
        for k in loading:
            attrs: dict[str, Any] = phases[k].get("attributes") or {}
            agent = str(attrs.get("orion.agent"))
            exit_event = exits[k] if k < len(exits) else None
            error, sha = attrs.get("orion.load_error"), attrs.get("orion.model.sha256")
            inference = phases[k + 1] if k + 1 < len(phases) else None
            inference_attrs = (inference.get("attributes") or {}) if inference is not None and \
                inference.get("state") == "inferencing" else {}
            final = k == loading[-1]
            output = RecordedOutput(error=inference_attrs.get("orion.inference_error"))
            if final:
                output = replace(output, token_ids=tuple(result.get("token_ids") or ()),
                                 text=str(result.get("text") or ""),
                                 finish_reason=result.get("finish_reason"))
            attempts[agent] = RecordedAttempt(
                agent=agent, sha256=sha or (model.get("sha256") if final and error is None
                                            else None) or _known_sha(turns.get(agent)),
                input_tokens=_input_tokens(attrs), final=final,
                # A failed load noted after the model's digest failed in acquire, not prepare.
                prepare_error=error if error is not None and sha is None else None,
                acquire_error=error if error is not None and sha is not None else None,
                breaker_open=exit_event == "breaker_open", load_info=_load_info(attrs),
                output=output)
            turns.setdefault(agent, []).append(attempts[agent])
        routed = (result.get("routing") or {}).get("agent")
        if isinstance(routed, str) and routed not in attempts:
            # Served from L1, or refused before loading: only routing's L1 lookup prepared it.
            attempts[routed] = RecordedAttempt(agent=routed, sha256=model.get("sha256"),
                                        input_tokens=None, final=not loading)
        abort, warnings = _abort_point(record, phases, transitions, attempts)
        if abort is not None and abort.point == "generate":
            final_agent = next(a for a in attempts.values() if a.final)
            attempts[final_agent.agent] = cancelled = replace(
                final_agent, output=replace(final_agent.output, cancel=True))
            turns[final_agent.agent][-1] = cancelled
        retries = tuple(t.get("event") == "retry_same" for t in transitions
                        if t.get("source") == "fallback"
                        and t.get("event") in ("retry_same", "retry", "exhausted"))
        same_model = tuple(answer == "try" for p in phases if p.get("state") == "fallback"
                           for answer in (p.get("attributes") or {}).get(
                               "orion.fallback.same_model") or ())
        return cls(attempts, abort, warnings,
                   turns={a: tuple(ts) for a, ts in turns.items()}, retries=retries,
                   same_model=same_model)

    def attempt(self, agent: AgentSpec, turn: int | None = None) -> RecordedAttempt:
        """The agent's `turn`-th recorded attempt (its last one past the recorded turns, or
        when `turn` is None)."""
        recorded = self.turns.get(agent.id)
        if turn is not None and recorded:
            return recorded[min(turn, len(recorded) - 1)]
        try:
            return self.attempts[agent.id]
        except KeyError:
            # The path already left the recorded one (compare names where): say so here too.
            raise ModelLoadError(f"replay has no recorded outcome for agent {agent.id!r}: the "
                                 "recorded run never loaded it") from None

    def refusals(self) -> dict[str, tuple[bool, ...]]:
        """Per agent, for each of its recorded attempts in order: did its breaker refuse it."""
        return {agent: tuple(a.breaker_open for a in ts) for agent, ts in self.turns.items()}


def _known_sha(earlier: Sequence[RecordedAttempt] | None) -> str | None:
    # A retried attempt of the same agent loads the same model as its earlier turns.
    return next((a.sha256 for a in reversed(earlier or ()) if a.sha256), None)


def _input_tokens(attrs: Mapping[str, Any]) -> int | None:
    count = attrs.get("gen_ai.usage.input_tokens")
    if isinstance(count, int):
        return count
    # A prompt refused for its length is refused before its count is noted; the message has it.
    found = _PROMPT_TOKENS.search(str(attrs.get("orion.error") or ""))
    return int(found.group(1)) if found else None


def _load_info(attrs: Mapping[str, Any]) -> LoadInfo | None:
    if "orion.model" not in attrs:
        return None
    return LoadInfo(
        model=str(attrs["orion.model"]),
        variant=str(attrs.get("orion.model.variant", DEFAULT_VARIANT)),
        loaded_now=bool(attrs.get("orion.model.loaded_now", False)),
        load_ms=float(attrs.get("orion.model.load_ms", 0.0)),
        estimate_mb=float(attrs.get("orion.model.estimate_mb", 0.0)),
        unloaded=tuple(attrs.get("orion.model.unloaded") or ()),
        preloaded=bool(attrs.get("orion.model.preloaded", False)),
    )


def _abort_point(record: Mapping[str, Any], phases: Sequence[Mapping[str, Any]],
                 transitions: Sequence[Mapping[str, Any]],
                 attempts: Mapping[str, RecordedAttempt]) -> tuple[Abort | None, tuple[str, ...]]:
    """Where to cancel the replayed request so that it aborts where the recorded one did."""
    last = transitions[-1].get("event") if transitions else None
    reason = (record.get("result") or {}).get("error_reason")
    if last == "rejected":
        return None, (f"the recorded request was rejected before it started ({reason}); "
                      "replay cannot provoke that, so expect a divergence there",)
    if last != "abort":
        return None, ()
    state = transitions[-1].get("source")
    if reason != "cancelled":
        return None, (f"the recorded request was aborted in {state} ({reason}); replay cannot "
                      "provoke that abort, so expect a divergence there",)
    attrs: Mapping[str, Any] = (phases[-1].get("attributes") or {}) if phases else {}
    final = next((a for a in attempts.values() if a.final), None)
    if state == "routing":
        if "orion.agent" not in attrs:
            return Abort("route"), ()
        return Abort("prepare", str(attrs["orion.agent"])), ()
    if state == "loading_agent" and final is not None:
        if final.sha256 is not None and "orion.model.sha256" in attrs:
            return Abort("acquire", final.agent), ()
        # routing's L1 lookup prepared the same agent first (prepare is then cached: a caller
        # could not have cancelled in that second, instant, call)
        cache = record.get("cache") or {}
        first_attempt = attrs.get("orion.attempt", 0) == 0
        turns = sum(1 for p in phases if p.get("state") == "loading_agent"
                    and (p.get("attributes") or {}).get("orion.agent") == final.agent)
        call = (1 if cache.get("l1_key") and first_attempt else 0) + max(1, turns)
        return Abort("prepare", final.agent, call), ()
    if state == "inferencing" and final is not None:
        if final.output.token_ids:
            return Abort("generate", final.agent), ()
        return Abort("lease", final.agent), ()
    return None, (f"the recorded request was cancelled in {state}; replay cannot cancel it "
                  "there, so expect a divergence there",)


class Canceller:
    """Cancels the replayed request at the recorded abort point, as its caller did."""

    def __init__(self, abort: Abort | None) -> None:
        self.abort = abort
        self.scope: anyio.CancelScope | None = None
        self._calls: dict[tuple[str, str | None], int] = {}

    def reached(self, point: AbortPoint, agent: str | None = None) -> bool:
        """Count this call; True (and the request cancelled) if the recorded caller gave up here."""
        abort = self.abort
        if abort is None or abort.point != point or abort.agent not in (None, agent):
            return False
        key = (point, agent)
        self._calls[key] = self._calls.get(key, 0) + 1
        if self._calls[key] != abort.call:
            return False
        self.cancel()
        return True

    def cancel(self) -> None:
        if self.scope is not None:
            self.scope.cancel()

    def cancel_from_thread(self) -> None:
        anyio.from_thread.run_sync(self.cancel)
