"""Circuit breakers, one per model instance: CLOSED -> OPEN -> HALF_OPEN (machines/breaker.scxml).

A breaker opens on the failure RATE of the last model calls (a count-based sliding window, as
resilience4j's), not on a run of failures: a flaky model stays in use, a broken one is cut off.
A `BreakerBoard` maps each agent to the breaker of the model instance that serves it (agents
sharing a model share its breaker); `allow()` hands out a permit or refuses, and the permit's
verdict drives the breaker's own statechart. Time comes from the Clock.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal

from orion_fsm._clock import Clock, SystemClock
from orion_fsm._exceptions import ConfigurationError, ModelLoadError, OrionError, RequestTimeout
from orion_fsm._resources import data_file
from orion_fsm.services.models._loader import ModelKey

if TYPE_CHECKING:
    from opentelemetry.metrics import CallbackOptions, Meter, Observation
    from statemachine import StateChart

    from orion_fsm.services.models._registry import AgentSpec

__all__ = [
    "STATE_VALUES",
    "BreakerBoard",
    "BreakerConfig",
    "BreakerPermit",
    "BreakerState",
    "BreakerTransition",
    "CircuitBreaker",
    "breaker_chart",
    "breaker_keys",
    "register_breaker_metrics",
    "registry_configs",
]

BreakerState = Literal["closed", "open", "half_open"]
# Gauge values, ordered by severity so that max() over agents is the worst one.
STATE_VALUES: Final[Mapping[str, int]] = {"closed": 0, "half_open": 1, "open": 2}
TransitionCallback = Callable[[str, str, str, str], None]  # (key, source, target, reason)


@functools.cache
def breaker_chart(path: Path | None = None) -> type[StateChart[Any]]:
    """The breaker statechart class. Built once; each breaker is a cheap instance."""
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
    """When a breaker opens and when it tries again (resilience4j's count-based breaker).

    Defaults are sized for a local model that serves a few calls a second: a broken model is
    cut off after `minimum_calls` calls; independent faults on 20 % of calls never opened it in
    40,000 simulated calls (`python -m bench --only breaker_rule`), on 30 % it opens now and
    then (28 times; 42 % of calls refused with a 30 s cool-down), and a window of 20 calls,
    at least 10, opened it at 20 % too (31 % refused).
    """

    # The breaker opens when at least this fraction of the window's calls failed
    # (resilience4j failureRateThreshold, 50 %).
    failure_rate_threshold: float = 0.5
    # The last this-many model calls make the window (resilience4j slidingWindowSize).
    window_size: int = 40
    # No rate is judged on fewer calls (resilience4j minimumNumberOfCalls): two failures out
    # of the first three calls say little.
    minimum_calls: int = 20
    reset_after_s: float = 30.0  # time open before probe requests are let through
    # A trial never resolved within this (a lost permit) no longer blocks the next trial;
    # no request lives longer than the per-request timeout, so that is the default.
    trial_timeout_s: float = 60.0
    # Half-open lets this many probe requests through (resilience4j's permitted calls in
    # half-open state); the rest fail over at once. Their failure rate decides, against the
    # same threshold: below it the breaker closes, at or above it reopens, each as soon as
    # the probes still out cannot change the answer (5 probes at 50 %: 3 successes close,
    # 3 failures reopen; a model failing 30 % of its calls recovers ~84 % of the time).
    half_open_probes: int = 5
    # A model call cut short by the request's deadline counts against the model only if it
    # was given at least this long: a request that reached the model with a few milliseconds
    # left says nothing about the model (it was the queue's time).
    timeout_blame_s: float = 0.25

    def __post_init__(self) -> None:
        for name in ("window_size", "minimum_calls", "half_open_probes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigurationError(f"BreakerConfig.{name}", value, "an integer >= 1")
        if self.minimum_calls > self.window_size:
            raise ConfigurationError("BreakerConfig.minimum_calls", self.minimum_calls,
                                     f"at most window_size ({self.window_size})")
        rate = self.failure_rate_threshold
        if isinstance(rate, bool) or not isinstance(rate, int | float) or not 0 < rate <= 1:
            raise ConfigurationError("BreakerConfig.failure_rate_threshold", rate,
                                     "a fraction in (0, 1]")
        for name in ("reset_after_s", "trial_timeout_s", "timeout_blame_s"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or not value >= 0:
                raise ConfigurationError(f"BreakerConfig.{name}", value,
                                         "a number of seconds >= 0")

    @property
    def probe_failures_to_reopen(self) -> int:
        """Failed probes whose rate reaches the threshold whatever the others do."""
        return max(1, math.ceil(self.failure_rate_threshold * self.half_open_probes - 1e-9))

    @property
    def probe_successes_to_close(self) -> int:
        """Successful probes that keep the rate below the threshold whatever the others do."""
        return self.half_open_probes - self.probe_failures_to_reopen + 1

    def as_dict(self) -> dict[str, Any]:
        # Spelled out: dataclasses.asdict costs ~5 µs, and this runs for every trace record.
        return {"failure_rate_threshold": self.failure_rate_threshold,
                "window_size": self.window_size, "minimum_calls": self.minimum_calls,
                "reset_after_s": self.reset_after_s, "trial_timeout_s": self.trial_timeout_s,
                "half_open_probes": self.half_open_probes,
                "timeout_blame_s": self.timeout_blame_s}


@dataclass(frozen=True, slots=True)
class BreakerTransition:
    key: str  # the breaker's key: the model instance it guards
    source: str
    target: str
    reason: str
    at: float  # unix time, from the clock

    def as_dict(self) -> dict[str, Any]:
        return {"key": self.key, "source": self.source, "target": self.target,
                "reason": self.reason, "at": self.at}


class _BreakerModel:
    """The statechart's model: what its guards read. The chart writes `state` here."""

    __slots__ = ("clock", "config", "failures", "opened_at", "probes_failed",
                 "probes_succeeded", "state", "window", "window_failures")

    def __init__(self, config: BreakerConfig, clock: Clock) -> None:
        self.config = config
        self.clock = clock
        self.failures = 0  # consecutive, reported only: the rate decides
        # The last `window_size` verdicts while closed (True: failed), and how many failed.
        self.window: deque[bool] = deque(maxlen=config.window_size)
        self.window_failures = 0
        self.opened_at = 0.0  # monotonic
        self.probes_succeeded = 0  # in the current half-open period
        self.probes_failed = 0
        self.state = "closed"

    def count(self, failed: bool) -> None:
        window = self.window
        if len(window) == window.maxlen and window[0]:
            self.window_failures -= 1  # the oldest verdict leaves the window
        window.append(failed)
        self.window_failures += failed

    def clear_window(self) -> None:
        self.window.clear()
        self.window_failures = 0

    @property
    def failure_rate(self) -> float:
        return self.window_failures / len(self.window) if self.window else 0.0

    @property
    def rate_reached(self) -> bool:
        return len(self.window) >= self.config.minimum_calls \
            and self.failure_rate >= self.config.failure_rate_threshold

    @property
    def probes_passed(self) -> bool:
        return self.probes_succeeded >= self.config.probe_successes_to_close

    @property
    def probes_failed_enough(self) -> bool:
        return self.probes_failed >= self.config.probe_failures_to_reopen

    @property
    def cool_down_elapsed(self) -> bool:
        return self.clock.monotonic() - self.opened_at >= self.config.reset_after_s


class BreakerPermit:
    """Leave to call one model instance. Give exactly one verdict; later calls are no-ops.

    `engage()` when the model call itself starts: only then can the way the attempt ended
    (a timeout, a crash) be the model's fault. `success()` / `failure(reason)` for what the
    model did; `release()` when the request ended without a verdict on the model (cancelled by
    the caller, rejected as invalid, out of time before the model ran). A verdict given after
    the breaker changed state since the permit was issued is stale and ignored.
    """

    __slots__ = ("_breaker", "_epoch", "_resolved", "engaged", "given_s", "transition", "trial")

    def __init__(self, breaker: CircuitBreaker, epoch: int, trial: bool) -> None:
        self._breaker = breaker
        self._epoch = epoch
        self._resolved = False
        self.engaged = False  # the model call started
        self.given_s = 0.0  # the time the call had before the request's deadline
        self.trial = trial  # one of the probes a half-open breaker lets through
        self.transition: BreakerTransition | None = None  # what the verdict changed

    @property
    def resolved(self) -> bool:
        return self._resolved

    @property
    def key(self) -> str:
        return self._breaker.key

    def engage(self, given_s: float = math.inf) -> None:
        """The model call starts with `given_s` left before the request's deadline: from now
        on a crash is the model's failure, and so is a timeout if it had `timeout_blame_s`."""
        self.engaged = True
        self.given_s = given_s

    @property
    def blames_timeout(self) -> bool:
        return self.engaged and self.given_s >= self._breaker.config.timeout_blame_s

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
            self._breaker._return_probe()


class CircuitBreaker:
    """The breaker of one model instance (`key`). Used from the engine's event loop only."""

    __slots__ = ("_clock", "_epoch", "_machine", "_model", "_on_transition", "_probes_out",
                 "config", "key", "last_failure", "last_transition", "opened_count",
                 "recovered_count", "recovery_s")

    def __init__(self, key: str, config: BreakerConfig | None = None, *,
                 clock: Clock | None = None, on_transition: TransitionCallback | None = None,
                 chart: type[StateChart[Any]] | None = None) -> None:
        self.key = key
        self.config = config or BreakerConfig()
        self._clock: Clock = clock or SystemClock()
        self._model = _BreakerModel(self.config, self._clock)
        self._machine = (chart or breaker_chart())(model=self._model)
        self._on_transition = on_transition
        # Bumped on every state change: verdicts of permits issued before it are stale.
        self._epoch = 0
        self._probes_out: list[float] = []  # monotonic start of each unresolved probe permit
        self.opened_count = 0
        self.recovered_count = 0  # half_open -> closed
        self.recovery_s: list[float] = []  # time from opening to closing again, per recovery
        self.last_failure: str | None = None
        self.last_transition: BreakerTransition | None = None

    @property
    def state(self) -> BreakerState:
        state: BreakerState = self._model.state  # type: ignore[assignment]
        return state

    @property
    def consecutive_failures(self) -> int:
        return self._model.failures

    @property
    def failure_rate(self) -> float:
        """Failed fraction of the calls in the window (0 with none)."""
        return self._model.failure_rate

    def allow(self) -> BreakerPermit | None:
        """A permit to call the model, or None: the breaker is open, go to fallback."""
        state = self._model.state
        if state == "closed":
            return BreakerPermit(self, self._epoch, trial=False)
        if state == "open":
            # Cheap while cooling down: only the guard-passing case pays for a machine event.
            if not self._model.cool_down_elapsed:
                return None
            self._send("retry_due", f"open for {self.config.reset_after_s:g} s: "
                       f"{self.config.half_open_probes} probe request(s)")
            if self._model.state != "half_open":
                return None
        now = self._clock.monotonic()
        # A probe never resolved within trial_timeout_s (a lost permit) gives its place back.
        out = self._probes_out = [t for t in self._probes_out
                                  if now - t < self.config.trial_timeout_s]
        if len(out) + self._probes_done() >= self.config.half_open_probes:
            return None  # every probe is out or done: fail over at once, do not wait
        out.append(now)
        return BreakerPermit(self, self._epoch, trial=True)

    def retry_after(self) -> float:
        """Seconds until this breaker lets a request through again (0: it would now)."""
        state, now = self._model.state, self._clock.monotonic()
        if state == "closed":
            return 0.0
        if state == "open":
            return max(0.0, self._model.opened_at + self.config.reset_after_s - now)
        if len(self._probes_out) + self._probes_done() < self.config.half_open_probes:
            return 0.0
        # Every probe is out: the earliest a place frees is when its permit would lapse; most
        # resolve far sooner, so this is an upper bound.
        return max(0.0, min(self._probes_out, default=now)
                   + self.config.trial_timeout_s - now)

    def _probes_done(self) -> int:
        return self._model.probes_succeeded + self._model.probes_failed

    def _return_probe(self) -> None:
        if self._probes_out:
            self._probes_out.pop(0)

    def record_success(self) -> BreakerTransition | None:
        """The model served a request. Closes a half-open breaker once enough probes passed."""
        model = self._model
        model.failures = 0
        if model.state == "closed":
            model.count(False)
            return None
        if model.state == "open":
            return None
        self._return_probe()
        model.probes_succeeded += 1
        return self._send("success", f"{model.probes_succeeded} probe request(s) succeeded")

    def record_failure(self, reason: str) -> BreakerTransition | None:
        """The model failed a request (`reason`: load_failed, inference_failed, timeout, ...)."""
        model = self._model
        model.failures += 1
        self.last_failure = reason
        if model.state == "open":
            return None
        if model.state == "closed":
            model.count(True)
        else:
            self._return_probe()
            model.probes_failed += 1
        return self._send("failure", reason)

    def reset(self) -> BreakerTransition | None:
        """Close the breaker now (an operator's decision) and forget the failures."""
        self._model.failures = 0
        self._model.clear_window()
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
            # The rate the breaker judges, over the calls in its window (closed only).
            "window_calls": len(model.window),
            "window_failures": model.window_failures,
            "failure_rate": round(model.failure_rate, 4),
            "opened_count": self.opened_count,
            "last_failure": self.last_failure,
            "retry_at": retry_at,
            "probes_in_flight": len(self._probes_out) if model.state == "half_open" else 0,
            "probes_succeeded": model.probes_succeeded if model.state == "half_open" else 0,
            "probes_failed": model.probes_failed if model.state == "half_open" else 0,
            "recovered_count": self.recovered_count,
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
        self._probes_out = []
        self._model.probes_succeeded = self._model.probes_failed = 0
        # A new period judges its own calls: the window restarts when the breaker opens
        # (the failures are what opened it) and when it closes again (a fresh start).
        self._model.clear_window()
        if target == "open":
            self._model.opened_at = self._clock.monotonic()
            self.opened_count += 1
        elif source == "half_open" and target == "closed":
            self.recovered_count += 1
            self.recovery_s.append(self._clock.monotonic() - self._model.opened_at)
        transition = BreakerTransition(self.key, source, target, reason, self._clock.time())
        self.last_transition = transition
        if self._on_transition is not None:
            self._on_transition(self.key, source, target, reason)
        return transition


class BreakerBoard:
    """The breakers of the engine, one per model instance, shared by the agents it serves.

    A breaker guards what fails together: the loaded model (file, variant, context) that
    generates for an agent. `assign({agent: key})` says which instance serves each agent
    (the Engine does it from the loader); an agent never assigned is its own key. Breakers
    are made on first use with the config of their key (or of one of its agents, or the
    default). Every method taking `agent` resolves it to its key.
    """

    def __init__(self, default: BreakerConfig | None = None, *,
                 per_agent: Mapping[str, BreakerConfig] | None = None,
                 agents: Iterable[str] = (), clock: Clock | None = None,
                 on_transition: TransitionCallback | None = None,
                 keys: Mapping[str, str] | None = None) -> None:
        self.default = default or BreakerConfig()
        self._per_agent = dict(per_agent or {})  # by breaker key or agent id
        self._clock: Clock = clock or SystemClock()
        self._on_transition = on_transition
        self._breakers: dict[str, CircuitBreaker] = {}
        self._keys: dict[str, str] = {}  # agent -> breaker key
        self._agents: dict[str, list[str]] = {}  # breaker key -> agents, in assignment order
        self._chart = breaker_chart()
        self._pending = list(agents)
        self.assign(keys or {})

    def assign(self, keys: Mapping[str, str]) -> None:
        """Map agents to the key of the model instance serving them; agents that share a key
        share one breaker. Agents named at construction without a key are their own key."""
        for agent, key in keys.items():
            previous = self._keys.get(agent)
            if previous is not None and previous != key:
                self._agents[previous].remove(agent)
            self._keys[agent] = key
            if agent not in self._agents.setdefault(key, []):
                self._agents[key].append(agent)
            made = self._breakers.get(agent)
            if key != agent and made is not None and made.last_transition is None \
                    and not made.consecutive_failures:
                del self._breakers[agent]  # made under the agent's name before it had a key
        for agent in [*self._pending, *keys]:
            self.breaker(agent)

    def key_for(self, agent: str) -> str:
        """The key of the breaker guarding `agent`'s model (the agent itself if unassigned)."""
        return self._keys.get(agent, agent)

    def agents_of(self, key: str) -> list[str]:
        """The agents a breaker guards (assigned ones; an unassigned key guards itself)."""
        return list(self._agents.get(key) or [key])

    def config_for(self, key: str) -> BreakerConfig:
        config = self._per_agent.get(key)
        if config is None:
            config = next((self._per_agent[a] for a in self._agents.get(key, ())
                           if a in self._per_agent), self.default)
        return config

    def breaker(self, agent: str) -> CircuitBreaker:
        """The breaker guarding `agent` (or the breaker of key `agent`)."""
        key = self._keys.get(agent, agent)
        breaker = self._breakers.get(key)
        if breaker is None:
            breaker = self._breakers[key] = CircuitBreaker(
                key, self.config_for(key), clock=self._clock,
                on_transition=self._notify, chart=self._chart)
        return breaker

    def allow(self, agent: str) -> BreakerPermit | None:
        return self.breaker(agent).allow()

    def retry_after(self, agents: Iterable[str]) -> float:
        """Seconds until the first of `agents`' breakers lets a request through (0: now)."""
        return min((self.breaker(a).retry_after() for a in agents), default=0.0)

    @contextmanager
    def attempt(self, agent: str) -> Iterator[BreakerPermit | None]:
        """One attempt on `agent`'s model: its permit, or None when the breaker is open.

        The holder gives the verdict (`success()` / `failure(reason)`) and engages the permit
        when the model call starts. Leaving the block without a verdict is judged here, the
        one place that maps how an attempt ended: a timeout or a crash while the model call
        ran counts against its breaker; a caller who gave up, or a deadline that expired
        before the model ran (queued, waiting for a load or a slot), says nothing about it.
        """
        permit = self.allow(agent)
        try:
            yield permit
        except BaseException as exc:
            if permit is not None and (reason := _failure_reason(exc, permit)) is not None:
                permit.failure(reason)
            raise
        finally:
            if permit is not None:
                permit.release()  # a no-op once a verdict was given

    def subscribe(self, callback: TransitionCallback) -> None:
        """Also call `callback(key, source, target, reason)` on every breaker transition."""
        previous = self._on_transition
        if previous is None:
            self._on_transition = callback
            return

        def both(key: str, source: str, target: str, reason: str) -> None:
            previous(key, source, target, reason)
            callback(key, source, target, reason)

        self._on_transition = both

    def _notify(self, key: str, source: str, target: str, reason: str) -> None:
        if self._on_transition is not None:
            self._on_transition(key, source, target, reason)

    def __iter__(self) -> Iterator[CircuitBreaker]:
        return iter(list(self._breakers.values()))

    def __len__(self) -> int:
        return len(self._breakers)

    def snapshot(self) -> dict[str, dict[str, Any]]:
        """`{key: {..., "agents": [...]}}`: what each trace record stores under "breakers"."""
        return {key: {**b.snapshot(), "agents": self.agents_of(key)}
                for key, b in self._breakers.items()}


def registry_configs(agents: Iterable[AgentSpec],
                     default: BreakerConfig | None = None) -> dict[str, BreakerConfig]:
    """`{agent id: BreakerConfig}` for the agents whose registry entry has a `breaker`
    section: its fields over `default`'s (a bad combination raises ConfigurationError)."""
    base = default or BreakerConfig()
    configs = {}
    for agent in agents:
        if not agent.breaker:
            continue
        given = dict(agent.breaker)  # the registry's schema checked names, types and bounds
        configs[agent.id] = dataclasses.replace(
            base,
            failure_rate_threshold=float(given.get("failure_rate_threshold",
                                                   base.failure_rate_threshold)),
            window_size=int(given.get("window_size", base.window_size)),
            minimum_calls=int(given.get("minimum_calls", base.minimum_calls)),
            reset_after_s=float(given.get("reset_after_s", base.reset_after_s)),
            half_open_probes=int(given.get("half_open_probes", base.half_open_probes)))
    return configs


def breaker_keys(agents: Iterable[AgentSpec],
                 key_for: Callable[[AgentSpec], ModelKey]) -> dict[str, str]:
    """`{agent id: breaker key}`: agents served by one model instance get one key.

    The key is the instance's label (`file-stem:variant@context`), or its full path where two
    files share a stem; an agent whose model cannot be found is keyed by its declared source.
    """
    found: dict[str, ModelKey | str] = {}
    for agent in agents:
        try:
            found[agent.id] = key_for(agent)
        except ModelLoadError:
            found[agent.id] = f"{agent.model.describe()}@{agent.context_length}"
    labels: dict[str, set[ModelKey]] = {}
    for key in found.values():
        if isinstance(key, ModelKey):
            labels.setdefault(key.label, set()).add(key)
    return {agent: key if isinstance(key, str) else
            key.label if len(labels[key.label]) == 1 else
            f"{key.source}:{key.variant}@{key.context_length}"
            for agent, key in found.items()}


def _failure_reason(exc: BaseException, permit: BreakerPermit) -> str | None:
    if not permit.engaged:
        return None  # the model never ran: out of time while queued or loading, or cancelled
    if isinstance(exc, RequestTimeout):
        return "timeout" if permit.blames_timeout else None
    if isinstance(exc, Exception):
        return "internal"
    return None  # cancelled, GeneratorExit (the consumer left), KeyboardInterrupt


def register_breaker_metrics(meter: Meter, board: BreakerBoard) -> None:
    """Observable gauges of every breaker on `board`, labelled with `orion.breaker.key`.

    `orion.breaker.state` (closed 0, half_open 1, open 2), `orion.breaker.consecutive_failures`,
    `orion.breaker.failure_rate` (over its window) and `orion.breaker.opened` (times opened
    since the engine started).
    """

    # Imported when metrics are wired, not with the module: OpenTelemetry's metrics API
    # costs ~7 ms of `import orion_fsm`.
    from opentelemetry.metrics import Observation

    def states(_: CallbackOptions) -> Iterable[Observation]:
        return [Observation(STATE_VALUES[b.state], {"orion.breaker.key": b.key}) for b in board]

    def failures(_: CallbackOptions) -> Iterable[Observation]:
        return [Observation(b.consecutive_failures, {"orion.breaker.key": b.key}) for b in board]

    def rates(_: CallbackOptions) -> Iterable[Observation]:
        return [Observation(b.failure_rate, {"orion.breaker.key": b.key}) for b in board]

    def opened(_: CallbackOptions) -> Iterable[Observation]:
        return [Observation(b.opened_count, {"orion.breaker.key": b.key}) for b in board]

    meter.create_observable_gauge(
        "orion.breaker.state", callbacks=[states],
        description="circuit breaker state per model instance: 0 closed, 1 half_open, 2 open")
    meter.create_observable_gauge(
        "orion.breaker.consecutive_failures", callbacks=[failures], unit="{failure}",
        description="consecutive failures counted by the circuit breaker")
    meter.create_observable_gauge(
        "orion.breaker.failure_rate", callbacks=[rates], unit="1",
        description="failed fraction of the model calls in the circuit breaker's window")
    meter.create_observable_counter(
        "orion.breaker.opened", callbacks=[opened], unit="{transition}",
        description="times the circuit breaker opened")
