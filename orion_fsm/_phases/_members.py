"""serving_virtual: a virtual agent's members answer at once, one region of the parallel state
each (machines/request.scxml), each with its own attempt (breaker permit, slot lease) and its
own fallback chain; the first member to finish confidently may end the other (early stop), or,
under `leader_first`, the solution starts alone and the others join once it cannot stop early.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import re
import threading
from collections.abc import AsyncGenerator, Callable, Mapping
from contextlib import AsyncExitStack, aclosing
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

import anyio

from ..services.observability import _attributes as attr
from ._fallback import fallback
from ._generation import inferencing
from ._loading import loading_agent
from ._state import Next, Region, RequestState, Services

if TYPE_CHECKING:
    from anyio.streams.memory import MemoryObjectSendStream

    from ..services.models._registry import Registry, VirtualMember, VirtualSpec
    from ..services.routing._router import RoutingDecision

# Router scores are cosines a few hundredths apart: a softmax this sharp makes them count.
_ROUTER_TEMPERATURE: Final = 0.1
_MAX_CLAIM_CHARS: Final = 2048  # as the rule router: patterns see the head of the text


def claim_virtual(registry: Registry, text: str, decision: RoutingDecision) -> RoutingDecision:
    """The router's decision, unless a virtual agent's routing patterns claim the request (an
    explicit agent is never overridden). The router's per-agent scores are kept: they set the
    members' weights."""
    if decision.source == "explicit":
        return decision
    head = text[:_MAX_CLAIM_CHARS]
    for spec in sorted(registry.virtual.values(), key=lambda v: -v.routing.priority):
        matched = tuple(p for p in spec.routing.patterns if re.search(p, head, re.IGNORECASE))
        if matched:
            return dataclasses.replace(
                decision, agent=spec.id, matched=matched, runner_up=decision.agent,
                note=f"virtual agent {spec.id!r} claimed the request ({decision.agent!r} "
                     "was the router's choice)")
    return decision


def start_virtual(services: Services, state: RequestState) -> str:
    """Routed to a virtual agent: what it cannot do is refused here, before any model."""
    assert state.decision is not None
    spec = state.virtual = services.registry.virtual[state.decision.agent]
    request = state.request
    if state.output_format is not None:
        state.fail("invalid", (
            f"virtual agent {spec.id!r} answers in free text; ask one of its members "
            f"({', '.join(m.agent for m in spec.members)}) for an output format"),
            field="response_format" if request.response_format is not None else "tools")
        return "invalid"
    if request.context is not None:
        state.fail("invalid", (
            f"virtual agent {spec.id!r} does not read context stores; ask one of its "
            f"members ({', '.join(m.agent for m in spec.members)}) with context="),
            field="context")
        return "invalid"
    weights = member_weights(spec, state.decision.scores)
    state.notes.update({attr.VIRTUAL_MEMBERS: [m.agent for m in spec.members],
                        attr.VIRTUAL_WEIGHTS: [round(weights[m.role], 4)
                                               for m in spec.members]})
    return "routed_virtual"


def member_weights(spec: VirtualSpec, scores: Mapping[str, float]) -> dict[str, float]:
    """Each member's weight in the fusion: fixed, or the router's scores for this request
    (a softmax over the members, times the fixed weights) when it scored them."""
    fixed = {m.role: m.weight for m in spec.members}
    if spec.weights != "router" or not all(m.agent in scores for m in spec.members):
        return fixed
    top = max(float(scores[m.agent]) for m in spec.members)
    raw = {m.role: m.weight * math.exp((float(scores[m.agent]) - top) / _ROUTER_TEMPERATURE)
           for m in spec.members}
    total = sum(raw.values())
    return {role: w / total for role, w in raw.items()}


@dataclass(eq=False, slots=True)
class MemberRun:
    """One member of a virtual request: its own request state, and how its region ended."""

    member: VirtualMember
    state: RequestState
    weight: float
    scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)
    outcome: str = "running"  # done | failed | stopped (the other member stopped it early)
    start_ms: float = 0.0
    end_ms: float | None = None
    # What ended it from outside its phases (the deadline, a bug): raised again by
    # serving_virtual once both regions are over, never through the task group.
    raised: Exception | None = None
    # leader_first: a follower loads once this is set (None: it starts with the request);
    # why and when it was let in, or None while it waits.
    joined: anyio.Event | None = None
    join_why: str | None = None
    join_ms: float | None = None

    @property
    def role(self) -> str:
        return self.member.role

    def text(self) -> str:
        return "".join(self.state.text_parts).strip()

    def confidence(self) -> float | None:
        """Geometric mean of its tokens' probabilities under its own model (None: the model
        gave no logits)."""
        lp = self.state.logprobs
        return math.exp(sum(lp) / len(lp)) if lp else None

    def entropy(self) -> float | None:
        h = self.state.entropies
        return sum(h) / len(h) if h else None


