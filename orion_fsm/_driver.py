"""One request driven through its statechart: admission, each state's phase, the final state,
the `Result` and its trace line. The driver owns the Result; phases only return events.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator, Mapping
from contextlib import AsyncExitStack, aclosing
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio

from ._exceptions import OrionError
from ._inflight import InFlight
from ._machine import MachinePool, StateListener
from ._phases import PHASES, STREAMING_PHASES, Next, Region, RequestState, Services
from ._structured import prompt_messages
from ._types import MemberResult, PhaseTiming, Request, Result, TokenUsage
from .services.feedback._store import Served
from .services.observability import _attributes as attr
from .services.observability._logging import LogListener, request_context
from .services.observability._telemetry import PhaseRecorder
from .services.observability._tracefile import TRACE_FORMAT, TRACE_VERSION
from .services.resilience._admission import Overloaded, RequestTimeout

if TYPE_CHECKING:
    from opentelemetry.trace import Tracer

    from .services.feedback._store import RecentRequests
    from .services.observability._metrics import RequestMetrics
    from .services.observability._tracefile import TraceWriter
    from .services.resilience._admission import AdmissionController, TimeoutPolicy
    from .services.routing._embeddings import EmbeddingService, ExpectedText

_log = logging.getLogger("orion_fsm.engine")


@dataclass(frozen=True, slots=True, eq=False)
class Driving:
    """What the driver needs beyond the phases' services: built once with them."""

    services: Services
    machines: MachinePool
    tracer: Tracer
    admission: AdmissionController
    timeouts: TimeoutPolicy
    traces: TraceWriter
    registry_source: Path | None
    metrics: RequestMetrics | None = None  # recorded once per request, in _finish
    served: RecentRequests | None = None  # answers a rating can name (engine.feedback)
    in_flight: InFlight = field(default_factory=InFlight)  # what the Engine's exit cancels
    # The router's embedding batcher, told of each admitted request it will embed.
    embeddings: EmbeddingService | None = None


