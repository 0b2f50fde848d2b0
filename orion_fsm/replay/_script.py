"""What to replay, read from a trace record: each agent's recorded attempts in order (load
outcome, breaker refusal and output; a retried agent has several), the retry decisions, and
where the recorded request was aborted; `Aborter` delivers that abort there again.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal, NoReturn

import anyio

from orion_fsm._exceptions import ModelLoadError, RequestTimeout
from orion_fsm.services.models._loader import LoadInfo
from orion_fsm.services.models._registry import AgentSpec
from orion_fsm.services.models._tiers import DEFAULT_VARIANT
from orion_fsm.services.observability import _attributes as attr

_PROMPT_TOKENS = re.compile(r"the prompt is (\d+) tokens")
# What older records say only in their error message (RequestTimeout, Overloaded).
_TIMEOUT = re.compile(r"longer than its timeout of ([0-9.e+-]+) s")
_QUEUE = re.compile(r"(\d+) requests queued \(limit (\d+)\)")

# Aborts that arrive from outside the phases (the caller, the deadline, the queue, a bug).
_DELIVERED = frozenset({"cancelled", "timeout", "overloaded", "internal"})

AbortPoint = Literal["admission", "route", "prepare", "acquire", "lease", "generate"]


@dataclass(frozen=True, slots=True)
class RecordedOutput:
    """One attempt's generation, as recorded: what it emitted and how it ended."""

    token_ids: tuple[int, ...] = ()
    text: str = ""
    finish_reason: str | None = None
    error: str | None = None  # the InferenceError it raised after emitting the above
    abort: bool = False  # the request was aborted (cancelled, timed out) once it was emitted
    logprobs: tuple[float, ...] = ()  # a virtual member's: each id's log-probability
    stopped: bool = False  # a virtual member the other's early stop ended, after the above
    # a virtual member's: its tokens when its text opened a code block (the recorded text,
    # served whole without a tokenizer, opens it at that token again)
    code_at: int | None = None


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
    # A virtual member's last attempt: its own prompt ids, whether the other member's early
    # stop ended it while it waited for its model, and the agent whose recorded end it waits
    # for before finishing (the one that finished first, or the one it stopped).
    prompt_ids: tuple[int, ...] | None = None
    stopped_loading: bool = False
    finishes_after: str | None = None
    special_token: str | None = None  # written in the request's text: it was refused


@dataclass(frozen=True, slots=True)
class Abort:
    """Where the recorded request was aborted: the `call`-th call of `point` for `agent`,
    and why (`reason`: cancelled, timeout or overloaded; the limits it was refused with)."""

    point: AbortPoint
    agent: str | None = None
    call: int = 1
    reason: str = "cancelled"
    state: str | None = None  # the phase it arrived in
    timeout_s: float | None = None
    queued: int = 0
    max_queue: int = 0