async def serving_virtual(services: Services,
                          state: RequestState) -> AsyncGenerator[str | Region | Next, None]:
    """Every member at once in a task group; their region events as they happen (the driver
    sends them), the solution's text as soon as it is final (streaming), then
    `Next("members_done")`."""
    spec, decision = state.virtual, state.decision
    assert spec is not None and decision is not None
    weights = member_weights(spec, decision.scores)
    now = services.clock.monotonic
    state.members = runs = [_member_run(services, state, m, weights[m.role])
                            for m in spec.members]
    _schedule(services, spec, state, runs)
    send, receive = anyio.create_memory_object_stream[Region](math.inf)
    streamed = False
    ended = [anyio.Event() for _ in runs]
    # The members run in the Engine's task group, not in one opened here: a generator must
    # not yield inside a task group (the caller's cancel scopes around each step would then
    # interleave with it). They live no longer than this phase: leaving it early (caller
    # gone, deadline, shutdown) cancels them and waits until each has released its slot.
    for run, done in zip(runs, ended, strict=True):
        services.background(_serve_member, services, state, run, send.clone(), done)
    send.close()
    try:
        async with receive:
            async for region in receive:
                yield region
                if (state.streaming and not streamed and region.event == "solution_done"
                        and spec.strategy == "sections"):
                    # The first part of the answer is final: the caller need not wait.
                    run = runs[0]
                    if run.weight >= spec.min_weight and run.text():
                        streamed = True
                        state.text_parts.append(run.text())
                        state.emitted_chars += len(run.text())
                        state.first_token_at = (now() - state.started) * 1e3
                        yield run.text()
    finally:
        for run in runs:
            run.scope.cancel()
        with anyio.CancelScope(shield=True):
            for done in ended:
                await done.wait()
    if (raised := next((r.raised for r in runs if r.raised is not None), None)) is not None:
        raise raised
    served = [r.member.agent for r in runs if r.outcome == "done"]
    state.notes.update({attr.VIRTUAL_SERVED: served,
                        attr.VIRTUAL_OUTCOMES: [f"{r.role}: {r.outcome}" for r in runs]})
    if spec.early_stop == "leader_first":
        state.notes[attr.VIRTUAL_JOINS] = [f"{r.role}: {r.join_why or 'never'}"
                                           for r in _followers(state)]
    if (verdict := state.early_stop) is not None:
        state.notes.update({attr.VIRTUAL_EARLY_STOP: f"{verdict['by']}: {verdict['why']}",
                            attr.VIRTUAL_EARLY_STOP_TAKEN: verdict["taken"],
                            attr.VIRTUAL_EARLY_STOP_AT_TOKEN: verdict["at_token"]})
        if verdict["at_ms"] is not None:
            state.notes[attr.VIRTUAL_EARLY_STOP_AT_MS] = verdict["at_ms"]
        if verdict["code_at"] is not None:
            state.notes[attr.VIRTUAL_CODE_AT] = verdict["code_at"]
        if verdict["confidence"] is not None:
            state.notes[attr.VIRTUAL_CONFIDENCE] = verdict["confidence"]
    yield Next("members_done")


def _schedule(services: Services, spec: VirtualSpec, state: RequestState,
              runs: list[MemberRun]) -> None:
    """`leader_first`: the leader (`early_stop.leader`'s member) starts alone (with the pool's
    cores), the others wait for it, unless the request itself asks for both parts (the virtual
    agent's routing patterns match it): a composite answer is long, so they start together."""
    if spec.early_stop != "leader_first" or len(runs) < 2:
        return
    text = next((m.content for m in reversed(state.request.messages) if m.role == "user"), "")
    head = text[:_MAX_CLAIM_CHARS]
    if any(re.search(p, head, re.IGNORECASE) for p in spec.routing.patterns):
        for run in _followers(state):
            run.join_why, run.join_ms = "composite request: started together", 0.0
        return
    for run in _followers(state):
        run.joined = anyio.Event()
    _leader(state).state.on_tokens = _join_when_not_simple(services, state)


def _leader(state: RequestState) -> MemberRun:
    """The member whose verdict decides under leader_first (the solution's by default)."""
    role = state.virtual.leader if state.virtual is not None else ""
    return next((r for r in state.members if r.role == role), state.members[0])


def _followers(state: RequestState) -> list[MemberRun]:
    leader = _leader(state)
    return [r for r in state.members if r is not leader]