class RequestRun:
    """`texts()` drives one request; `result` is set however it ends (also when cancelled)."""

    __slots__ = ("_driving", "_priority", "_streaming", "request", "result")

    def __init__(self, driving: Driving, request: Request, *, streaming: bool,
                 priority: int) -> None:
        self._driving = driving
        self._streaming = streaming
        self._priority = priority
        self.request = request
        self.result: Result | None = None

    @property
    def in_flight(self) -> InFlight:
        """Where the caller's await of this request registers (the Engine's exit cancels it)."""
        return self._driving.in_flight

    async def texts(self) -> AsyncGenerator[str, None]:
        """Generated text as it comes (a streamed cache hit yields its whole text once)."""
        d, request = self._driving, self.request
        services = d.services
        recorder = PhaseRecorder(d.tracer, services.clock, request.id,
                                 {attr.REGISTRY_DIGEST: services.registry.digest})
        listeners: list[StateListener] = [recorder]
        if _log.isEnabledFor(logging.INFO):
            listeners.append(LogListener(_log, request.id, recorder.trace_id))
        stack = AsyncExitStack()
        state = RequestState(request=request, streaming=self._streaming, stack=stack,
                             deadline=d.timeouts.start(), started=recorder.origin,
                             notes=recorder.notes,
                             breakers_at_start=services.breakers.snapshot(),
                             priority=self._priority)
        # Before the first await: a batch of routing texts gathering now waits for this one
        # even when the event loop is late to run it (see EmbeddingService.expect).
        expected = state.before_routing = self._announce()
        if expected is not None:
            stack.callback(expected.arrive)
        # A machine only once admitted: a thousand queued requests hold no machine.
        try:
            await d.admission.acquire(self._priority, request_id=request.id)
        except Overloaded as exc:  # refused at once, never queued
            if expected is not None:
                expected.arrive()
            state.fail("overloaded", exc.message)
            with d.machines.machine(listeners) as machine:
                self._finish(state, recorder, machine, event="rejected")
            return
        except BaseException:
            if expected is not None:
                expected.arrive()
            state.fail("cancelled", "the caller cancelled the request while it was queued")
            with d.machines.machine(listeners) as machine:
                self._finish(state, recorder, machine, event="abort")
            raise
        state.deadline = d.timeouts.start()  # `timeout_s` counts from admission
        with d.machines.machine(listeners) as machine:
            stack.callback(d.admission.release)
            try:
                async with stack, aclosing(self._phases(state, machine, recorder)) as texts:
                    async for text in texts:
                        yield text
            except RequestTimeout as exc:
                state.fail("timeout", exc.message)
                self._finish(state, recorder, machine, event="abort")
            except BaseException as exc:
                # Cancelled, consumer gone, or a bug in a phase: the request still ends in a
                # final state, with its trace line.
                if not machine.is_terminated:
                    if isinstance(exc, anyio.get_cancelled_exc_class() | GeneratorExit):
                        state.fail("cancelled", "the engine shut down while the request was "
                                   "running" if d.in_flight.closing
                                   else "the caller cancelled the request")
                    elif isinstance(exc, OrionError):
                        state.fail("internal", str(exc))
                    else:
                        state.fail("internal", f"{type(exc).__name__}: {exc}")
                    self._finish(state, recorder, machine, event="abort")
                elif self.result is None:
                    # Already final: a streamed cache hit yields its text after reaching
                    # success, and a consumer leaving at that chunk still gets its line.
                    self._finish(state, recorder, machine)
                raise
            else:
                self._finish(state, recorder, machine)

    def _announce(self) -> ExpectedText | None:
        """Announce the request's text to the embedding batcher if the router will embed it
        and admission lets the request in at once (a queued one may wait for seconds)."""
        d = self._driving
        admission = d.admission
        if (d.embeddings is None or self.request.agent is not None or admission.queued
                or admission.in_flight >= admission.max_in_flight):
            return None
        return d.embeddings.expect()

    async def _phases(self, state: RequestState, machine: Any,
                      recorder: PhaseRecorder) -> AsyncGenerator[str, None]:
        """Each state's phase, under the request's deadline, until a final state. Service
        logs made inside a phase (its worker threads too) carry the request's ids."""
        services, deadline, ids = self._driving.services, state.deadline, (
            state.request.id, recorder.trace_id)
        machine.send("start")
        while not machine.is_terminated:
            name = next(iter(machine.configuration_values))
            stream_phase = STREAMING_PHASES.get(name)
            if stream_phase is not None:
                # No deadline scope across a yield: the phase scopes each worker-thread hop.
                async with aclosing(stream_phase(services, state)) as items:
                    while True:
                        with request_context(*ids):
                            item = await anext(items)
                        if isinstance(item, Next):
                            event = item.event
                            break
                        if isinstance(item, Region):  # a parallel state's region moves on
                            recorder.region_notes(item.region).update(item.notes)
                            machine.send(item.event)
                            continue
                        yield item
            else:
                with request_context(*ids), deadline.scope() as scope:
                    event = await PHASES[name](services, state)
                if scope.cancelled_caught:
                    raise deadline.error(name, request_id=state.request.id)
            machine.send(event)
        if state.cache_level is not None and state.streaming:
            yield "".join(state.text_parts)

    def _finish(self, state: RequestState, recorder: PhaseRecorder, machine: Any,
                *, event: str | None = None) -> None:
        """The final event (if not sent yet), the Result and its trace line."""
        where = next(iter(machine.configuration_values))  # before the abort leaves it
        abort = None if event is None else _abort(self._driving, state, where)
        permit = state.permit  # not judged by a phase: judged as the stack was released
        if permit is not None and (change := permit.transition) is not None:
            state.notes[attr.BREAKER_TRANSITION] = (
                f"{change.key}: {change.source} -> {change.target}")
        if event is not None:
            machine.send(event)
        agent = state.agent_id
        tokens_in, tokens_out = state.usage()
        recorder.finish({
            attr.AGENT: agent,
            attr.FALLBACK: state.attempt > 0,
            attr.GEN_AI_USAGE_INPUT_TOKENS: tokens_in,
            attr.GEN_AI_USAGE_OUTPUT_TOKENS: tokens_out,
            attr.ERROR_REASON: state.error_reason,
        })
        requested = state.decision.agent if state.decision else None
        final = next(iter(machine.configuration_values))
        result = self.result = Result(
            request_id=state.request.id, trace_id=recorder.trace_id, state=final,
            text="".join(state.text_parts), agent=agent, requested_agent=requested,
            fallback=bool(requested and agent != requested),
            agents_tried=tuple(state.chain[: state.attempt + 1]) if state.chain else (),
            phases=tuple(PhaseTiming(p.state, p.start_ms, p.ms) for p in recorder.phases),
            tokens=TokenUsage(tokens_in, tokens_out), members=_members(state, recorder),
            ttft_ms=state.first_token_at, total_ms=recorder.elapsed_ms(),
            finish_reason=state.finish_reason, error=state.error,
            error_reason=state.error_reason, error_field=state.error_field,
            token_ids=tuple(state.token_ids),
            routing=state.decision.as_dict() if state.decision else {},
            cache=state.cache_level, parsed=state.parsed, tool_calls=state.tool_calls,
            retry_after_s=state.retry_after_s, citations=state.citations, **_slot_fields(state),
        )
        self._driving.traces.submit(_trace_record(self._driving, state, recorder, result,
                                                  abort))
        if self._driving.metrics is not None:
            self._driving.metrics.record(result)
        if self._driving.served is not None and result.state == "success" and result.agent:
            self._driving.served.note(Served(
                result.request_id, result.trace_id, result.agent,
                # A cache hit rendered no prompt: what this agent would have seen.
                state.prompt_turns or _turns(state), result.text, state.request.created_at))


