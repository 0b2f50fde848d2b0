"""Circuit breakers, one per agent: CLOSED -> OPEN -> HALF_OPEN, as drawn in machines/breaker.scxml.

A `BreakerBoard` is what the engine holds; `CircuitBreaker.allow()` hands out a permit (or
refuses), and the permit's verdict drives the breaker's own statechart. Time comes from the Clock.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal

from orion_fsm._clock import Clock, SystemClock
from orion_fsm._exceptions import ConfigurationError, OrionError, RequestTimeout
from orion_fsm._resources import data_file

if TYPE_CHECKING:
    from opentelemetry.metrics import CallbackOptions, Meter, Observation
    from statemachine import StateChart

__all__ = [
    "STATE_VALUES",
    "BreakerBoard",
    "BreakerConfig",
    "BreakerPermit",
    "BreakerState",
    "BreakerTransition",
    "CircuitBreaker",
    "breaker_chart",
    "register_breaker_metrics",
]

BreakerState = Literal["closed", "open", "half_open"]
# Gauge values, ordered by severity so that max() over agents is the worst one.
STATE_VALUES: Final[Mapping[str, int]] = {"closed": 0, "half_open": 1, "open": 2}
TransitionCallback = Callable[[str, str, str, str], None]  # (agent, source, target, reason)


@functools.cache
def breaker_chart(path: Path | None = None) -> type[StateChart[Any]]:
    """The breaker statechart class. Built once; each agent's breaker is a cheap instance."""
    # Imported on first use: python-statemachine costs ~45 ms of `import orion_fsm`.
    from statemachine.io import load

    source = path or data_file("machines", "breaker.scxml")
    chart = load(source)
    states = {s.id for s in chart.states}
    if states != set(STATE_VALUES):
        raise OrionError(
            f"breaker statechart {source} has states {sorted(states)}; the breaker needs "
            f"exactly {sorted(STATE_VALUES)}"
        )
    return chart


