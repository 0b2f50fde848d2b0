"""inferencing: one generation in a worker thread, under the deadline and the stall watchdog."""

from __future__ import annotations

import dataclasses
import math
import secrets
import threading
import time
from collections.abc import AsyncGenerator, Callable, Iterator
from contextlib import aclosing, contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

import anyio

from .._exceptions import (
    GenerationStalled,
    InferenceError,
)
from ..backends import CoreGate, GenerationEvent, SamplingParams
from ..services.observability import _attributes as attr
from ..services.resilience._guardrails import RepetitionGuard
from ._attempt import judge
from ._output import served
from ._state import Next, RequestState, Services

if TYPE_CHECKING:
    from .._seams import Lease


async def inferencing(services: Services,
                      state: RequestState) -> AsyncGenerator[str | Next, None]:
    """Text deltas as they are generated, then `Next("completed" | "inference_failed")`."""
    lease, sampling, agent = state.lease, state.sampling, state.agent
    assert lease is not None and sampling is not None and agent is not None
    if sampling.seed < 0:  # drawn here so the trace records it: `replay --live` reuses it
        sampling = state.sampling = dataclasses.replace(sampling,
                                                        seed=secrets.randbelow(2**31 - 1))
    state.notes.update({attr.GEN_AI_OPERATION_NAME: "chat", attr.GEN_AI_SYSTEM: "ctransformers",
                        attr.GEN_AI_REQUEST_MODEL: agent.id,
                        attr.GEN_AI_REQUEST_MAX_TOKENS: sampling.max_tokens,
                        attr.GEN_AI_REQUEST_TEMPERATURE: sampling.temperature,
                        attr.GEN_AI_REQUEST_TOP_P: sampling.top_p,
                        attr.GEN_AI_REQUEST_TOP_K: sampling.top_k,
                        attr.GEN_AI_USAGE_INPUT_TOKENS: len(state.prompt_ids)})
    take = _Recorder(services, state, lease.model.tokenizer.vocab_size)
    run = _Run(services, state, lease, sampling, take)
    try:
        with _cores(services) as cores:
            run.cores = cores
            if state.permit is not None:
                # From here a timeout is the model's, not the queue's (given enough time): the
                # wait for a slot happened in loading_agent, under the deadline.
                state.permit.engage(state.deadline.remaining())
            if state.streaming:
                async with aclosing(_stream_tokens(run)) as texts:
                    async for text in texts:
                        yield text
            else:
                await _generate(run)
    except InferenceError as exc:
        state.failures.append((agent.id, exc.message))
        state.notes[attr.INFERENCE_ERROR] = exc.message
        failure = "malformed_output" if "malformed" in exc.message else "inference_failed"
        if isinstance(exc, GenerationStalled):
            # Its thread may still be stuck in the runtime: nobody gets this slot again.
            lease.quarantine()
            failure = "stalled"
        state.notes[attr.INFERENCE_FAILURE] = failure
        state.failure_kind = failure
        judge(state, failure)
        yield Next("inference_failed")
        return
    take.learn(lease)
    if state.stopped_for is not None:
        state.finish_reason = state.stopped_for
    if state.output_format is not None:
        if (mask := state.mask) is not None:  # what the mask cost and changed
            ms = sorted(mask.mask_ms)
            state.notes.update({attr.OUTPUT_MASK_FORCED: mask.forced,
                                attr.OUTPUT_MASK_MS_P50: ms[len(ms) // 2] if ms else 0.0})
        yield Next("generated")  # checking_output decodes and validates it
        return
    await served(services, state)
    yield Next("completed")


class _Recorder:
    """Takes each generated chunk: output guards first, then the request's text."""

    __slots__ = ("_services", "_state", "_vocab", "first_at", "last_at", "repetition",
                 "tokens")

    def __init__(self, services: Services, state: RequestState, vocab_size: int) -> None:
        self._services, self._state, self._vocab = services, state, vocab_size
        self.repetition = RepetitionGuard()
        # Real time of the first and last chunk (the watchdog's heartbeat: worker threads
        # are real, whatever clock the services run on).
        self.first_at: float | None = None
        self.last_at = time.monotonic()
        self.tokens = 0

    def learn(self, lease: Lease) -> None:
        """Tell the lease how fast tokens came after the first (the stall default)."""
        if self.first_at is not None and self.tokens > 1:
            lease.record_generation(self.tokens - 1, self.last_at - self.first_at)

    def __call__(self, event: GenerationEvent) -> None:
        self.last_at = time.monotonic()
        if self.first_at is None:
            self.first_at = self.last_at
        self.tokens += len(event.token_ids)
        state, guardrails = self._state, self._services.guardrails
        if guardrails is not None:
            blocked = guardrails.check_output(event.token_ids, event.text,
                                              vocab_size=self._vocab).blocked
            if blocked is not None:
                raise InferenceError(f"malformed output: {blocked.message}")
        if state.first_token_at is None:
            state.first_token_at = (self._services.clock.monotonic() - state.started) * 1e3
        state.token_ids.extend(event.token_ids)
        state.logprobs.extend(event.logprobs)
        state.entropies.extend(event.entropies)
        if event.text:
            state.text_parts.append(event.text)
            state.emitted_chars += len(event.text)
            if state.token_scores and state.code_at is None and _opens_code(state.text_parts):
                state.code_at = len(state.token_ids)
            if self.repetition.feed(event.text):
                state.stopped_for = "repetition"
                state.notes[attr.GUARD_REPETITION] = self.repetition.reason
                state.stop.set()
        if state.on_tokens is not None:
            state.on_tokens()


def _opens_code(parts: list[str]) -> bool:
    """The newest text holds a code fence (CommonMark: three backticks or three tildes). A
    fence may come split over events: the last few parts hold it whole."""
    if "`" not in parts[-1] and "~" not in parts[-1]:
        return False
    tail = "".join(parts[-3:])
    return "```" in tail or "~~~" in tail


_PROMPT_CHUNK = 64  # prompt tokens per runtime call (the backend's chunk)
T = TypeVar("T")


@contextmanager
def _cores(services: Services) -> Iterator[CoreGate | None]:
    """This generation's share of the cores, for its whole run (None: fixed threads)."""
    if services.cores is None:
        yield None
        return
    with services.cores.consumer() as gate:
        yield gate


@dataclass(eq=False, slots=True)
class _Run:
    """One generation: the slot it runs in, its parameters, its recorder and its cores."""

    services: Services
    state: RequestState
    lease: Lease
    sampling: SamplingParams
    take: _Recorder
    cores: CoreGate | None = None

    def stall_limit(self) -> float:
        """Seconds the next chunk may take: `stall_s`, and for the first one as much again per
        prompt chunk the slot must evaluate (a long prompt is not a stall)."""
        stall = self.lease.stall_s
        if self.take.first_at is not None:
            return stall
        new = len(self.state.prompt_ids) - self.lease.load_info.reused_tokens
        return stall * (1 + math.ceil(max(0, new) / _PROMPT_CHUNK))


async def _in_worker(run: _Run, fn: Callable[[], T], *, one_chunk: bool = False) -> T:
    """`fn()` in a worker thread, abandoned on cancellation, at the request's deadline, or
    when no chunk arrives within the stall limit (`GenerationStalled`).

    `one_chunk`: `fn` returns with the next chunk (a stream's hop), so the stall limit is a
    deadline on the hop's own scope; otherwise chunks arrive while `fn` runs (`run.take` from
    the thread) and a watchdog task follows them. A task and a cancelled task group per token
    cost the event loop ~40 % of its time per token: CPU the model's threads need.

    Abandoning is safe because the thread is told to stop (`state.stop`) and, if it started,
    is awaited (shielded) before the slot is released: the next request never finds the
    instance still generating. A job cancelled before a thread took it never runs. A stalled
    thread is not awaited (it may never return): the caller quarantines its slot instead.
    """
    state, take = run.state, run.take
    started, finished, abandoned = threading.Event(), threading.Event(), threading.Event()
    outcome: list[T] = []
    failed: list[Exception] = []  # raised here, not through the watchdog's task group
    stalled: list[float] = []

    def work() -> None:
        started.set()
        try:
            if not abandoned.is_set():  # nobody awaits an abandoned job
                outcome.append(fn())
        except Exception as exc:
            failed.append(exc)
        finally:
            finished.set()

    async def stop_and_wait() -> None:
        state.stop.set()
        abandoned.set()  # before reading `started`: the thread sets it, then reads abandoned
        if started.is_set():
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(finished.wait)

    async def watch(scope: anyio.CancelScope) -> None:
        limit = run.stall_limit()
        take.last_at = time.monotonic()
        while (left := take.last_at + limit - time.monotonic()) > 0:
            await anyio.sleep(left)
            limit = run.stall_limit()
        stalled.append(limit)
        scope.cancel()

    try:
        if one_chunk:
            # One scope for both limits; which one ended the hop is read from the clock.
            limit = run.stall_limit()
            with anyio.CancelScope(
                    deadline=min(state.deadline.at, anyio.current_time() + limit)) as hop:
                await anyio.to_thread.run_sync(work, abandon_on_cancel=True)
            if hop.cancelled_caught and not state.deadline.expired:
                stalled.append(limit)
            if failed:
                raise failed[0]
            if not hop.cancelled_caught:
                return outcome[0]
        else:
            with state.deadline.scope():
                async with anyio.create_task_group() as group:
                    group.start_soon(watch, group.cancel_scope)
                    await anyio.to_thread.run_sync(work, abandon_on_cancel=True)
                    group.cancel_scope.cancel()
                if failed:
                    raise failed[0]
                if not stalled:
                    return outcome[0]
    except anyio.get_cancelled_exc_class():
        await stop_and_wait()
        raise
    if stalled:
        abandoned.set()
        state.stop.set()  # the stuck thread holds this event: it stops if it ever returns
        state.stop = threading.Event()  # the next attempt (another agent) is not stopped
        raise GenerationStalled(stalled[0])
    # Only reached when the deadline's scope swallowed the cancellation.
    await stop_and_wait()
    raise state.deadline.error("inferencing", request_id=state.request.id)


async def _stream_tokens(run: _Run) -> AsyncGenerator[str, None]:
    """One worker-thread hop per chunk: the consumer sees each token as it is made."""
    state = run.state
    stream = run.lease.model.open_stream(state.prompt_ids, run.sampling,
                                         should_stop=state.stop.is_set, cores=run.cores,
                                         interval_s=run.services.stream_interval_s)
    stalled = False
    try:
        while (event := await _in_worker(run, stream.next_event, one_chunk=True)) is not None:
            run.take(event)
            if event.text:
                yield event.text
        outcome = stream.outcome
        state.finish_reason, state.mask = outcome.finish_reason, outcome.mask
        state.prefilled = outcome.prefilled
    except GenerationStalled:
        stalled = True  # its thread may still be inside the stream: closing it would race
        raise
    finally:
        if not stalled:
            stream.close()


async def _generate(run: _Run) -> None:
    """The whole generation in one worker-thread hop: nobody waits for the chunks."""
    state = run.state
    outcome = await _in_worker(run, lambda: run.lease.model.generate(
        state.prompt_ids, run.sampling, on_event=run.take, should_stop=state.stop.is_set,
        cores=run.cores))
    state.finish_reason, state.mask = outcome.finish_reason, outcome.mask
    state.prefilled = outcome.prefilled