def _turns(state: RequestState) -> tuple[tuple[str, str], ...]:
    system = state.agent.system_prompt if state.agent else None
    return tuple(prompt_messages(state.request.messages, system, state.output_format))


def _abort(d: Driving, state: RequestState, where: str) -> dict[str, Any]:
    """Where an abort (timeout, cancelled, overloaded) arrived, for replay to deliver it
    there again: the state, the await in it, the tokens generated so far, and the limit."""
    if where == "idle":
        awaiting = "admission"
    elif where == "routing":
        awaiting = "route" if state.decision is None else "l1_lookup"
    elif where == "loading_agent":
        # The model's digest is noted once it is prepared, just before its lease is taken.
        awaiting = "lease" if attr.MODEL_SHA256 in state.notes else "prepare"
    elif where == "inferencing":
        awaiting = "generate"
    else:
        awaiting = where
    snapshot = d.admission.snapshot()
    return {
        "reason": state.error_reason, "state": where, "await": awaiting,
        "agent": state.agent.id if state.agent else None, "attempt": state.attempt,
        "tokens": len(state.token_ids),
        "timeout_s": d.timeouts.timeout_s if state.error_reason == "timeout" else None,
        "queue": None if awaiting != "admission" else {
            "queued": snapshot["queued"], "max_queue": snapshot["max_queue"]},
    }


def _members(state: RequestState, recorder: PhaseRecorder) -> tuple[MemberResult, ...]:
    """What each member of a virtual agent did, with its region's timeline."""
    used = set((state.fusion or {}).get("used", ()))
    return tuple(MemberResult(
        role=r.role, agent=r.state.agent_id or r.member.agent, state=r.outcome,
        text="".join(r.state.text_parts),
        tokens=TokenUsage(len(r.state.prompt_ids), len(r.state.token_ids)),
        ttft_ms=r.state.first_token_at, start_ms=r.start_ms,
        total_ms=None if r.end_ms is None else r.end_ms - r.start_ms,
        confidence=r.confidence(), entropy=r.entropy(), weight=r.weight,
        used=r.role in used, finish_reason=r.state.finish_reason,
        error=None if r.outcome != "failed" else (r.state.error or "; ".join(
            f"{a}: {w}" for a, w in r.state.failures)),
        agents_tried=tuple(r.state.chain[: r.state.attempt + 1]),
        phases=tuple(PhaseTiming(p.state, p.start_ms, p.ms)
                     for p in recorder.region_phases(r.role)),
        joined_ms=r.join_ms if r.joined is not None else None,
        code_at=r.state.code_at, **_verdict(state, r.role),
    ) for r in state.members)