def _join_when_not_simple(services: Services, parent: RequestState) -> Callable[[], None]:
    """The leader's hook after each chunk, in the thread generating it: the first chunk that
    shows its answer is not simple (more tokens than an early stop allows, or a code block
    opened early) lets the followers in. No follower polls: a wake-up every few ms preempts
    one of ggml's threads, which the other then waits for at its barrier."""
    loop_thread, loop = threading.get_ident(), anyio.lowlevel.current_token()
    told = False

    def hook() -> None:
        nonlocal told
        if told or _not_simple(parent) is None:
            return
        told = True
        now_ms = (services.clock.monotonic() - parent.started) * 1e3
        if threading.get_ident() == loop_thread:
            _join(parent, now_ms)
            return
        # The request may be over and its event loop gone: then nobody waits to be let in.
        with contextlib.suppress(RuntimeError):
            anyio.from_thread.run_sync(_join, parent, now_ms, token=loop)

    return hook


def _not_simple(parent: RequestState) -> str | None:
    """Why the leader's answer so far is not a simple one (None: it may still be). Read from
    its tokens, not from when a follower noticed, so that a replay finds the same reason."""
    spec, leader = parent.virtual, _leader(parent)
    if spec is None:
        return None
    code_at = leader.state.code_at
    if spec.code_within and code_at is not None and code_at <= spec.code_within:
        return f"leader opened a code block at token {code_at}"
    if len(leader.state.token_ids) > spec.early_stop_max_tokens:
        return f"leader past {spec.early_stop_max_tokens} tokens"
    return None


def _join(parent: RequestState, now_ms: float) -> None:
    """Let the waiting followers in."""
    why = _not_simple(parent) or f"leader {_leader(parent).outcome}"
    for run in _followers(parent):
        if run.joined is not None and not run.joined.is_set():
            run.join_why, run.join_ms = why, now_ms
            run.joined.set()


def _waiting(parent: RequestState) -> bool:
    """leader_first: no follower had a reason to start before the leader's end (none came
    with the request, the leader's answer never showed itself not simple). Read from its
    tokens, not from whether a follower has noticed yet, so that a replay decides the same."""
    followers = _followers(parent)
    return (bool(followers) and all(r.joined is not None for r in followers)
            and _not_simple(parent) is None)


def _member_run(services: Services, state: RequestState, member: VirtualMember,
                weight: float) -> MemberRun:
    """The member's own request state: same messages, deadline and priority; its agent and
    that agent's fallback chain. Its stack is entered by the task that runs it."""
    child = RequestState(
        request=dataclasses.replace(state.request, agent=member.agent), streaming=False,
        stack=AsyncExitStack(), deadline=state.deadline, started=state.started, notes={},
        breakers_at_start=state.breakers_at_start, priority=state.priority)
    child.chain = services.registry.fallback_chain(member.agent)
    child.token_scores = True  # early stop and the member's confidence read them
    child.instruction = member.instruction
    return MemberRun(member, child, weight)


async def _serve_member(services: Services, parent: RequestState, run: MemberRun,
                        events: MemoryObjectSendStream[Region], ended: anyio.Event) -> None:
    """One region: load, generate, on failure the member's own fallback; its events out;
    `ended` set however it ends."""
    try:
        await _serve_region(services, parent, run, events)
    finally:
        ended.set()


async def _serve_region(services: Services, parent: RequestState, run: MemberRun,
                        events: MemoryObjectSendStream[Region]) -> None:
    """Load, generate, on failure the member's own fallback; its region's events out."""
    child, role, clock = run.state, run.role, services.clock
    run.start_ms = (clock.monotonic() - parent.started) * 1e3

    def region(event: str) -> None:
        events.send_nowait(Region(role, event, dict(child.notes)))
        child.notes.clear()

    async with events:
        try:
            await _attempts(services, parent, run, region)
        except Exception as exc:
            # Not raised in the Engine's task group (it would end the Engine): the request
            # ends with it, so the other member need not go on.
            run.raised, run.outcome = exc, "failed"
            for other in parent.members:
                other.scope.cancel()
            return
        run.end_ms = (clock.monotonic() - parent.started) * 1e3
        if run.scope.cancelled_caught:
            run.outcome = "stopped"  # its region already took `early_stop`
            return
        if run.outcome == "done":
            child.notes[attr.VIRTUAL_CONFIDENCE] = run.confidence() or 0.0
            region(f"{role}_done")  # before the early stop: that ends only the others
            _maybe_stop_others(parent, run, events)
        else:
            child.notes[attr.ERROR] = child.error or "failed"
            region(f"{role}_failed")
        stopped = parent.early_stop is not None and parent.early_stop["taken"]
        if run is _leader(parent) and not stopped:
            _join(parent, run.end_ms)  # the leader is over: whoever still waits starts now


