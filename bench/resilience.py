"""Resilience benchmarks: a load test through the Engine with injected faults (outcomes, latency,
leaks), circuit-breaker open/recover, fail-fast admission, and the cost of the guards.

Until the engine wires breakers, timeouts, admission and the loader's `load_model` seam, the
load test plays their part from the caller (see `_Wiring`); `wiring` in each report says which.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel

from bench._common import check, percentile

PRIMARY, BACKUP = "primary", "backup"
STALL_S = 0.25
SECONDARY = "secondary"  # shares the primary's model: one breaker guards both




def _registry(root: Path) -> Any:
    from orion_fsm import Registry
    from orion_fsm.testing import make_tiny_llama_gguf

    def spec(agent_id: str, model: Path, fallback: str | None) -> dict[str, Any]:
        return {"id": agent_id, "role": agent_id, "description": agent_id, "capabilities": [],
                "model": {"path": str(model)}, "format": "gguf", "model_type": "llama",
                "chat_template": "chatml", "system_prompt": "", "context_length": 256,
                "generation": {"max_tokens": 8, "temperature": 0, "top_k": 1, "seed": 7},
                "ram_estimate_mb": 1, "fallback": fallback,
                # A tiny model's token takes well under a millisecond: a hang is a stall
                # long before the request's 1 s deadline (the default floor is 5 s).
                "stall_s": STALL_S}

    primary = make_tiny_llama_gguf(root / "primary" / "tiny-primary.gguf", n_layers=2,
                                   n_embd=32, seed=11)
    backup = make_tiny_llama_gguf(root / "backup" / "tiny-backup.gguf", n_layers=1,
                                  n_embd=32, seed=12)
    return Registry.from_dict({"version": 1, "default_agent": PRIMARY, "agents": [
        spec(PRIMARY, primary, SECONDARY), spec(SECONDARY, primary, BACKUP),
        spec(BACKUP, backup, None)]})


@dataclass
class _Wiring:
    """What the Engine does itself and what this benchmark plays from the caller.

    INTEGRATOR: once `Engine` takes these, the caller-side parts switch off by themselves:
    `load_model=` (fault injection), `breakers=` (a BreakerBoard, exposed as
    `engine.breakers`), `timeout_s=`, `admission=` (an AdmissionController), and the
    malformed-output check in inferencing (a blocking Guardrails.check_output finding ->
    `inference_failed`).
    """

    engine_kwargs: dict[str, Any] = field(default_factory=dict)
    load_model_seam: bool = False
    breakers: bool = False
    timeout: bool = False
    admission: bool = False

    def as_dict(self) -> dict[str, str]:
        def who(wired: bool) -> str:
            return "engine" if wired else "caller"
        return {"load_model": who(self.load_model_seam), "breakers": who(self.breakers),
                "timeout": who(self.timeout), "admission": who(self.admission)}


def _wiring(load_model: Any, board: Any, timeout_s: float, admission: Any) -> _Wiring:
    from orion_fsm import Engine

    params = inspect.signature(Engine.__init__).parameters
    wiring = _Wiring()
    if "caches" in params:
        wiring.engine_kwargs["caches"] = False  # every request must reach a model
    for name, value, attr in (("load_model", load_model, "load_model_seam"),
                              ("breakers", board, "breakers"), ("timeout_s", timeout_s, "timeout"),
                              ("admission", admission, "admission")):
        if name in params:
            wiring.engine_kwargs[name] = value
            setattr(wiring, attr, True)
    return wiring


def _inject(engine: Any, wiring: _Wiring, load_model: Any) -> None:
    if not wiring.load_model_seam:
        # The loader's seam, set after construction until the Engine takes `load_model=`.
        if not hasattr(engine.loader, "_load_model"):
            raise RuntimeError("ModelLoader has no load_model seam: fault injection needs it")
        engine.loader._load_model = load_model


_FAULT_MIXES: dict[str, tuple[str, ...]] = {
    "mixed": ("raise", "hang", "malformed"),
    "mixed_no_hang": ("raise", "malformed"),  # what the stall watchdog (issue 11) leaves
    "hang": ("hang",), "raise": ("raise",), "malformed": ("malformed",),
}
_RATES = (0.0, 0.01, 0.10, 0.30)
_REPLAY_SAMPLE = 60  # trace lines replayed per run (all of them in the headline run)


def load_under_faults(quick: bool = False) -> dict[str, Any]:
    """Goodput under injected faults: 2,000 requests, 64 in flight, 1 s timeout, a chain
    primary -> secondary (same model) -> backup, at 0 / 1 / 10 / 30 % faulted model calls,
    each fault kind alone and mixed (with and without hangs).

    Goodput is served / total (success, or success after retry or fallback); p50/p99 are of
    served requests. Every request must end with a reason and its trace line; no task or
    thread may outlive the engine; trace lines replay (timeouts excepted: replay cannot
    provoke a deadline). Until the stall watchdog exists, a hang holds its model until the
    hung request's deadline: the `mixed_no_hang` rows show the rest of the policy alone.
    """
    n = 400 if quick else 2000
    runs: dict[str, dict[str, Any]] = {}
    for mix, kinds in _FAULT_MIXES.items():
        for rate in _RATES:
            if rate == 0.0 and mix != "mixed":
                continue  # no faults is the same run whatever the kinds
            name = f"{mix}@{rate:.0%}"
            print(f"[bench]   {name} ...", file=sys.stderr, flush=True)
            runs[name] = _goodput_run(n, rate, kinds, replay_all=(name == "mixed@10%"
                                                                  and not quick))
    table = [{"run": name, "served": r["served_ratio"], "timeouts": r["timeout_ratio"],
              "p50_ms": r["served_p50_ms"], "p99_ms": r["served_p99_ms"],
              "opened": r["breaker_opened"], "recovered": r["breaker_recovered"],
              "errors": r["error_reasons"], "requests_per_s": r["requests_per_s"],
              "load_avg_1m": r["load_avg_1m"]} for name, r in runs.items()]
    checks = []
    for name, r in runs.items():
        checks += [
            check(f"{name}: requests stuck, lost or without a reason",
                  r["stuck_requests"] + r["unexplained"], "== 0",
                  r["stuck_requests"] + r["unexplained"] == 0),
            check(f"{name}: trace lines", r["trace_lines"], f"== {n}", r["trace_lines"] == n),
            check(f"{name}: leaked tasks + threads", r["tasks_leaked"] + r["threads_leaked"],
                  "== 0", r["tasks_leaked"] + r["threads_leaked"] == 0),
            check(f"{name}: trace lines replayed that diverged", r["replay_divergences"],
                  "== 0", r["replay_divergences"] == 0),
        ]
    zero, ten, thirty = runs["mixed@0%"], runs["mixed@10%"], runs["mixed@30%"]
    checks += [
        check("0 % faults: served", zero["served_ratio"], "== 1", zero["served_ratio"] == 1),
        check("0 % faults: breakers opened", zero["breaker_opened"], "== 0",
              zero["breaker_opened"] == 0),
    ]
    for label, r in (("10 % mixed", ten), ("10 % mixed, no hangs", runs["mixed_no_hang@10%"])):
        checks += [
            check(f"{label}: served", r["served_ratio"], ">= 0.95", r["served_ratio"] >= 0.95),
            check(f"{label}: timeouts", r["timeout_ratio"], "<= 0.03",
                  r["timeout_ratio"] <= 0.03),
            check(f"{label}: p99 of served (ms)", r["served_p99_ms"], "<= 1500",
                  r["served_p99_ms"] <= 1500),
        ]
    for label, r in (("30 % mixed", thirty), ("30 % mixed, no hangs",
                                              runs["mixed_no_hang@30%"])):
        checks += [
            check(f"{label}: served", r["served_ratio"], ">= 0.80", r["served_ratio"] >= 0.80),
            check(f"{label}: breakers opened and recovered (min)",
                  min(r["breaker_opened"], r["breaker_recovered"]), ">= 1",
                  r["breaker_opened"] >= 1 and r["breaker_recovered"] >= 1),
        ]
    return {"requests": n, "concurrency": 64, "timeout_s": 1.0,
            "chain": [PRIMARY, SECONDARY, BACKUP], "goodput": table, "runs": runs,
            "checks": checks}


def _goodput_run(n: int, rate: float, kinds: tuple[str, ...], *,
                 replay_all: bool = False) -> dict[str, Any]:
    from orion_fsm import Engine, RequestFailed
    from orion_fsm.services.observability._tracefile import read_traces
    from orion_fsm.services.resilience._admission import AdmissionController
    from orion_fsm.services.resilience._breaker import BreakerBoard, BreakerConfig
    from orion_fsm.services.resilience._guardrails import Guardrails
    from orion_fsm.testing.faults import FaultKind, faulty_loader
    from orion_fsm.testing.replay import replay

    concurrency, timeout_s = 64, 1.0
    transitions: list[tuple[str, str, str, str]] = []
    # The default rule (50 % of the last 40 calls, at least 20; 5 probes); a short cool-down
    # so that a 1 s-deadline run sees breakers open and recover.
    board = BreakerBoard(BreakerConfig(reset_after_s=0.5, trial_timeout_s=timeout_s),
                         on_transition=lambda *t: transitions.append(t))
    admission = AdmissionController(max_in_flight=concurrency, max_queue=n)
    fault_kinds: tuple[FaultKind, ...] = tuple(k for k in ("raise", "hang", "malformed")
                                               if k in kinds)
    injector = faulty_loader(rate, fault_kinds, seed=2024, hang_s=30.0)
    guard = Guardrails()
    outcomes: Counter[str] = Counter()
    served_ms: list[float] = []
    unexplained: list[str] = []
    counts: dict[str, int] = {}
    retried = fast_exhausted = 0

    # A deadlocked run leaves a thread holding files in the directory: never fail on cleanup.
    with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as tmp:
        root = Path(tmp)
        registry = _registry(root)
        trace_path = root / "trace.jsonl"
        _warm_process(registry, root)
        threads_before = threading.active_count()
        progress: dict[str, float] = {"started": 0, "finished": 0, "last": time.monotonic()}

        async def request(i: int, engine: Any, vocab: int) -> None:
            async with admission.slot():
                progress["started"] += 1
                start = time.perf_counter()
                result: Any = None
                try:
                    result = await engine.infer(f"request {i}: say something", max_tokens=8)
                except RequestFailed as exc:
                    result = exc.result
                elapsed = (time.perf_counter() - start) * 1e3
            progress["finished"] += 1
            progress["last"] = time.monotonic()
            outcome = _classify(result, False, guard, vocab)
            outcomes[outcome] += 1
            if outcome in ("success", "fallback->success"):
                served_ms.append(elapsed)
            if outcome in ("no_result", "success(malformed_undetected)", "error:no reason"):
                unexplained.append(outcome)

        async def main() -> None:
            tasks_before = len(asyncio.all_tasks())
            engine = Engine(registry=registry, trace_path=trace_path, cache_dir=root / "cache",
                            threads=1, caches=False, load_model=injector, breakers=board,
                            timeout_s=timeout_s, max_in_flight=concurrency, max_queue=n,
                            embeddings=False)
            async with engine:
                for agent in (PRIMARY, BACKUP):  # both models loaded before the clock runs
                    lease = await engine.loader.acquire(registry.get(agent))
                    vocab = lease.model.tokenizer.vocab_size
                    lease.release()
                progress["last"] = time.monotonic()
                async with anyio.create_task_group() as tg:
                    for i in range(n):
                        tg.start_soon(request, i, engine, vocab)
                counts["slots_quarantined"] = engine.loader.stats.quarantined
                counts["quarantined_at_end"] = sum(m.quarantined for m in engine.stats().models)
            counts["tasks_leaked"] = len(asyncio.all_tasks()) - tasks_before

        start = time.perf_counter()
        load_before = os.getloadavg()[0]
        stalled = _run_watched(main, progress, stall_s=max(30.0, 10 * timeout_s))
        elapsed = time.perf_counter() - start
        # Other jobs share the cores: a 1 s deadline at 64 in flight needs ~64 requests/s.
        counts["load_avg_1m"] = round(max(load_before, os.getloadavg()[0]), 1)
        counts["stuck_requests"] = int(progress["started"] - progress["finished"]) \
            if stalled else 0
        if stalled:
            counts["tasks_leaked"] = -1
        counts["threads_leaked"] = _settled_thread_leak(threads_before)
        records = list(read_traces(trace_path))
        counts["trace_lines"] = len(records)
        reasons = Counter(r["result"]["error_reason"] for r in records
                          if r["result"]["state"] == "error")
        for r in records:
            events = [t["event"] for t in r["transitions"]]
            retried += "retry_same" in events
            fast_exhausted += r["result"].get("retry_after_s") is not None
        # Timeouts cannot be replayed (replay cannot provoke a deadline); of the rest, all in
        # the headline run, else the unusual paths first and a sample.
        replayable = [r for r in records if r["result"]["error_reason"] != "timeout"]
        unusual = [r for r in replayable if len(r["transitions"]) != 6]
        chosen = replayable if replay_all else (unusual + [
            r for r in replayable if len(r["transitions"]) == 6])[:_REPLAY_SAMPLE]

        async def replay_chosen() -> list[str]:
            failed = []
            for record in chosen:
                report = await replay(record, registry=registry, cache_dir=root / "cache")
                if not report.ok:
                    failed.append(report.summary())
            return failed

        divergent = anyio.run(replay_chosen)

    served = outcomes["success"] + outcomes["fallback->success"]
    timeouts = reasons.get("timeout", 0)
    opened = [t for t in transitions if t[2] == "open"]
    recovered = [t for t in transitions if t[1] == "half_open" and t[2] == "closed"]
    recovery_s = [s for b in board for s in b.recovery_s]
    return {
        "fault_rate": rate, "kinds": list(kinds), "requests": n,
        "elapsed_s": round(elapsed, 2), "requests_per_s": round(n / elapsed, 1),
        "faults_injected": dict(injector.plan.injected), "model_calls": injector.plan.calls,
        "served_ratio": round(served / n, 4), "timeout_ratio": round(timeouts / n, 4),
        "served_p50_ms": round(percentile(served_ms, 0.5), 1),
        "served_p99_ms": round(percentile(served_ms, 0.99), 1),
        "outcomes": dict(outcomes.most_common()), "error_reasons": dict(reasons),
        "retried_same_agent": retried, "exhausted_at_once_with_retry_after": fast_exhausted,
        "breaker_opened": len(opened), "breaker_recovered": len(recovered),
        "recovery_s_p50": round(statistics.median(recovery_s), 3) if recovery_s else None,
        "breakers": {b.key: {"agents": board.agents_of(b.key), "opened": b.opened_count,
                             "recovered": b.recovered_count} for b in board},
        "unexplained": len(unexplained), "replayed": len(chosen),
        "replay_divergences": len(divergent), "replay_first_divergences": divergent[:3],
        **counts,
    }


class _nothing:
    """`async with` that does nothing: the engine admits requests itself."""

    async def __aenter__(self) -> None:
        return None

    async def __aexit__(self, *exc: object) -> None:
        return None


def _tried(error: str) -> list[tuple[str, str]]:
    """(agent, why) pairs of an `exhausted` error: "no agent could serve ... (a: x; b: y)"."""
    inner = error.partition("(")[2].rpartition(")")[0]
    return [(a.strip(), w.strip()) for a, _, w in
            (part.partition(":") for part in inner.split("; "))]


def _classify(result: Any, timed_out: bool, guard: Any, vocab: int) -> str:
    if timed_out:
        return "error:timeout"
    if result is None:
        return "no_result"
    if result.state == "success":
        verdict = guard.check_output(result.token_ids, result.text, vocab_size=vocab)
        if verdict.blocked is not None:
            # Garbage served as an answer: the engine's output check is not wired yet.
            return "success(malformed_undetected)"
        if result.fallback:
            return "fallback->success"
        return "success"
    return f"error:{result.error_reason or 'no reason'}"


def _warm_process(registry: Any, root: Path) -> None:
    from orion_fsm import Engine

    async def session() -> None:
        async with Engine(registry=registry, trace_path=False, cache_dir=root / "cache",
                          threads=1, caches=False, embeddings=False) as engine:
            await engine.infer("warm up", agent=BACKUP, max_tokens=1)

    anyio.run(session)


def _run_watched(main: Callable[[], Any], progress: dict[str, float], *,
                 stall_s: float) -> bool:
    """Run `main` under asyncio in a thread; True if no request finished for `stall_s`."""
    failure: list[BaseException] = []

    def run() -> None:
        try:
            anyio.run(main, backend="asyncio")
        except BaseException as exc:  # re-raised in the caller's thread
            failure.append(exc)

    loop_thread = threading.Thread(target=run, name="bench-event-loop", daemon=True)
    loop_thread.start()
    while loop_thread.is_alive():
        loop_thread.join(1.0)
        if loop_thread.is_alive() and time.monotonic() - progress["last"] > stall_s:
            return True
    if failure:
        raise failure[0]
    return False


def _settled_thread_leak(before: int, wait_s: float = 5.0) -> int:
    """Threads still alive beyond `before`, after giving finished workers time to exit."""
    deadline = time.monotonic() + wait_s
    while threading.active_count() > before and time.monotonic() < deadline:
        time.sleep(0.05)
    return max(0, threading.active_count() - before)


def breaker_recovery(quick: bool = False) -> dict[str, Any]:
    """The primary agent's model fails every call: its breaker (a window of 3 calls, all
    judged; 2 probes) opens after 3 failures, the model is not called while open, the probes
    go through after reset_after_s, and the breaker closes once the model works again. Time
    from a ManualClock: no waiting."""
    from orion_fsm import Engine, ManualClock, RequestFailed
    from orion_fsm.services.resilience._breaker import BreakerBoard, BreakerConfig
    from orion_fsm.testing.faults import faulty_loader

    clock = ManualClock()
    transitions: list[tuple[str, str, str, str]] = []
    board = BreakerBoard(BreakerConfig(window_size=3, minimum_calls=3, half_open_probes=2),
                         agents=[PRIMARY, BACKUP], clock=clock,
                         on_transition=lambda *t: transitions.append(t))
    injector = faulty_loader(1.0, ("raise",), only=("tiny-primary",))
    timeline: list[dict[str, Any]] = []

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        registry = _registry(root)
        wiring = _wiring(injector, board, 60.0, None)

        async def call(engine: Any, label: str) -> None:
            calls = injector.plan.calls
            permit = board.allow(PRIMARY) if not wiring.breakers else None
            agent = PRIMARY if (wiring.breakers or permit is not None) else BACKUP
            try:
                result = await engine.infer(f"{label}: hello", agent=agent, max_tokens=4)
            except RequestFailed as exc:
                result = exc.result
            primary_failed = result.fallback or result.state != "success"
            if permit is not None:
                permit.failure("inference_failed") if primary_failed else permit.success()
            timeline.append({"step": label, "agent_asked": agent, "state": result.state,
                             "served_by": result.agent,
                             "primary_model_called": injector.plan.calls > calls,
                             "breaker": board.breaker(PRIMARY).state})

        async def main() -> None:
            engine = Engine(registry=registry, trace_path=False, cache_dir=root / "cache",
                            threads=1, clock=clock, **wiring.engine_kwargs)
            _inject(engine, wiring, injector)
            async with engine:
                for i in range(3):
                    await call(engine, f"failing {i + 1}")
                await call(engine, "while open")
                clock.advance(29)
                await call(engine, "open, 29 s later")
                injector.plan.rate = 0.0  # the model recovers
                clock.advance(1)
                await call(engine, "trial after 30 s")
                await call(engine, "closed again")

        anyio.run(main)

    by_step = {t["step"]: t for t in timeline}
    # Two probes after the cool-down: the trial and the next call close it together.
    expected = [("closed", "open"), ("open", "half_open"), ("half_open", "closed")]
    got = [t[1:3] for t in transitions]
    return {
        "wiring": wiring.as_dict(), "timeline": timeline,
        "transitions": [list(t) for t in transitions],
        "checks": [
            check("opens once 3 of its 3-call window failed", float(
                by_step["failing 3"]["breaker"] == "open"
                and by_step["failing 2"]["breaker"] == "closed"), "== 1",
                by_step["failing 3"]["breaker"] == "open"
                and by_step["failing 2"]["breaker"] == "closed"),
            check("open breaker: primary model untouched, served by fallback", float(
                not by_step["while open"]["primary_model_called"]
                and by_step["while open"]["state"] == "success"), "== 1",
                not by_step["while open"]["primary_model_called"]
                and by_step["while open"]["state"] == "success"),
            check("transitions closed->open->half_open->closed", float(got == expected),
                   "== 1", got == expected),
        ],
    }


def breaker_rule(quick: bool = False) -> dict[str, Any]:
    """The breaker rule alone, on the real CircuitBreaker with a ManualClock: a model whose
    calls fail independently at 0-100 %, called every 50 ms (40,000 calls; 8,000 quick),
    with the default config (50 % of the last 40 calls, at least 20; 30 s open; 5 probes).
    What share of calls it refuses, how often it opens and recovers: load-independent."""
    import random

    from orion_fsm import ManualClock
    from orion_fsm.services.resilience._breaker import CircuitBreaker

    calls = 8000 if quick else 40000
    rows = []
    for rate in (0.0, 0.01, 0.10, 0.20, 0.30, 0.50, 1.0):
        clock, rng = ManualClock(), random.Random(2024)
        breaker = CircuitBreaker("model", clock=clock)
        refused = 0
        for _ in range(calls):
            clock.advance(0.05)
            permit = breaker.allow()
            if permit is None:
                refused += 1
                continue
            permit.failure("inference_failed") if rng.random() < rate else permit.success()
        rows.append({"fault_rate": rate, "refused_share": round(refused / calls, 4),
                     "opened": breaker.opened_count, "recovered": breaker.recovered_count})
    by_rate = {r["fault_rate"]: r for r in rows}
    return {"calls": calls, "call_every_s": 0.05, "rows": rows, "checks": [
        check("0 / 10 / 20 % faults: breaker openings", by_rate[0.0]["opened"]
              + by_rate[0.10]["opened"] + by_rate[0.20]["opened"], "== 0",
              by_rate[0.0]["opened"] + by_rate[0.10]["opened"] + by_rate[0.20]["opened"] == 0),
        check("30 % faults: opened and recovered (min)",
              min(by_rate[0.30]["opened"], by_rate[0.30]["recovered"]), ">= 1",
              by_rate[0.30]["opened"] >= 1 and by_rate[0.30]["recovered"] >= 1),
        check("100 % faults: share of calls refused", by_rate[1.0]["refused_share"], ">= 0.95",
              by_rate[1.0]["refused_share"] >= 0.95),
    ]}


def fail_fast_admission(quick: bool = False) -> dict[str, Any]:
    """Past the queue limit a request fails at once with Overloaded: time to refuse, p99."""
    from orion_fsm._exceptions import Overloaded
    from orion_fsm.services.resilience._admission import AdmissionController

    rounds = 200 if quick else 2000
    refusals: list[float] = []

    async def main() -> None:
        admission = AdmissionController(max_in_flight=64, max_queue=1024)
        release = anyio.Event()

        async def hold() -> None:
            async with admission.slot():
                await release.wait()

        async with anyio.create_task_group() as tg:
            for _ in range(64 + 1024):
                tg.start_soon(hold)
            while admission.queued < 1024:
                await anyio.lowlevel.checkpoint()
            for _ in range(rounds):
                start = time.perf_counter()
                try:
                    await admission.acquire()
                except Overloaded:
                    refusals.append((time.perf_counter() - start) * 1e6)
            release.set()

    anyio.run(main)
    p99 = percentile(refusals, 0.99)
    return {"rounds": rounds, "refused": len(refusals),
            "refusal_p50_us": round(statistics.median(refusals), 2),
            "refusal_p99_us": round(p99, 2),
            "checks": [check("Overloaded raised at once (p99, µs)", p99, "<= 100",
                              len(refusals) == rounds and p99 <= 100)]}


def guard_costs(quick: bool = False) -> dict[str, Any]:
    """What the guards cost per request: sanitising a real trace record (writer thread),
    input guardrails on a 2 kB prompt, and the repetition detector per generated chunk."""
    from orion_fsm import Engine, Message
    from orion_fsm.services.observability._sanitize import sanitize
    from orion_fsm.services.observability._tracefile import read_traces
    from orion_fsm.services.resilience._guardrails import Guardrails, RepetitionGuard

    n = 500 if quick else 5000
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        registry = _registry(root)

        async def one() -> None:
            async with Engine(registry=registry, trace_path=root / "t.jsonl",
                              cache_dir=root / "cache", threads=1) as engine:
                await engine.infer("What is the capital of France? Mail bob@example.com.",
                                   max_tokens=16)

        anyio.run(one)
        (record,) = list(read_traces(root / "t.jsonl"))

    def per_call_us(fn: Callable[[], object], count: int) -> float:
        for _ in range(min(count, 200)):
            fn()
        best = float("inf")
        for _ in range(3):
            start = time.perf_counter()
            for _ in range(count):
                fn()
            best = min(best, (time.perf_counter() - start) / count * 1e6)
        return best

    import json

    sanitize_us = per_call_us(lambda: sanitize(record), n)
    dumps_us = per_call_us(lambda: json.dumps(record, ensure_ascii=False,
                                              separators=(",", ":")), n)
    guard = Guardrails()
    prompt = [Message("user", ("Summarise the following notes for the team meeting. " * 40)
                      [:2000])]
    input_us = per_call_us(lambda: guard.check_input(prompt, context_length=2048), n)
    words = [f"word{i} " for i in range(n)]

    def stream() -> None:
        rg = RepetitionGuard()
        for w in words:
            rg.feed(w)

    repetition_us = per_call_us(stream, 1) / len(words)
    return {"trace_record_bytes": len(json.dumps(record)),
            "sanitize_us_per_record": round(sanitize_us, 1),
            "json_dumps_us_per_record": round(dumps_us, 1),
            "check_input_us_per_2kB_prompt": round(input_us, 1),
            "repetition_guard_us_per_chunk": round(repetition_us, 2),
            "checks": [
                check("sanitize a typical trace record (µs)", sanitize_us, "<= 100",
                       sanitize_us <= 100),
                check("input guardrails, 2 kB prompt (µs)", input_us, "<= 200",
                       input_us <= 200),
                check("repetition guard per chunk (µs)", repetition_us, "<= 5",
                       repetition_us <= 5),
            ]}


BENCHMARKS: dict[str, Callable[..., dict[str, Any]]] = {
    "resilience_load_under_faults": load_under_faults,
    "resilience_breaker_recovery": breaker_recovery,
    "resilience_breaker_rule": breaker_rule,
    "resilience_fail_fast_admission": fail_fast_admission,
    "resilience_guard_costs": guard_costs,
}


if __name__ == "__main__":
    import json

    quick = "--quick" in sys.argv
    only = next((a for a in sys.argv[1:] if not a.startswith("--")), "")
    for name, fn in BENCHMARKS.items():
        if only in name:
            print(f"[bench] {name} ...", file=sys.stderr, flush=True)
            print(json.dumps({name: fn(quick=quick)}, indent=2))