@dataclass(frozen=True)
class Script:
    """What the stand-ins serve: each agent's recorded attempts, and where to abort.

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
        # A parallel state's regions move on their own: their transitions are the members'.
        transitions: list[dict[str, Any]] = [t for t in record.get("transitions") or []
                                             if t.get("region") is None]
        result: dict[str, Any] = record.get("result") or {}
        model = record.get("model") or {}
        exits = [t.get("event") for t in transitions[1:]]  # phases[k] left by transitions[k+1]
        loading = [k for k, p in enumerate(phases) if p.get("state") == "loading_agent"]
        attempts: dict[str, RecordedAttempt] = {}
        turns: dict[str, list[RecordedAttempt]] = {}
        # A virtual agent's members were attempted first (its own fallback comes after).
        for attempt in _member_attempts(record):
            attempts[attempt.agent] = attempt
            turns.setdefault(attempt.agent, []).append(attempt)
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
                output=output, special_token=_special_token(attrs))
            turns.setdefault(agent, []).append(attempts[agent])
        routed = (result.get("routing") or {}).get("agent")
        if isinstance(routed, str) and routed not in attempts:
            # Served from L1, or refused before loading: only routing's L1 lookup prepared it.
            attempts[routed] = RecordedAttempt(agent=routed, sha256=model.get("sha256"),
                                        input_tokens=None, final=not loading)
        abort, warnings = _abort_point(record, phases, transitions, attempts)
        if abort is not None and abort.point == "generate":
            final_agent = next(a for a in attempts.values() if a.final)
            attempts[final_agent.agent] = aborted = replace(
                final_agent, output=replace(final_agent.output, abort=True))
            turns[final_agent.agent][-1] = aborted
        retries = _member_retries(record) + tuple(
            t.get("event") == "retry_same" for t in transitions
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


def _member_attempts(record: Mapping[str, Any]) -> list[RecordedAttempt]:
    """Each attempt of each member of a virtual request, in order, from its region's spans
    (a loading state per attempt) and the member's recorded output (its last attempt)."""
    members: list[Mapping[str, Any]] = list((record.get("virtual") or {}).get("members") or [])
    spans: list[Mapping[str, Any]] = sorted(record.get("spans") or [],
                                            key=lambda s: float(s.get("start_ms", 0)))
    done = sorted((float(m.get("start_ms") or 0) + float(m.get("total_ms") or 0), str(m["agent"]))
                  for m in members if m.get("state") == "done")
    found: list[RecordedAttempt] = []
    for member in members:
        role = str(member.get("role"))
        region = [s for s in spans if s.get("name") in (f"{role}_loading", f"{role}_generating")]
        loads = [k for k, s in enumerate(region) if s.get("name") == f"{role}_loading"]
        phases = [str(p.get("state")) for p in member.get("phases") or []]
        for n, k in enumerate(loads):
            attrs: Mapping[str, Any] = region[k].get("attributes") or {}
            after = region[k + 1] if k + 1 < len(region) else None
            generating = (after.get("attributes") or {}) if after is not None and \
                after.get("name") == f"{role}_generating" else {}
            error, sha = attrs.get("orion.load_error"), attrs.get("orion.model.sha256")
            output = RecordedOutput(error=generating.get("orion.inference_error"))
            last = n == len(loads) - 1
            earlier = None
            if last and member.get("state") in ("done", "stopped"):
                output = RecordedOutput(
                    token_ids=tuple(member.get("token_ids") or ()),
                    text=str(member.get("text") or ""),
                    finish_reason=member.get("finish_reason"),
                    logprobs=tuple(float(v) for v in member.get("logprobs") or ()),
                    stopped=member.get("state") == "stopped",
                    code_at=member["code_at"] if isinstance(member.get("code_at"), int)
                    else None)
                ends = [agent for _, agent in done]
                # Only one that asked for a slot (its prompt was rendered): a leader_first
                # follower stopped while it waited for the leader never did.
                stopped = [str(m["agent"]) for m in members if m.get("state") == "stopped"
                           and (m.get("tokens") or {}).get("input")]
                if member.get("state") == "done" and stopped:
                    earlier = stopped[0]  # it stopped that one: once that one got as far
                elif member.get("state") == "done" and ends.index(str(member["agent"])) > 0:
                    earlier = ends[ends.index(str(member["agent"])) - 1]
            found.append(RecordedAttempt(
                agent=str(attrs.get("orion.agent") or member.get("agent")),
                sha256=sha or (member.get("model_sha256") if last else None),
                input_tokens=_input_tokens(attrs),
                prepare_error=error if error is not None and sha is None else None,
                acquire_error=error if error is not None and sha is not None else None,
                breaker_open=attrs.get("orion.breaker") == "open", load_info=_load_info(attrs),
                output=output,
                prompt_ids=tuple(member.get("prompt_token_ids") or ()) if last else None,
                stopped_loading=last and member.get("state") == "stopped"
                and bool(phases) and phases[-1].endswith("_loading"),
                finishes_after=earlier))
    return found


def _member_retries(record: Mapping[str, Any]) -> tuple[bool, ...]:
    """Each fallback a virtual request's members went through (their region's span that
    holds its notes): did it retry the same agent. Members fall back concurrently: their
    decisions are taken in span order, exact when at most one member retried."""
    members = (record.get("virtual") or {}).get("members") or []
    names = {f"{m.get('role')}_{kind}" for m in members for kind in ("loading", "generating")}
    return tuple(attr.RETRY_SAME in (s.get("attributes") or {})
                 for s in sorted(record.get("spans") or [],
                                 key=lambda s: float(s.get("end_ms", 0)))
                 if s.get("name") in names
                 and attr.FALLBACK_FROM in (s.get("attributes") or {}))


def _known_sha(earlier: Sequence[RecordedAttempt] | None) -> str | None:
    # A retried attempt of the same agent loads the same model as its earlier turns.
    return next((a.sha256 for a in reversed(earlier or ()) if a.sha256), None)


def _special_token(attrs: Mapping[str, Any]) -> str | None:
    token = attrs.get("orion.guardrails.special_token")
    return token if isinstance(token, str) and token else None


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
        slot=int(attrs.get(attr.SLOT, 0)),
        slot_wait_ms=float(attrs.get(attr.SLOT_WAIT_MS, 0.0)),
        reused_tokens=int(attrs.get(attr.SLOT_REUSED_TOKENS, 0)),
        parallel=int(attrs.get(attr.SLOT_PARALLEL, 1)),
    )