async def _attempts(services: Services, parent: RequestState, run: MemberRun,
                    region: Callable[[str], None]) -> None:
    """The member's agent, then the next of its chain, until one serves or none is left."""
    child, role = run.state, run.role
    with run.scope:
        if run.joined is not None:
            await run.joined.wait()  # until the leader is over or shows it is not simple
        async with child.stack:
            while True:
                # No scope of the driver's here: a member waits for its slot under the deadline.
                with child.deadline.scope() as deadline:
                    event = await loading_agent(services, child)
                if deadline.cancelled_caught:
                    raise child.deadline.error("serving_virtual", request_id=child.request.id)
                if event == "loaded":
                    region(f"{role}_loaded")
                    async with aclosing(inferencing(services, child)) as items:
                        async for item in items:
                            if isinstance(item, Next):
                                event = item.event
                    if event == "completed":
                        run.outcome = "done"
                        return
                if event == "invalid":  # the prompt does not fit this agent
                    child.failures.append((child.agent_id or run.member.agent,
                                           child.error or "invalid"))
                    run.outcome = "failed"
                    return
                if await fallback(services, child) in ("retry", "retry_same"):
                    region(f"{role}_retry")
                    continue
                run.outcome = "failed"
                return


def _maybe_stop_others(parent: RequestState, run: MemberRun,
                       events: MemoryObjectSendStream[Region]) -> None:
    """The first member to finish decides: a confident, well-formed answer ends the others
    (their generations see the stop event, their slots are freed). Under leader_first the
    leader's verdict is always given, also when a follower it let in has already answered."""
    spec = parent.virtual
    others = [r for r in parent.members if r is not run and r.outcome == "running"]
    if spec is None or parent.early_stop is not None:
        return
    leader_first = spec.early_stop == "leader_first"
    if leader_first and run is not _leader(parent):
        return  # a follower never ends the leader
    if not others and not leader_first:
        return
    verdict = parent.early_stop = early_stop_verdict(spec, run, waiting=_waiting(parent))
    verdict["at_ms"] = None if run.end_ms is None else round(run.end_ms, 3)
    if verdict["taken"] and not others:
        verdict.update(taken=False, why=verdict["why"] + ", but every follower had answered")
    if not verdict["taken"]:
        return
    events.send_nowait(Region(others[0].role, "early_stop", {
        attr.VIRTUAL_EARLY_STOP: f"by {run.role}: confidence {verdict['confidence']}"}))
    for other in others:
        other.state.stop.set()
        other.scope.cancel()


def early_stop_verdict(spec: VirtualSpec, run: MemberRun, *,
                       waiting: bool = False) -> dict[str, Any]:
    """Whether `run`'s answer is simple and sure enough to skip the other members: its
    confidence against the threshold, plus cheap structure checks. `waiting`: under
    leader_first, no follower has started, i.e. the leader's answer never showed itself not
    simple (a code block early, too many tokens): an answer cut at the caller's max_tokens
    then counts as finished, even inside a code block it opened late, since a follower's
    answer would be cut as well."""
    confidence, tokens = run.confidence(), len(run.state.token_ids)
    text, finish = run.text(), run.state.finish_reason
    cut = waiting and finish == "length"
    finished = finish == "stop" or cut
    if spec.early_stop not in ("first_confident", "leader_first"):
        why = "early stop disabled"
    elif confidence is None:
        why = "no confidence: the model gave no logits"
    elif not finished:
        why = f"answer not finished ({finish})"
    elif tokens > spec.early_stop_max_tokens:
        why = f"{tokens} tokens: longer than {spec.early_stop_max_tokens}"
    elif text.count("```") % 2 and not cut:  # cut inside a block: it was opened late
        why = "an unclosed code block"
    elif not text:
        why = "an empty answer"
    elif confidence < spec.threshold:
        why = f"confidence {confidence:.3f} below {spec.threshold}"
    else:
        why = f"confidence {confidence:.3f} at least {spec.threshold}"
    if cut:
        why += f", cut at {tokens} tokens before any follower started"
    return {"by": run.role, "agent": run.state.agent_id, "taken": why.startswith("confidence")
            and confidence is not None and confidence >= spec.threshold,
            "confidence": None if confidence is None else round(confidence, 4),
            "entropy": None if (h := run.entropy()) is None else round(h, 4),
            "threshold": spec.threshold, "tokens": tokens, "code_at": run.state.code_at,
            # When it was decided: the judged answer's length, and ms since the request
            # started (set by the caller: the member's end).
            "at_token": tokens, "at_ms": None, "why": why}