@dataclass(frozen=True, slots=True)
class BreakerConfig:
    """When an agent's breaker opens and when it tries again. Defaults: the seed documents."""

    failure_threshold: int = 3  # consecutive failures that open the breaker
    reset_after_s: float = 30.0  # time open before one trial request is let through
    # A trial never resolved within this (a lost permit) no longer blocks the next trial;
    # no request lives longer than the per-request timeout, so that is the default.
    trial_timeout_s: float = 60.0

    def __post_init__(self) -> None:
        if isinstance(self.failure_threshold, bool) or not isinstance(self.failure_threshold, int) \
                or self.failure_threshold < 1:
            raise ConfigurationError("BreakerConfig.failure_threshold",
                                     self.failure_threshold, "an integer >= 1")
        for name in ("reset_after_s", "trial_timeout_s"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or not value >= 0:
                raise ConfigurationError(f"BreakerConfig.{name}", value,
                                         "a number of seconds >= 0")

    def as_dict(self) -> dict[str, Any]:
        # Spelled out: dataclasses.asdict costs ~5 µs, and this runs for every trace record.
        return {"failure_threshold": self.failure_threshold, "reset_after_s": self.reset_after_s,
                "trial_timeout_s": self.trial_timeout_s}


@dataclass(frozen=True, slots=True)
class BreakerTransition:
    agent: str
    source: str
    target: str
    reason: str
    at: float  # unix time, from the clock

    def as_dict(self) -> dict[str, Any]:
        return {"agent": self.agent, "source": self.source, "target": self.target,
                "reason": self.reason, "at": self.at}


class _BreakerModel:
    """The statechart's model: what its guards read. The chart writes `state` here."""

    __slots__ = ("clock", "config", "failures", "opened_at", "state")

    def __init__(self, config: BreakerConfig, clock: Clock) -> None:
        self.config = config
        self.clock = clock
        self.failures = 0
        self.opened_at = 0.0  # monotonic
        self.state = "closed"

    @property
    def threshold_reached(self) -> bool:
        return self.failures >= self.config.failure_threshold

    @property
    def cool_down_elapsed(self) -> bool:
        return self.clock.monotonic() - self.opened_at >= self.config.reset_after_s


class BreakerPermit:
    """Leave to call one agent's model. Give exactly one verdict; later calls are no-ops.

    `success()` / `failure(reason)` for what the model did; `release()` when the request ended
    without a verdict on the model (cancelled by the caller, rejected as invalid). A verdict
    given after the breaker changed state since the permit was issued is stale and ignored.
    """

    __slots__ = ("_breaker", "_epoch", "_resolved", "transition", "trial")

    def __init__(self, breaker: CircuitBreaker, epoch: int, trial: bool) -> None:
        self._breaker = breaker
        self._epoch = epoch
        self._resolved = False
        self.trial = trial  # the one request a half-open breaker lets through
        self.transition: BreakerTransition | None = None  # what the verdict changed

    @property
    def resolved(self) -> bool:
        return self._resolved

    def success(self) -> BreakerTransition | None:
        if self._resolved:
            return None
        self._resolved = True
        if self._epoch != self._breaker._epoch:
            return None
        self.transition = self._breaker.record_success()
        return self.transition

    def failure(self, reason: str) -> BreakerTransition | None:
        if self._resolved:
            return None
        self._resolved = True
        if self._epoch != self._breaker._epoch:
            return None
        self.transition = self._breaker.record_failure(reason)
        return self.transition

    def release(self) -> None:
        if self._resolved:
            return
        self._resolved = True
        if self.trial and self._epoch == self._breaker._epoch:
            self._breaker._trial_started = None


class CircuitBreaker:
    """One agent's breaker. Used from the engine's event loop only (not thread-safe)."""

    __slots__ = ("_clock", "_epoch", "_machine", "_model", "_on_transition", "_trial_started",
                 "agent", "config", "last_failure", "last_transition", "opened_count")

    def __init__(self, agent: str, config: BreakerConfig | None = None, *,
                 clock: Clock | None = None, on_transition: TransitionCallback | None = None,
                 chart: type[StateChart[Any]] | None = None) -> None:
        self.agent = agent
        self.config = config or BreakerConfig()
        self._clock: Clock = clock or SystemClock()
        self._model = _BreakerModel(self.config, self._clock)
        self._machine = (chart or breaker_chart())(model=self._model)
        self._on_transition = on_transition
        # Bumped on every state change: verdicts of permits issued before it are stale.
        self._epoch = 0
        self._trial_started: float | None = None  # monotonic; a trial permit is out
        self.opened_count = 0
        self.last_failure: str | None = None
        self.last_transition: BreakerTransition | None = None

    @property
    def state(self) -> BreakerState:
        state: BreakerState = self._model.state  # type: ignore[assignment]
        return state

    @property
    def consecutive_failures(self) -> int:
        return self._model.failures

    def allow(self) -> BreakerPermit | None:
        """A permit to call the model, or None: the breaker is open, go to fallback."""
        state = self._model.state
        if state == "closed":
            return BreakerPermit(self, self._epoch, trial=False)
        if state == "open":
            # Cheap while cooling down: only the guard-passing case pays for a machine event.
            if not self._model.cool_down_elapsed:
                return None
            self._send("retry_due", f"open for {self.config.reset_after_s:g} s: one trial request")
            if self._model.state != "half_open":
                return None
        now = self._clock.monotonic()
        started = self._trial_started
        if started is not None and now - started < self.config.trial_timeout_s:
            return None
        self._trial_started = now
        return BreakerPermit(self, self._epoch, trial=True)

    def record_success(self) -> BreakerTransition | None:
        """The model served a request. Closes a half-open breaker."""
        self._model.failures = 0
        if self._model.state == "closed":
            return None
        return self._send("success", "trial request succeeded")

    def record_failure(self, reason: str) -> BreakerTransition | None:
        """The model failed a request (`reason`: load_failed, inference_failed, timeout, ...)."""
        self._model.failures += 1
        self.last_failure = reason
        if self._model.state == "open":
            return None
        return self._send("failure", reason)

    def reset(self) -> BreakerTransition | None:
        """Close the breaker now (an operator's decision) and forget the failures."""
        self._model.failures = 0
        return self._send("reset", "reset")

    def snapshot(self) -> dict[str, Any]:
        """JSON-able state for trace records, logs and `orion-fsm breakers`."""
        model = self._model
        retry_at = None
        if model.state == "open":
            due = model.opened_at + self.config.reset_after_s - self._clock.monotonic()
            retry_at = round(self._clock.time() + max(0.0, due), 3)
        last = self.last_transition
        return {
            "state": model.state,
            "consecutive_failures": model.failures,
            "opened_count": self.opened_count,
            "last_failure": self.last_failure,
            "retry_at": retry_at,
            "trial_in_flight": model.state == "half_open" and self._trial_started is not None,
            "last_transition": None if last is None else last.as_dict(),
            "config": self.config.as_dict(),
        }

    def _send(self, event: str, reason: str) -> BreakerTransition | None:
        source = self._model.state
        self._machine.send(event)
        target = self._model.state
        if target == source:
            return None
        self._epoch += 1
        self._trial_started = None
        if target == "open":
            self._model.opened_at = self._clock.monotonic()
            self.opened_count += 1
        transition = BreakerTransition(self.agent, source, target, reason, self._clock.time())
        self.last_transition = transition
        if self._on_transition is not None:
            self._on_transition(self.agent, source, target, reason)
        return transition


class BreakerBoard:
    """Every agent's breaker, made on first use with the agent's config (or the default)."""

    def __init__(self, default: BreakerConfig | None = None, *,
                 per_agent: Mapping[str, BreakerConfig] | None = None,
                 agents: Iterable[str] = (), clock: Clock | None = None,
                 on_transition: TransitionCallback | None = None) -> None:
        self.default = default or BreakerConfig()
        self._per_agent = dict(per_agent or {})
        self._clock: Clock = clock or SystemClock()
        self._on_transition = on_transition
        self._breakers: dict[str, CircuitBreaker] = {}
        self._chart = breaker_chart()
        for agent in agents:
            self.breaker(agent)

    def config_for(self, agent: str) -> BreakerConfig:
        return self._per_agent.get(agent, self.default)

    def breaker(self, agent: str) -> CircuitBreaker:
        breaker = self._breakers.get(agent)
        if breaker is None:
            breaker = self._breakers[agent] = CircuitBreaker(
                agent, self.config_for(agent), clock=self._clock,
                on_transition=self._notify, chart=self._chart)
        return breaker

    def allow(self, agent: str) -> BreakerPermit | None:
        return self.breaker(agent).allow()

    @contextmanager
    def attempt(self, agent: str) -> Iterator[BreakerPermit | None]:
        """One attempt on `agent`'s model: its permit, or None when the breaker is open.

        The holder gives the verdict (`success()` / `failure(reason)`). Leaving the block
        without one is judged here, the one place that maps how an attempt ended: a timeout
        or a crash counts against the agent; a caller who gave up, or a request refused
        before the model ran, says nothing about its health.
        """
        permit = self.allow(agent)
        try:
            yield permit
        except BaseException as exc:
            if permit is not None and (reason := _failure_reason(exc)) is not None:
                permit.failure(reason)
            raise
        finally:
            if permit is not None:
                permit.release()  # a no-op once a verdict was given

    def subscribe(self, callback: TransitionCallback) -> None:
        """Also call `callback(agent, source, target, reason)` on every breaker transition."""
        previous = self._on_transition
        if previous is None:
            self._on_transition = callback
            return

        def both(agent: str, source: str, target: str, reason: str) -> None:
            previous(agent, source, target, reason)
            callback(agent, source, target, reason)

        self._on_transition = both

    def _notify(self, agent: str, source: str, target: str, reason: str) -> None:
        if self._on_transition is not None:
            self._on_transition(agent, source, target, reason)

    def __iter__(self) -> Iterator[CircuitBreaker]:
        return iter(list(self._breakers.values()))

    def __len__(self) -> int:
        return len(self._breakers)

    def snapshot(self) -> dict[str, dict[str, Any]]:
        """`{agent: breaker.snapshot()}`: what each trace record stores under "breakers"."""
        return {agent: b.snapshot() for agent, b in self._breakers.items()}


def _failure_reason(exc: BaseException) -> str | None:
    if isinstance(exc, RequestTimeout):
        return "timeout"
    if isinstance(exc, Exception):
        return "internal"
    return None  # cancelled, GeneratorExit (the consumer left), KeyboardInterrupt


def register_breaker_metrics(meter: Meter, board: BreakerBoard) -> None:
    """Observable gauges of every breaker on `board`, labelled with `orion.agent`.

    `orion.breaker.state` (closed 0, half_open 1, open 2), `orion.breaker.consecutive_failures`,
    and `orion.breaker.opened` (times opened since the engine started).
    """

    # Imported when metrics are wired, not with the module: OpenTelemetry's metrics API
    # costs ~7 ms of `import orion_fsm`.
    from opentelemetry.metrics import Observation

    def states(_: CallbackOptions) -> Iterable[Observation]:
        return [Observation(STATE_VALUES[b.state], {"orion.agent": b.agent}) for b in board]

    def failures(_: CallbackOptions) -> Iterable[Observation]:
        return [Observation(b.consecutive_failures, {"orion.agent": b.agent}) for b in board]

    def opened(_: CallbackOptions) -> Iterable[Observation]:
        return [Observation(b.opened_count, {"orion.agent": b.agent}) for b in board]

    meter.create_observable_gauge(
        "orion.breaker.state", callbacks=[states],
        description="circuit breaker state per agent: 0 closed, 1 half_open, 2 open")
    meter.create_observable_gauge(
        "orion.breaker.consecutive_failures", callbacks=[failures], unit="{failure}",
        description="consecutive failures counted by the agent's circuit breaker")
    meter.create_observable_counter(
        "orion.breaker.opened", callbacks=[opened], unit="{transition}",
        description="times the agent's circuit breaker opened")