def _abort_point(record: Mapping[str, Any], phases: Sequence[Mapping[str, Any]],
                 transitions: Sequence[Mapping[str, Any]],
                 attempts: Mapping[str, RecordedAttempt]) -> tuple[Abort | None, tuple[str, ...]]:
    """Where to deliver the recorded abort so that the replayed request ends where it did."""
    last = transitions[-1].get("event") if transitions else None
    if last not in ("abort", "rejected"):
        return None, ()
    where: Mapping[str, Any] | None = record.get("abort")
    if where is None and (record.get("result") or {}).get("error_reason") in _DELIVERED:
        where = _abort_from_phases(record, phases, transitions, attempts)
    if where is None:
        return None, ()  # a phase decided it (`fallback --abort-->`): replayed as it is
    reason, state, awaiting = where.get("reason"), where.get("state"), where.get("await")
    final = next((a.agent for a in attempts.values() if a.final), None)
    agent = where.get("agent") or final
    if awaiting == "admission":
        queue = where.get("queue") or {}
        return Abort("admission", reason=str(reason), state=str(state),
                     queued=int(queue.get("queued", 0)),
                     max_queue=int(queue.get("max_queue", 0))), ()
    timeout_s = where.get("timeout_s")
    if reason not in ("cancelled", "timeout") or (reason == "timeout" and timeout_s is None):
        return None, (f"the recorded request was aborted in {state} ({reason}); replay cannot "
                      "provoke that abort, so expect a divergence there",)
    common: dict[str, Any] = {"reason": str(reason), "state": str(state),
                              "timeout_s": None if timeout_s is None else float(timeout_s)}
    if awaiting == "route":
        return Abort("route", **common), ()
    routed = (record.get("result") or {}).get("routing", {}).get("agent")
    if awaiting == "l1_lookup" and isinstance(routed, str):
        return Abort("prepare", routed, **common), ()
    if awaiting == "prepare" and agent is not None:
        # routing's L1 lookup prepared the same agent first (prepare is then cached: an
        # abort could not have arrived in that second, instant, call)
        first_attempt = not where.get("attempt")
        call = 2 if (record.get("cache") or {}).get("l1_key") and first_attempt else 1
        return Abort("prepare", agent, call, **common), ()
    if awaiting == "lease" and agent is not None:
        return Abort("acquire", agent, **common), ()
    if awaiting == "generate" and agent is not None:
        if reason == "cancelled" and not where.get("tokens"):
            # Cancelled before its first token: the cancellation lands on the model's lock.
            return Abort("lease", agent, **common), ()
        return Abort("generate", agent, **common), ()
    return None, (f"the recorded request was aborted in {state} ({reason}, awaiting "
                  f"{awaiting}); replay cannot deliver it there, so expect a divergence there",)


def _abort_from_phases(record: Mapping[str, Any], phases: Sequence[Mapping[str, Any]],
                       transitions: Sequence[Mapping[str, Any]],
                       attempts: Mapping[str, RecordedAttempt]) -> dict[str, Any]:
    """The `abort` of a record written before it was recorded, read from its last phase."""
    result = record.get("result") or {}
    state = transitions[-1].get("source")
    attrs: Mapping[str, Any] = (phases[-1].get("attributes") or {}) if phases else {}
    final = next((a for a in attempts.values() if a.final), None)
    awaiting = {"idle": "admission", "inferencing": "generate"}.get(str(state), str(state))
    if state == "routing":
        awaiting = "l1_lookup" if "orion.agent" in attrs else "route"
    elif state == "loading_agent":
        has_digest = final is not None and final.sha256 is not None
        awaiting = "lease" if has_digest and "orion.model.sha256" in attrs else "prepare"
    message = str(result.get("error") or "")
    timeout = _TIMEOUT.search(message)
    queue = _QUEUE.search(message)
    return {
        "reason": result.get("error_reason"), "state": state, "await": awaiting,
        "agent": None if final is None else final.agent,
        "attempt": attrs.get("orion.attempt", 0), "tokens": len(result.get("token_ids") or ()),
        "timeout_s": float(timeout.group(1)) if timeout else None,
        "queue": {"queued": int(queue.group(1)), "max_queue": int(queue.group(2))}
        if queue else None,
    }


class Aborter:
    """Delivers the recorded abort at its point, as it arrived: the caller's cancellation
    (the replayed request's scope is cancelled) or the deadline (its timeout is raised)."""

    def __init__(self, abort: Abort | None) -> None:
        self.abort = abort
        self.scope: anyio.CancelScope | None = None
        self._calls: dict[tuple[str, str | None], int] = {}

    @property
    def times_out(self) -> bool:
        return self.abort is not None and self.abort.reason == "timeout"

    def reached(self, point: AbortPoint, agent: str | None = None) -> bool:
        """Count this call; True if the recorded abort arrived here (then deliver it)."""
        abort = self.abort
        if abort is None or abort.point != point or abort.agent not in (None, agent):
            return False
        key = (point, agent)
        self._calls[key] = self._calls.get(key, 0) + 1
        return self._calls[key] == abort.call

    async def deliver(self) -> NoReturn:
        """The abort, from the task it arrived in."""
        if self.times_out:
            raise self.timeout()
        self.cancel()
        await anyio.sleep_forever()
        raise AssertionError("unreachable: the replayed request was cancelled")

    def timeout(self) -> RequestTimeout:
        """The error the recorded deadline raised, in the phase it raised it."""
        abort = self.abort
        assert abort is not None and abort.timeout_s is not None
        return RequestTimeout(abort.timeout_s, abort.state)

    def cancel(self) -> None:
        if self.scope is not None:
            self.scope.cancel()

    def cancel_from_thread(self) -> None:
        anyio.from_thread.run_sync(self.cancel)