def _verdict(state: RequestState, role: str) -> dict[str, Any]:
    """The early-stop verdict, on the member whose answer it judged."""
    verdict = state.early_stop
    if (verdict is None or verdict["by"] != role or state.virtual is None
            or state.virtual.early_stop == "none"):
        return {}
    return {"verdict": f"{'taken' if verdict['taken'] else 'not taken'}: {verdict['why']}",
            "verdict_ms": verdict["at_ms"]}


def _slot_fields(state: RequestState) -> dict[str, Any]:
    """Which slot served the request and what it saved (Result fields)."""
    info = state.load_info
    return {"session_id": state.request.session_id, "prefilled_tokens": state.prefilled,
            **({} if info is None else {"slot": info.slot, "slot_wait_ms": info.slot_wait_ms,
                                        "reused_prefix_tokens": info.reused_tokens})}


def _trace_record(d: Driving, state: RequestState, recorder: PhaseRecorder,
                  result: Result, abort: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The trace file's one record of a request (format: services/observability/_tracefile)."""
    prepared, sampling, request = state.prepared, state.sampling, state.request
    breakers: Mapping[str, Any] = state.breakers_at_start
    return {
        "format": TRACE_FORMAT,
        "version": TRACE_VERSION,
        "request_id": result.request_id,
        "trace_id": result.trace_id,
        "started_at": request.created_at,
        "request": request.as_dict(),
        "registry_digest": d.services.registry.digest,
        "model": None if prepared is None else {
            "source": str(prepared.key.source),
            "sha256": prepared.sha256,
            "context_length": prepared.key.context_length,
        },
        "prompt_token_ids": list(state.prompt_ids),
        "sampling": None if sampling is None else {
            "max_tokens": sampling.max_tokens, "temperature": sampling.temperature,
            "top_k": sampling.top_k, "top_p": sampling.top_p,
            "repetition_penalty": sampling.repetition_penalty,
            "seed": sampling.seed, "stop": list(sampling.stop),
            # Named only: replay compiles it again from the request's response_format/tools.
            "grammar": None if sampling.grammar is None else {
                "kind": sampling.grammar.kind, "digest": sampling.grammar.digest},
        },
        "streaming": state.streaming,
        "registry_source": None if d.registry_source is None else str(d.registry_source),
        "clock": {"time": request.created_at, "monotonic": state.started},
        "cache": {"enabled": d.services.caches is not None, "level": state.cache_level,
                  "l1_key": state.l1_key},
        "breakers": dict(breakers),  # the states that decided, not the ones after
        # What retrieval found (replay serves these instead of the store) and what was used.
        "context": None if request.context is None else {
            "store": request.context,
            "retrieved": [h.as_dict() for h in state.retrieved],
            "used": [c.chunk_id for c in state.citations],
            "error": state.error if state.error_field == "context" else None,
        },
        "transitions": [t.as_dict() for t in recorder.transitions],
        "phases": [p.as_dict() for p in recorder.phases],
        "spans": recorder.spans,
        "result": {**result.as_dict(), "token_ids": list(result.token_ids)},
        "abort": None if abort is None else dict(abort),
        # A virtual agent's request: each member (its prompt, tokens, outcome), the early stop
        # decision and what fusing used (absent otherwise: older records keep their shape).
        **({} if not state.members else {"virtual": {
            "agent": state.virtual.id if state.virtual else None,
            # Replay serves each member's tokens with their log-probabilities again, so that
            # its early stop decides from the recorded confidences.
            "members": [{**m.as_dict(), "prompt_token_ids": list(r.state.prompt_ids),
                         "token_ids": list(r.state.token_ids),
                         "logprobs": list(r.state.logprobs),
                         "model_sha256": None if r.state.prepared is None
                         else r.state.prepared.sha256}
                        for m, r in zip(result.members, state.members, strict=True)],
            "early_stop": state.early_stop,
            # leader_first: why and when each follower started (null: with the request).
            "joins": {r.role: {"why": r.join_why, "at_ms": r.join_ms}
                      for r in state.members if r.join_why is not None},
            "fusion": state.fusion,
        }}),
    }
