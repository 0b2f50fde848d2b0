"""Replay conformance: a mixed workload through one Engine on tiny models — success, L1 hit,
fallbacks after a load and an inference failure, an open breaker, bad input, exhausted agents,
a failure mid-stream, overloaded, a timeout in each phase that awaits, callers cancelling —
replays 100 % from its trace file; a changed threshold or statechart gives a readable
divergence.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest

from orion_fsm import BreakerConfig, Engine, Registry, RequestFailed, read_traces
from orion_fsm._resources import data_file
from orion_fsm.services.models._loader import ModelLease, ModelLoader, PreparedModel
from orion_fsm.services.models._registry import AgentSpec
from orion_fsm.services.resilience._admission import AdmissionController
from orion_fsm.services.routing._router import RoutingDecision, RuleRouter
from orion_fsm.testing import make_tiny_llama_gguf
from orion_fsm.testing.faults import faulty_loader
from orion_fsm.testing.replay import replay
from tests.conftest import agent

pytestmark = pytest.mark.anyio

# Long enough that a tiny model always answers within it on a busy machine; every timeout of
# the workload is provoked by something that waits until cancelled.
TIMEOUT_S = 2.0
STALL_ROUTER = "stall the router"
MAX_IN_FLIGHT = 6


class StallingRouter:
    """Rule routing, except that a text asking for it waits until cancelled."""

    def __init__(self, registry: Registry) -> None:
        self.rules = RuleRouter(registry)
        self.entered = anyio.Event()

    def warm_texts(self) -> Sequence[str]:
        return ()

    async def route(self, text: str, *, requested: str | None) -> RoutingDecision:
        if STALL_ROUTER in text:
            self.entered.set()
            await anyio.sleep_forever()
        return self.rules.decide(text, requested=requested)


class StallingLoader(ModelLoader):
    """The real loader, except that preparing `slowprep` and leasing `slowload` wait until
    cancelled (a stuck conversion, a load waiting for memory)."""

    async def prepare(self, agent: AgentSpec, *, variant: str | None = None) -> PreparedModel:
        if agent.id == "slowprep":
            await anyio.sleep_forever()
        return await super().prepare(agent, variant=variant)

    def lease(self, agent: AgentSpec, *, variant: str | None = None,
              prompt_ids: Sequence[int] = (), priority: int = 0,
              since: float | None = None) -> AbstractAsyncContextManager[ModelLease]:
        if agent.id == "slowload":
            return _stalled_lease()
        return super().lease(agent, variant=variant, prompt_ids=prompt_ids, priority=priority,
                             since=since)


@asynccontextmanager
async def _stalled_lease() -> AsyncIterator[ModelLease]:
    await anyio.sleep_forever()
    raise AssertionError("unreachable")
    yield


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("conformance-models")
    return {name: make_tiny_llama_gguf(root / name / f"tiny-{name}.gguf", n_layers=2,
                                       n_embd=32, seed=seed)
            for name, seed in (("plain", 1), ("failing", 2), ("stalling", 3), ("stalling2", 4),
                               ("midfail", 5))}


@pytest.fixture
def workload_doc(models: dict[str, Path], tmp_path: Path) -> dict[str, Any]:
    return {
        "version": 1, "default_agent": "conversation",
        "agents": [
            agent("conversation", models["plain"],
                  routing={"keywords": ["hello", "bonjour"], "patterns": [], "examples": []}),
            agent("code", models["failing"], fallback="conversation",
                  routing={"keywords": ["python"], "patterns": [], "examples": []}),
            agent("broken", tmp_path / "missing.gguf", fallback="conversation"),
            agent("lonely", tmp_path / "missing.gguf"),
            agent("short", models["plain"], context_length=64),
            agent("stall", models["stalling"]),
            agent("stall2", models["stalling2"]),
            agent("slowprep", models["plain"]),
            agent("slowload", models["plain"]),
            agent("midfail", models["midfail"], fallback="conversation"),
        ],
    }


@pytest.fixture
def workload_registry(workload_doc: dict[str, Any]) -> Registry:
    return Registry.from_dict(workload_doc)


class WatchedAdmission(AdmissionController):
    """The engine's admission, which says when every slot is taken."""

    def __init__(self) -> None:
        super().__init__(max_in_flight=MAX_IN_FLIGHT, max_queue=0)
        self.full = anyio.Event()

    async def acquire(self, priority: int = 0, *, request_id: str | None = None) -> None:
        await super().acquire(priority, request_id=request_id)
        if self.in_flight == self.max_in_flight:
            self.full.set()


