"""Circuit breakers: the statechart's transitions, permits, time through a ManualClock, metrics,
and `orion-fsm breakers` reading the latest trace record."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from orion_fsm import ConfigurationError, ManualClock, OrionError
from orion_fsm.cli import _breakers
from orion_fsm.services.resilience._breaker import (
    BreakerBoard,
    BreakerConfig,
    CircuitBreaker,
    breaker_chart,
    register_breaker_metrics,
)


def make(clock: ManualClock, **config: Any) -> tuple[CircuitBreaker, list[tuple[str, ...]]]:
    """A breaker judging its last 3 calls (all 3 needed), with one probe unless told."""
    config = {"window_size": 3, "minimum_calls": 3, "half_open_probes": 1, **config}
    seen: list[tuple[str, ...]] = []
    breaker = CircuitBreaker("code", BreakerConfig(**config), clock=clock,
                             on_transition=lambda *t: seen.append(t))
    return breaker, seen


SMALL = BreakerConfig(window_size=3, minimum_calls=3)  # 3 failed calls of 3 open it


def fail(breaker: CircuitBreaker, times: int, reason: str = "inference_failed") -> None:
    for _ in range(times):
        permit = breaker.allow()
        assert permit is not None
        permit.failure(reason)


def test_statechart_is_the_documented_closed_open_half_open_cycle() -> None:
    chart = breaker_chart()
    transitions = {(t.source.id, str(t.event), t.target.id)
                   for s in chart.states for t in s.transitions}
    assert transitions == {
        ("closed", "failure", "open"),
        ("open", "retry_due", "half_open"), ("open", "reset", "closed"),
        ("half_open", "success", "closed"), ("half_open", "reset", "closed"),
        ("half_open", "failure", "open"),
    }


def test_breaker_chart_refuses_a_document_with_other_states(tmp_path: Path) -> None:
    doc = tmp_path / "other.scxml"
    doc.write_text('<scxml xmlns="http://www.w3.org/2005/07/scxml" version="1.0" '
                   'initial="closed"><state id="closed"/><state id="broken"/></scxml>')
    with pytest.raises(OrionError, match="half_open"):
        breaker_chart(doc)


def test_breaker_opens_when_the_failure_rate_of_its_window_reaches_the_threshold() -> None:
    breaker, seen = make(ManualClock())
    fail(breaker, 2)
    assert breaker.state == "closed"
    assert breaker.consecutive_failures == 2
    fail(breaker, 1, "timeout")
    assert breaker.state == "open"
    assert seen == [("code", "closed", "open", "timeout")]
    assert breaker.allow() is None


def test_the_rate_is_judged_once_minimum_calls_were_made_over_the_last_window_size() -> None:
    breaker, _ = make(ManualClock(), window_size=4, minimum_calls=4, failure_rate_threshold=0.75)
    for failed in (True, False, True):  # 2 of 3 failed: too few calls to judge
        permit = breaker.allow()
        assert permit is not None
        permit.failure("timeout") if failed else permit.success()
    assert breaker.state == "closed" and breaker.consecutive_failures == 1
    assert breaker.snapshot()["window_failures"] == 2
    fail(breaker, 1)  # 3 of the last 4
    assert breaker.state == "open"


def test_a_flaky_model_stays_closed_and_a_broken_one_opens_with_the_defaults() -> None:
    flaky = CircuitBreaker("code", BreakerConfig(), clock=ManualClock())
    for call in range(300):  # every third call fails: 33 %, and two in a row never happen
        permit = flaky.allow()
        assert permit is not None
        permit.failure("inference_failed") if call % 3 == 0 else permit.success()
    assert flaky.state == "closed" and flaky.opened_count == 0
    assert flaky.failure_rate == pytest.approx(13 / 40)  # calls 261, 264, ..., 297
    broken = CircuitBreaker("code", BreakerConfig(), clock=ManualClock())
    fail(broken, 19)
    assert broken.state == "closed"  # 19 calls: fewer than minimum_calls
    fail(broken, 1)
    assert broken.state == "open" and broken.snapshot()["window_calls"] == 0


def test_open_breaker_lets_half_open_probes_through_after_reset_after_s() -> None:
    clock = ManualClock()
    breaker, seen = make(clock, half_open_probes=2)
    fail(breaker, 3)
    clock.advance(29.9)
    assert breaker.allow() is None
    assert breaker.retry_after() == pytest.approx(0.1)
    clock.advance(0.1)
    probes = [breaker.allow(), breaker.allow()]
    assert all(p is not None and p.trial for p in probes)
    assert breaker.state == "half_open"
    assert breaker.allow() is None  # both probes are out: the rest fail over at once
    assert seen[-1][1:3] == ("open", "half_open")


def test_the_breaker_closes_once_every_probe_succeeded_and_counts_the_recovery() -> None:
    clock = ManualClock()
    breaker, seen = make(clock, half_open_probes=2)
    fail(breaker, 3)
    clock.advance(30)
    first = breaker.allow()
    assert first is not None
    assert first.success() is None  # one probe is not enough
    assert breaker.state == "half_open"
    assert breaker.snapshot()["probes_succeeded"] == 1
    second = breaker.allow()
    assert second is not None and breaker.allow() is None  # one success + one out = 2
    clock.advance(0.5)
    transition = second.success()
    assert transition is not None and (transition.source, transition.target) == (
        "half_open", "closed")
    assert breaker.state == "closed"
    assert breaker.consecutive_failures == 0
    assert breaker.recovered_count == 1 and breaker.recovery_s == [pytest.approx(30.5)]
    assert [t[1:3] for t in seen] == [("closed", "open"), ("open", "half_open"),
                                      ("half_open", "closed")]


def test_probes_decide_by_their_failure_rate_as_soon_as_the_rest_cannot_change_it() -> None:
    clock = ManualClock()
    breaker, seen = make(clock, half_open_probes=5)
    fail(breaker, 3)
    clock.advance(30)
    probes = [breaker.allow() for _ in range(5)]
    assert all(p is not None for p in probes) and breaker.allow() is None
    for probe, ok in zip(probes, (True, False, False, True), strict=False):
        assert probe is not None
        probe.success() if ok else probe.failure("malformed_output")
    assert breaker.state == "half_open"  # 2 of 4 failed: the last probe decides
    assert breaker.snapshot()["probes_failed"] == 2
    assert probes[4] is not None and probes[4].success() is not None
    assert breaker.state == "closed" and breaker.recovered_count == 1  # 2 of 5 failed: 40 %
    fail(breaker, 3)
    clock.advance(30)
    probes = [breaker.allow() for _ in range(5)]
    for probe in probes[:3]:
        assert probe is not None
        probe.failure("timeout")
    assert breaker.state == "open"  # 3 of 5 failed whatever the other two do
    assert breaker.retry_after() == pytest.approx(30.0)
    assert [t[2] for t in seen] == ["open", "half_open", "closed", "open", "half_open", "open"]


def test_two_probes_at_half_the_rate_need_both_to_succeed() -> None:
    clock = ManualClock()
    breaker, _ = make(clock, half_open_probes=2)
    fail(breaker, 3)
    clock.advance(30)
    first, second = breaker.allow(), breaker.allow()
    assert first is not None and second is not None
    first.success()
    second.failure("malformed_output")
    assert breaker.state == "open" and breaker.recovered_count == 0


def test_failed_trial_reopens_and_restarts_the_cool_down() -> None:
    clock = ManualClock()
    breaker, seen = make(clock)
    fail(breaker, 3)
    clock.advance(30)
    trial = breaker.allow()
    assert trial is not None
    trial.failure("load_failed")
    assert breaker.state == "open"
    assert seen[-1] == ("code", "half_open", "open", "load_failed")
    clock.advance(29)
    assert breaker.allow() is None
    clock.advance(1)
    assert breaker.allow() is not None


def test_released_trial_without_verdict_lets_the_next_request_try() -> None:
    clock = ManualClock()
    breaker, _ = make(clock)
    fail(breaker, 3)
    clock.advance(30)
    trial = breaker.allow()
    assert trial is not None
    trial.release()  # the caller cancelled: nothing was learnt about the model
    assert breaker.state == "half_open"
    assert breaker.allow() is not None


def test_lost_trial_permit_stops_blocking_after_trial_timeout() -> None:
    clock = ManualClock()
    breaker, _ = make(clock, trial_timeout_s=60, half_open_probes=1)
    fail(breaker, 3)
    clock.advance(30)
    assert breaker.allow() is not None  # never resolved
    clock.advance(59)
    assert breaker.allow() is None
    clock.advance(1)
    assert breaker.allow() is not None


def test_verdicts_of_permits_issued_before_the_breaker_opened_are_ignored() -> None:
    clock = ManualClock()
    breaker, _ = make(clock)
    late = breaker.allow()
    assert late is not None
    fail(breaker, 3)
    clock.advance(30)
    trial = breaker.allow()
    assert trial is not None
    assert late.success() is None  # a request from before: not the trial
    assert breaker.state == "half_open"
    trial.failure("timeout")
    assert breaker.state == "open"


def test_a_permit_gives_one_verdict_only() -> None:
    breaker, _ = make(ManualClock())
    permit = breaker.allow()
    assert permit is not None
    permit.failure("timeout")
    permit.failure("timeout")
    permit.success()
    assert permit.resolved
    assert breaker.consecutive_failures == 1


def test_reset_closes_an_open_breaker() -> None:
    breaker, seen = make(ManualClock())
    fail(breaker, 3)
    breaker.reset()
    assert breaker.state == "closed"
    assert seen[-1] == ("code", "open", "closed", "reset")
    assert breaker.allow() is not None


def test_window_and_cool_down_come_from_config() -> None:
    clock = ManualClock()
    breaker, _ = make(clock, window_size=1, minimum_calls=1, reset_after_s=5)
    fail(breaker, 1)
    assert breaker.state == "open"
    clock.advance(5)
    assert breaker.allow() is not None


@pytest.mark.parametrize("config", [{"failure_rate_threshold": 0},
                                    {"failure_rate_threshold": 1.5}, {"window_size": 2.5},
                                    {"minimum_calls": 0}, {"minimum_calls": 41},
                                    {"reset_after_s": -1}, {"trial_timeout_s": "soon"}])
def test_invalid_breaker_config_is_refused_naming_the_field(config: dict[str, Any]) -> None:
    with pytest.raises(ConfigurationError, match=next(iter(config))):
        BreakerConfig(**config)


def test_board_makes_one_breaker_per_agent_with_its_own_config() -> None:
    board = BreakerBoard(BreakerConfig(window_size=5, minimum_calls=5),
                         per_agent={"code": BreakerConfig(window_size=1, minimum_calls=1)},
                         agents=["conversation"], clock=ManualClock())
    assert [b.key for b in board] == ["conversation"]
    assert board.breaker("code") is board.breaker("code")
    assert board.breaker("code").config.minimum_calls == 1
    assert board.breaker("logic").config.minimum_calls == 5
    fail(board.breaker("code"), 1)
    assert board.breaker("code").state == "open"
    assert board.breaker("conversation").state == "closed"
    assert board.allow("code") is None


def test_board_reports_every_transition_to_each_subscriber() -> None:
    first: list[tuple[str, ...]] = []
    second: list[tuple[str, ...]] = []
    board = BreakerBoard(BreakerConfig(window_size=1, minimum_calls=1), clock=ManualClock(),
                         on_transition=lambda *t: first.append(t))
    board.subscribe(lambda *t: second.append(t))
    fail(board.breaker("code"), 1, "load_failed")
    assert first == second == [("code", "closed", "open", "load_failed")]


def test_board_snapshot_is_json_with_state_failures_and_retry_time() -> None:
    clock = ManualClock(start=100.0, unix_start=1_700_000_000.0)
    board = BreakerBoard(SMALL, clock=clock, agents=["conversation", "code"])
    fail(board.breaker("code"), 3, "timeout")
    clock.advance(10)
    snapshot = json.loads(json.dumps(board.snapshot()))
    assert snapshot["conversation"]["state"] == "closed"
    code = snapshot["code"]
    assert code["state"] == "open"
    assert code["consecutive_failures"] == 3
    assert (code["window_calls"], code["failure_rate"]) == (0, 0.0)  # restarts on opening
    assert code["opened_count"] == 1
    assert code["last_failure"] == "timeout"
    assert code["retry_at"] == pytest.approx(1_700_000_030.0)
    assert code["last_transition"]["target"] == "open"
    assert code["config"] == {"failure_rate_threshold": 0.5, "window_size": 3,
                              "minimum_calls": 3, "reset_after_s": 30.0,
                              "trial_timeout_s": 60.0, "half_open_probes": 5,
                              "timeout_blame_s": 0.25}
    assert code["agents"] == ["code"]  # no model assigned: the agent is its own key


def test_metrics_report_state_and_consecutive_failures_per_agent() -> None:
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    board = BreakerBoard(SMALL, clock=ManualClock(), agents=["conversation", "code"])
    register_breaker_metrics(provider.get_meter("test"), board)
    fail(board.breaker("code"), 3)
    fail(board.breaker("conversation"), 1)

    data = reader.get_metrics_data()
    assert data is not None
    points = {(m.name, dict(p.attributes or {})["orion.breaker.key"]): getattr(p, "value", None)
              for rm in data.resource_metrics for sm in rm.scope_metrics
              for m in sm.metrics for p in m.data.data_points}
    assert points[("orion.breaker.state", "code")] == 2
    assert points[("orion.breaker.state", "conversation")] == 0
    assert points[("orion.breaker.consecutive_failures", "code")] == 3
    assert points[("orion.breaker.consecutive_failures", "conversation")] == 1
    assert points[("orion.breaker.failure_rate", "conversation")] == 1.0
    assert points[("orion.breaker.opened", "code")] == 1
    provider.shutdown()


# --- orion-fsm breakers ---------------------------------------------------------------------


def run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--registry")
    sub = parser.add_subparsers(dest="command", required=True)
    _breakers.add_parser(sub)
    args = parser.parse_args(argv)
    code: int = args.handler(args)
    return code


@pytest.fixture
def registry_file(registry_doc: dict[str, Any], write_registry: Any) -> Path:
    path: Path = write_registry(registry_doc)
    return path


def test_cli_shows_configured_defaults_without_recorded_breakers(
        registry_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    trace = tmp_path / "trace.jsonl"
    trace.write_text(json.dumps({"format": "orion-fsm.trace", "request_id": "r1"}) + "\n")
    assert run_cli(["--registry", str(registry_file), "breakers", "--trace-file", str(trace),
                    "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["source"]["request_id"] is None
    assert set(shown["breakers"]) == {"conversation", "code", "broken", "short", "long"}
    assert {s["state"] for s in shown["breakers"].values()} == {"closed"}
    assert shown["breakers"]["code"]["config"]["failure_rate_threshold"] == 0.5
    assert shown["breakers"]["code"]["config"]["minimum_calls"] == 20


def test_cli_shows_the_latest_recorded_breaker_states(
        registry_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    clock = ManualClock()
    board = BreakerBoard(SMALL, clock=clock, agents=["conversation", "code"])
    older = board.snapshot()
    fail(board.breaker("code"), 3, "inference_failed")
    trace = tmp_path / "trace.jsonl"
    filler = "x" * 70_000  # records larger than one read block
    lines = [{"request_id": "old", "started_at": 1.0, "breakers": older, "pad": filler},
             {"request_id": "new", "started_at": 2.0, "breakers": board.snapshot(),
              "pad": filler},
             {"request_id": "unwired", "started_at": 3.0}]
    trace.write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"cut short')
    assert run_cli(["--registry", str(registry_file), "breakers", "--trace-file",
                    str(trace)]) == 0
    out = capsys.readouterr().out
    assert "request new" in out
    row = next(line for line in out.splitlines() if line.strip().startswith("code "))
    assert row.split()[:5] == ["code", "open", "0/0", "1", "0"]
    assert row.split()[-2:] == ["inference_failed", "code"]
    assert "conversation" in out and "long" in out


def test_cli_shows_which_agents_share_a_model_breaker(
        registry_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    board = BreakerBoard(clock=ManualClock(),
                         keys={"conversation": "tiny-small:default@256",
                               "short": "tiny-small:default@64", "code": "tiny-medium:default@256"})
    trace = tmp_path / "trace.jsonl"
    trace.write_text(json.dumps({"request_id": "r", "started_at": 1.0,
                                 "breakers": board.snapshot()}) + "\n")
    assert run_cli(["--registry", str(registry_file), "breakers", "--trace-file", str(trace),
                    "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)["breakers"]
    assert shown["tiny-small:default@256"]["agents"] == ["conversation"]
    assert shown["tiny-medium:default@256"]["agents"] == ["code"]
    # Agents the record does not name (its breakers were made before they were used).
    assert shown["long"]["agents"] == ["long"] and shown["long"]["state"] == "closed"


def test_cli_reports_no_trace_file_as_defaults(
        registry_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nothing.jsonl"
    assert run_cli(["--registry", str(registry_file), "breakers", "--trace-file",
                    str(missing)]) == 0
    assert ("configured defaults: open when 50% of the last 40 calls failed (at least 20 "
            "judged), 5 probe request(s) after 30 s") in capsys.readouterr().out


def test_an_attempt_left_without_a_verdict_counts_for_nothing() -> None:
    board = BreakerBoard(BreakerConfig(window_size=1, minimum_calls=1), clock=ManualClock())
    with board.attempt("code") as permit:
        assert permit is not None  # e.g. a prompt too long for the agent: no verdict
    assert board.breaker("code").state == "closed"
    assert board.breaker("code").consecutive_failures == 0


def test_an_attempt_maps_how_it_ended_to_a_verdict() -> None:
    import anyio

    from orion_fsm._exceptions import RequestTimeout

    clock = ManualClock()
    board = BreakerBoard(BreakerConfig(window_size=3, minimum_calls=3), clock=clock)
    with pytest.raises(RequestTimeout), board.attempt("code") as permit:
        assert permit is not None
        permit.engage()  # the model call was running
        raise RequestTimeout(1.0, "inferencing")
    with pytest.raises(RuntimeError), board.attempt("code") as permit:
        assert permit is not None
        permit.engage()
        raise RuntimeError("a bug in a phase")
    assert board.breaker("code").consecutive_failures == 2
    assert board.breaker("code").last_failure == "internal"
    # Out of time or crashed before the model ran (queued, loading): not the model's fault.
    with pytest.raises(RequestTimeout), board.attempt("code"):
        raise RequestTimeout(1.0, "loading_agent")
    # Reached the model with 10 ms left: the deadline was spent queueing.
    with pytest.raises(RequestTimeout), board.attempt("code") as permit:
        assert permit is not None
        permit.engage(0.01)
        raise RequestTimeout(1.0, "inferencing")
    with pytest.raises(RuntimeError), board.attempt("code"):
        raise RuntimeError("a bug before the model call")
    assert board.breaker("code").consecutive_failures == 2

    async def cancelled() -> None:
        with anyio.CancelScope() as scope, board.attempt("code"):
            scope.cancel()
            await anyio.sleep(1)

    anyio.run(cancelled)  # a caller who gave up says nothing about the agent
    assert board.breaker("code").consecutive_failures == 2


def test_an_attempt_on_an_open_breaker_gets_no_permit() -> None:
    board = BreakerBoard(BreakerConfig(window_size=1, minimum_calls=1), clock=ManualClock())
    with board.attempt("code") as permit:
        assert permit is not None
        change = permit.failure("inference_failed")
    assert change is not None and permit.transition == change
    with board.attempt("code") as refused:
        assert refused is None


def test_agents_assigned_one_model_share_its_breaker() -> None:
    board = BreakerBoard(BreakerConfig(window_size=2, minimum_calls=2), clock=ManualClock(),
                         agents=["conversation", "code", "logic"])
    board.assign({"conversation": "smol:q8@2048", "code": "smol:q8@2048",
                  "logic": "other:q4@2048"})
    assert board.breaker("conversation") is board.breaker("code")
    assert board.key_for("code") == "smol:q8@2048"
    assert sorted(board.snapshot()) == ["other:q4@2048", "smol:q8@2048"]
    assert board.snapshot()["smol:q8@2048"]["agents"] == ["conversation", "code"]
    fail(board.breaker("conversation"), 1)
    fail(board.breaker("code"), 1)  # two agents, one model: two failures of one thing
    assert board.allow("conversation") is None and board.allow("code") is None
    assert board.allow("logic") is not None
    assert board.retry_after(["conversation", "code"]) == pytest.approx(30.0)
    assert board.retry_after(["code", "logic"]) == 0.0


@pytest.mark.parametrize("config", [{"half_open_probes": 0}, {"half_open_probes": True}])
def test_half_open_probes_must_be_a_positive_integer(config: dict[str, Any]) -> None:
    with pytest.raises(ConfigurationError, match="half_open_probes"):
        BreakerConfig(**config)