async def run_workload(engine: Engine, router: StallingRouter,
                       admission: WatchedAdmission) -> Counter[str]:
    """Every kind of request once or more; returns how many ended in each reason."""
    ends: Counter[str] = Counter()

    async def ask(prompt: str, **options: Any) -> None:
        try:
            result = await engine.infer(prompt, **options)
            ends["L1" if result.cache else "fallback" if result.fallback else "success"] += 1
        except RequestFailed as exc:
            ends[exc.reason] += 1

    async def stream(prompt: str, *, chunks: int | None = None, **options: Any) -> None:
        try:
            async with engine.stream(prompt, **options) as texts:
                taken = 0
                async for _ in texts:
                    taken += 1
                    if taken == chunks:
                        ends["cancelled"] += 1  # the caller leaves mid-stream
                        return
            ends["success"] += 1
        except RequestFailed as exc:
            ends[exc.reason] += 1

    await ask("hello there", max_tokens=6)  # success, stored in L1
    await ask("hello there", max_tokens=6)  # L1 hit
    await ask("hi", agent="broken", max_tokens=4)  # load failure -> fallback
    for n in range(2):  # inference failures -> fallback; the second opens code's breaker
        await ask(f"a python function, take {n}", max_tokens=4)
    await ask("one more python function", max_tokens=4)  # open breaker -> fallback
    await ask("hi", temperature=9.0)  # invalid parameters
    await ask("", max_tokens=4)  # invalid prompt
    await ask("word " * 80, agent="short")  # invalid: longer than the agent's context
    await ask("hi", agent="lonely", max_tokens=4)  # exhausted: nobody else to ask
    await stream("bonjour", max_tokens=5, temperature=0.0, cache=False)  # a streamed success
    await stream("hello", agent="midfail", max_tokens=8)  # failed after streaming text
    await stream("hello", agent="conversation", max_tokens=40, cache=False,
                 chunks=3)  # the caller leaves after 3 chunks
    # The caller gives up while routing waits.
    async with anyio.create_task_group() as group:
        group.start_soon(ask, f"{STALL_ROUTER}, then give up")
        await router.entered.wait()
        group.cancel_scope.cancel()
    ends["cancelled"] += 1
    router.entered = anyio.Event()
    # A timeout in each phase that waits, at once; meanwhile one more request is refused.
    async with anyio.create_task_group() as group:
        group.start_soon(ask, f"{STALL_ROUTER} until the deadline")  # in routing
        group.start_soon(lambda: ask("hello", agent="slowprep", max_tokens=4))  # L1 lookup
        group.start_soon(lambda: ask("hello", agent="slowprep", max_tokens=4,
                                     cache=False))  # loading_agent, preparing
        group.start_soon(lambda: ask("hello", agent="slowload", max_tokens=4))  # ... leasing
        group.start_soon(lambda: ask("hello", agent="stall", max_tokens=8))  # inferencing
        group.start_soon(lambda: stream("hello", agent="stall2", max_tokens=8))  # mid-stream
        await admission.full.wait()
        await ask("hello, is there room?", max_tokens=4)  # overloaded
    return ends


@pytest.fixture
async def workload(workload_registry: Registry, tmp_path: Path) -> list[dict[str, Any]]:
    """The workload's trace records, and how each request ended."""
    # Generation on `failing` always raises, on `stalling*` hangs after 2 tokens, on
    # `midfail` raises after 2 tokens (text already streamed); loads of `slowload` are slow.
    load = faulty_loader(1.0, ("raise",), only=("failing",))
    load = faulty_loader(1.0, ("hang",), after_tokens=2, only=("stalling",), load=load)
    load = faulty_loader(1.0, ("raise",), after_tokens=2, only=("midfail",), load=load)
    router, admission = StallingRouter(workload_registry), WatchedAdmission()
    trace = tmp_path / "workload.jsonl"
    engine = Engine(
        workload_registry, router=router, trace_path=trace, cache_dir=tmp_path / "cache",
        embeddings=False, loader=StallingLoader(tmp_path / "cache", threads=1, load_model=load),
        breakers=BreakerConfig(window_size=2, minimum_calls=2), timeout_s=TIMEOUT_S,
        admission=admission, stream_interval_ms=0)  # a chunk per token: a caller leaves after 3
    async with engine:
        ends = await run_workload(engine, router, admission)
    assert ends == {"success": 2, "L1": 1, "fallback": 4, "invalid": 3, "exhausted": 1,
                    "inference_failed": 1, "cancelled": 2, "timeout": 6, "overloaded": 1}
    return list(read_traces(trace))


async def test_every_request_of_a_mixed_workload_replays(
    workload: list[dict[str, Any]], workload_registry: Registry, tmp_path: Path,
) -> None:
    reasons = Counter(str(r["result"]["error_reason"]) for r in workload)
    assert reasons == {"None": 7, "invalid": 3, "exhausted": 1, "inference_failed": 1,
                       "cancelled": 2, "timeout": 6, "overloaded": 1}
    timed_out = {r["abort"]["state"] for r in workload if r["result"]["error_reason"] == "timeout"}
    assert timed_out == {"routing", "loading_agent", "inferencing"}
    # Records written before `abort` existed (their abort is read from the last phase and the
    # error message) replay too: the trace of the issue, a timeout in inferencing, among them.
    older = [{**r, "abort": None} for r in workload if r["abort"] is not None]
    failed = []
    for record in [*workload, *older]:
        report = await replay(record, registry=workload_registry, cache_dir=tmp_path / "empty")
        if not report.ok or report.warnings:
            failed.append("\n".join([report.summary(), *report.warnings]))
    assert failed == [], "\n".join(failed)
    assert len(workload) == 21
    # Where each abort arrived: the state, the await in it, the tokens generated so far.
    aborts = {(a["reason"], a["state"], a["await"], a["tokens"])
              for r in workload if (a := r["abort"]) is not None}
    assert aborts == {
        ("overloaded", "idle", "admission", 0),
        ("cancelled", "routing", "route", 0),
        ("cancelled", "inferencing", "generate", 3),
        ("timeout", "routing", "route", 0),
        ("timeout", "routing", "l1_lookup", 0),
        ("timeout", "loading_agent", "prepare", 0),
        ("timeout", "loading_agent", "lease", 0),
        ("timeout", "inferencing", "generate", 2),
    }
    overloaded = next(r["abort"] for r in workload if r["abort"]
                      and r["abort"]["reason"] == "overloaded")
    assert overloaded["queue"] == {"queued": 0, "max_queue": 0}


async def test_a_changed_statechart_or_limit_diverges_where_it_changes_the_path_only(
    workload: list[dict[str, Any]], workload_doc: dict[str, Any],
    workload_registry: Registry, tmp_path: Path,
) -> None:
    # The regression: a failed inference no longer falls back, it ends the request.
    chart = tmp_path / "request.scxml"
    text = data_file("machines", "request.scxml").read_text(encoding="utf-8")
    chart.write_text(re.sub(r'(event="inference_failed[^"]*") target="fallback"',
                            r'\1 target="error"', text), encoding="utf-8")
    firsts = []
    for record in workload:
        report = await replay(record, registry=workload_registry, machine=chart,
                              cache_dir=tmp_path / "empty")
        firsts.append(None if report.first is None else str(report.first))
    failed_inference = ("at inferencing: transition 4: recorded inferencing "
                        "--inference_failed--> fallback, replayed inferencing "
                        "--inference_failed--> error")
    # Exactly the records whose first attempt failed in inferencing take the changed path.
    changed = sum(1 for r in workload if len(r["transitions"]) > 4 and (
        r["transitions"][4]["source"], r["transitions"][4]["event"],
        r["transitions"][4]["target"]) == ("inferencing", "inference_failed", "fallback"))
    assert changed >= 2  # the workload holds inference failures on more than one path
    assert Counter(firsts) == {None: len(workload) - changed, failed_inference: changed}
    # A changed limit: the prompt refused as too long for its agent's context now fits.
    too_long = next(r for r in workload if r["request"]["agent"] == "short")
    next(a for a in workload_doc["agents"] if a["id"] == "short")["context_length"] = 4096
    report = await replay(too_long, registry=Registry.from_dict(workload_doc),
                          cache_dir=tmp_path / "empty")
    assert str(report.first) == (
        "at loading_agent: error.type: recorded 'invalid', replayed None")


async def test_a_retried_agent_replays_every_attempt_from_the_record_alone(
    tmp_path: Path,
) -> None:
    # The served agent's first generation raises, its retry serves (seed 4: fault, then none);
    # its model's tokenizer.json is gone by replay time: only the record can give the ids.
    model = make_tiny_llama_gguf(tmp_path / "models" / "tiny-retried.gguf", n_layers=2,
                                 n_embd=32, seed=6)
    registry = Registry.from_dict({"version": 1, "default_agent": "conversation",
                                   "agents": [agent("conversation", model)]})
    trace = tmp_path / "retried.jsonl"
    async with Engine(registry, trace_path=trace, cache_dir=tmp_path / "cache", threads=1,
                      embeddings=False, caches=False,
                      load_model=faulty_loader(0.5, ("raise",), seed=4)) as engine:
        result = await engine.infer("hello there", max_tokens=6)
    assert result.state == "success" and not result.fallback
    (record,) = read_traces(trace)
    assert [t["event"] for t in record["transitions"]].count("retry_same") == 1
    (model.parent / "tokenizer.json").unlink()
    report = await replay(record, registry=registry, cache_dir=tmp_path / "empty")
    assert report.ok, report.summary()
    assert report.replayed is not None
    assert report.replayed["prompt_token_ids"] == record["prompt_token_ids"] != []
    assert report.replayed["result"]["token_ids"] == record["result"]["token_ids"]
