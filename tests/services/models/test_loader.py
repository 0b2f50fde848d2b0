"""The model loader: lazy shared loads, memory budget, LRU eviction, keep-alive, variants,
preloading, on tiny real models of different sizes."""

from __future__ import annotations

import gc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import psutil
import pytest

from orion_fsm import (
    ConfigurationError,
    Engine,
    InsufficientMemory,
    ManualClock,
    ModelLoadError,
    Registry,
)
from orion_fsm.backends import LoadedModel, SamplingParams, read_gguf_header
from orion_fsm.services.models._loader import (
    LoaderConfig,
    ModelLease,
    ModelLoader,
)
from orion_fsm.services.models._registry import AgentSpec
from orion_fsm.services.models._tiers import (
    GB,
    MB,
    TIERS,
    choose_variant,
    estimate_model_memory,
    tier_for,
)
from orion_fsm.testing import make_tiny_llama_gguf
from tests.conftest import agent

pytestmark = pytest.mark.anyio

SIZES = {"xs": (2, 32), "s": (2, 64), "m": (3, 96), "l": (4, 128)}  # name: (layers, n_embd)
CONTEXT = 128


@pytest.fixture(scope="session")
def sized_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sized-models")
    return {name: make_tiny_llama_gguf(root / name / f"tiny-{name}.gguf", n_layers=layers,
                                       n_embd=embd, seed=i)
            for i, (name, (layers, embd)) in enumerate(SIZES.items())}


def registry(models: dict[str, Path], **per_agent: dict[str, Any]) -> Registry:
    agents = [agent(name, path, context_length=CONTEXT, **per_agent.get(name, {}))
              for name, path in models.items()]
    return Registry.from_dict({"version": 1, "default_agent": agents[0]["id"],
                               "agents": agents})


def estimate(path: Path) -> int:
    return estimate_model_memory(path, CONTEXT, overhead_bytes=0).total_bytes


class CountingLoad:
    """The `load_model` seam: the real backend, counting calls per file."""

    def __init__(self, fail: bool = False) -> None:
        self.calls: list[str] = []
        self.fail = fail

    def __call__(self, model_path: Path, *args: Any, **kwargs: Any) -> LoadedModel:
        self.calls.append(model_path.stem)
        if self.fail:
            raise RuntimeError("injected runtime failure")
        return LoadedModel.load(model_path, *args, **kwargs)


MakeLoader = Callable[..., ModelLoader]


@pytest.fixture
def make_loader(tmp_path: Path) -> MakeLoader:
    def make(**config: Any) -> ModelLoader:
        clock = config.pop("clock", None) or ManualClock()
        load_model = config.pop("load_model", LoadedModel.load)
        progress = config.pop("progress", None)
        config.setdefault("overhead_mb", 0)
        config.setdefault("memory_budget_mb", 4096)
        config.setdefault("predictive_preload", False)
        return ModelLoader(tmp_path / "cache", threads=1, clock=clock, load_model=load_model,
                           progress=progress, config=LoaderConfig(**config))

    return make


async def eventually(condition: Callable[[], bool]) -> None:
    """Let background work run until `condition` holds; fail after about 5 s."""
    for _ in range(1000):
        if condition():
            return
        await anyio.sleep(0.005)
    raise AssertionError("the condition never held")


async def use(loader: ModelLoader, spec: AgentSpec, clock: ManualClock | None = None) -> None:
    """One short request: acquire, release, and let a second pass."""
    (await loader.acquire(spec)).release()
    if clock is not None:
        clock.advance(1)


# --- lazy, shared loading --------------------------------------------------------------------


async def test_first_acquire_loads_and_later_ones_find_it_resident(
    sized_models: dict[str, Path], make_loader: MakeLoader,
) -> None:
    stages: list[str] = []
    loader = make_loader(progress=lambda stage, done, total: stages.append(stage))
    spec = registry(sized_models).get("s")
    assert loader.loaded() == []  # nothing loads before it is needed
    first = await loader.acquire(spec)
    first.release()
    second = await loader.acquire(spec)
    assert first.model is second.model  # the slot it left is free again
    assert first.load_info.loaded_now and first.load_info.load_ms >= 0
    assert not second.load_info.loaded_now and second.load_info.load_ms == 0
    assert first.load_info.estimate_mb == pytest.approx(estimate(sized_models["s"]) / MB)
    assert "read" in stages  # the file read is reported for a progress bar
    attrs = first.load_info.span_attributes()
    assert attrs["orion.model.variant"] == "default" and attrs["orion.model.loaded_now"]
    second.release()
    await loader.aclose()


async def test_concurrent_acquires_of_one_model_share_one_load(
    sized_models: dict[str, Path], make_loader: MakeLoader,
) -> None:
    counting = CountingLoad()
    loader = make_loader(load_model=counting)
    spec = registry(sized_models).get("m")
    leases = []

    async def request() -> None:
        lease = await loader.acquire(spec)
        leases.append(lease)
        await anyio.sleep(0.01)
        lease.release()

    async with anyio.create_task_group() as tg:
        for _ in range(12):
            tg.start_soon(request)
    # One load of the model; slots beyond the first are instances added for the queue.
    assert loader.stats.loads == 1
    assert set(counting.calls) == {"tiny-m"}
    assert len(counting.calls) == 1 + loader.stats.slots_added <= leases[0].load_info.parallel
    assert len({id(lease.model) for lease in leases}) == len(counting.calls)
    assert all(lease.load_info.loaded_now for lease in leases)
    await loader.aclose()


async def test_a_runtime_failure_is_a_model_load_error_and_frees_its_reservation(
    sized_models: dict[str, Path], make_loader: MakeLoader,
) -> None:
    loader = make_loader(load_model=CountingLoad(fail=True))
    with pytest.raises(ModelLoadError, match="injected runtime failure"):
        await loader.acquire(registry(sized_models).get("s"))
    assert loader.used_bytes == 0 and loader.loaded() == []


# --- budget and LRU --------------------------------------------------------------------------


async def test_the_least_recently_used_idle_model_makes_room_for_a_new_one(
    sized_models: dict[str, Path], make_loader: MakeLoader,
) -> None:
    clock = ManualClock()
    loader = make_loader(max_loaded_models=2, clock=clock)
    reg = registry(sized_models)
    await use(loader, reg.get("xs"), clock)
    await use(loader, reg.get("s"), clock)
    await use(loader, reg.get("xs"), clock)  # xs is now more recent than s
    lease = await loader.acquire(reg.get("m"))
    assert lease.load_info.unloaded == ("tiny-s:default@128",)
    assert {k.source.stem for k in loader.loaded()} == {"tiny-xs", "tiny-m"}
    lease.release()
    await loader.aclose()


async def test_the_memory_budget_unloads_models_until_the_new_one_fits(
    sized_models: dict[str, Path], make_loader: MakeLoader,
) -> None:
    clock = ManualClock()
    # Room for l and m together, not for l, m and s.
    budget = (estimate(sized_models["l"]) + estimate(sized_models["m"])) / MB
    loader = make_loader(memory_budget_mb=budget, clock=clock)
    reg = registry(sized_models)
    for name in ("xs", "s", "m", "l", "xs", "m", "l", "s"):
        await use(loader, reg.get(name), clock)
        assert loader.used_bytes <= loader.budget_bytes
        assert f"tiny-{name}" in {k.source.stem for k in loader.loaded()}
    assert loader.stats.evictions > 0
    await loader.aclose()


async def test_a_model_in_use_is_never_unloaded(
    sized_models: dict[str, Path], make_loader: MakeLoader,
) -> None:
    loader = make_loader(max_loaded_models=1, keep_alive_s=0, room_wait_s=0)
    reg = registry(sized_models)
    held = await loader.acquire(reg.get("s"))
    with pytest.raises(InsufficientMemory, match="in use by requests"):
        await loader.acquire(reg.get("xs"))
    assert await loader.sweep() == [] and await loader.unload_idle() == []
    prompt = held.prepared.tokenizer.encode("hello")
    outcome = held.model.generate(prompt, SamplingParams(max_tokens=2, temperature=0),
                                  on_event=lambda e: None, should_stop=lambda: False)
    assert outcome.token_ids  # the held model still works
    held.release()
    await loader.acquire(reg.get("xs"))  # once released, it can make room
    assert [k.source.stem for k in loader.loaded()] == ["tiny-xs"]
    await loader.aclose()


async def test_a_load_waits_for_requests_to_release_the_models_in_its_way(
    sized_models: dict[str, Path], make_loader: MakeLoader,
) -> None:
    loader = make_loader(max_loaded_models=1, room_wait_s=10)
    reg = registry(sized_models)
    held = await loader.acquire(reg.get("s"))
    waiting: list[ModelLease] = []

    async def request() -> None:
        waiting.append(await loader.acquire(reg.get("xs")))

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(request)
            await eventually(lambda: loader.stats.room_waits > 0)
            assert [k.source.stem for k in loader.loaded()] == ["tiny-s"] and not waiting
            held.release()
    (lease,) = waiting
    assert lease.load_info.unloaded == ("tiny-s:default@128",)
    lease.release()
    await loader.aclose()


async def test_a_request_cancelled_while_waiting_for_room_leaves_nothing_behind(
    sized_models: dict[str, Path], make_loader: MakeLoader,
) -> None:
    loader = make_loader(max_loaded_models=1, room_wait_s=10)
    reg = registry(sized_models)
    held = await loader.acquire(reg.get("s"))
    with anyio.move_on_after(0.05) as scope:
        await loader.acquire(reg.get("xs"))
    assert scope.cancelled_caught
    assert loader.used_bytes == held.prepared.estimate.total_bytes
    held.release()
    (await loader.acquire(reg.get("xs"))).release()
    assert [k.source.stem for k in loader.loaded()] == ["tiny-xs"]
    await loader.aclose()


async def test_a_load_still_blocked_after_its_wait_is_refused(
    sized_models: dict[str, Path], make_loader: MakeLoader,
) -> None:
    loader = make_loader(max_loaded_models=1, room_wait_s=0.02)
    reg = registry(sized_models)
    held = await loader.acquire(reg.get("s"))
    with pytest.raises(InsufficientMemory, match=r"waited 0\.02 s"):
        await loader.acquire(reg.get("xs"))
    held.release()
    await loader.aclose()


async def test_a_model_bigger_than_the_budget_is_refused_without_loading(
    sized_models: dict[str, Path], make_loader: MakeLoader,
) -> None:
    counting = CountingLoad()
    loader = make_loader(memory_budget_mb=estimate(sized_models["m"]) / MB, load_model=counting)
    with pytest.raises(InsufficientMemory, match="budget") as caught:
        await loader.acquire(registry(sized_models).get("l"))
    assert counting.calls == [] and loader.stats.refusals == 1
    assert caught.value.needed_bytes > caught.value.budget_bytes
    assert isinstance(caught.value, ModelLoadError)  # so the machine falls back


async def test_a_model_that_cannot_fit_falls_back_to_a_smaller_agent(
    sized_models: dict[str, Path], tmp_path: Path,
) -> None:
    reg = registry(sized_models, l={"fallback": "s"})
    engine = Engine(registry=reg, cache_dir=tmp_path / "cache", threads=1, trace_path=False,
                    embeddings=False)
    engine.loader = ModelLoader(tmp_path / "cache", threads=1, config=LoaderConfig(
        memory_budget_mb=estimate(sized_models["m"]) / MB, overhead_mb=0))
    async with engine:
        result = await engine.infer("hello", agent="l", max_tokens=3)
    assert result.state == "success"
    assert result.fallback and result.agent == "s" and result.agents_tried == ("l", "s")


async def test_unloading_gives_the_models_memory_back(
    tmp_path: Path, make_loader: MakeLoader,
) -> None:
    path = make_tiny_llama_gguf(tmp_path / "rss" / "tiny-rss.gguf", n_layers=4, n_embd=256)
    loader = make_loader()
    spec = registry({"rss": path}).get("rss")
    (await loader.acquire(spec)).release()  # the runtime's one-time setup, out of the way
    await loader.unload_idle()
    gc.collect()
    process = psutil.Process()
    before = process.memory_info().rss
    (await loader.acquire(spec)).release()
    loaded = process.memory_info().rss
    assert await loader.unload_idle() == ["tiny-rss:default@128"]
    after = process.memory_info().rss
    size = read_gguf_header(path).data_end
    assert loaded - before >= 0.8 * size
    assert loaded - after >= 0.9 * (loaded - before)


# --- keep-alive ------------------------------------------------------------------------------


async def test_an_idle_model_is_unloaded_after_its_keep_alive(
    sized_models: dict[str, Path], make_loader: MakeLoader,
) -> None:
    clock = ManualClock()
    loader = make_loader(keep_alive_s=60, clock=clock)
    reg = registry(sized_models, m={"keep_alive_s": 5})
    await use(loader, reg.get("s"))
    await use(loader, reg.get("m"))
    clock.advance(5)
    assert await loader.sweep() == ["tiny-m:default@128"]  # its registry keep-alive wins
    clock.advance(54)
    assert await loader.sweep() == []
    clock.advance(1)
    assert await loader.sweep() == ["tiny-s:default@128"]
    assert loader.loaded() == [] and loader.stats.idle_unloads == 2


async def test_idle_time_starts_when_the_last_request_releases_the_model(
    sized_models: dict[str, Path], make_loader: MakeLoader,
) -> None:
    clock = ManualClock()
    loader = make_loader(keep_alive_s=10, clock=clock)
    lease = await loader.acquire(registry(sized_models).get("s"))
    clock.advance(100)  # a long generation
    assert await loader.sweep() == []
    lease.release()
    clock.advance(9)
    assert await loader.sweep() == []
    clock.advance(1)
    assert len(await loader.sweep()) == 1


async def test_keep_alive_zero_unloads_after_each_request_from_the_background_task(
    sized_models: dict[str, Path], make_loader: MakeLoader,
) -> None:
    loader = make_loader(keep_alive_s=0, sweep_interval_s=60)
    spec = registry(sized_models).get("s")
    async with anyio.create_task_group() as tg:
        await tg.start(loader.run)
        lease = await loader.acquire(spec)
        assert loader.loaded()
        lease.release()
        await eventually(lambda: not loader.loaded())
        loader.stop()
    assert loader.stats.idle_unloads == 1


# --- quantization variants -------------------------------------------------------------------


@pytest.fixture
def variant_registry(sized_models: dict[str, Path]) -> Registry:
    variants = [{"name": name, "bits": bits, "source": {"path": str(sized_models[size])}}
                for name, bits, size in (("q4_0", 4, "s"), ("q8_0", 8, "m"), ("f16", 16, "l"))]
    return Registry.from_dict({"version": 1, "default_agent": "v", "agents": [
        agent("v", sized_models["l"], context_length=CONTEXT, quantization=variants)]})


@pytest.mark.parametrize(("ram_gb", "variant", "max_models"),
                         [(2, "q4_0", 1), (4, "q4_0", 1), (6, "q8_0", 2), (12, "f16", 3),
                          (24, "f16", 4), (64, "f16", 5)])
async def test_the_ram_tier_picks_the_quantization_variant_and_model_count(
    variant_registry: Registry, make_loader: MakeLoader, ram_gb: int, variant: str,
    max_models: int,
) -> None:
    tier = tier_for(ram_gb * GB)
    loader = make_loader(tier=tier)
    assert loader.max_loaded_models == max_models
    lease = await loader.acquire(variant_registry.get("v"))
    assert lease.load_info.variant == variant == lease.prepared.key.variant
    assert lease.prepared.key.source == choose_variant(variant_registry.get("v"),
                                                       tier.quantization).source.locate()
    lease.release()
    await loader.aclose()


async def test_a_variant_can_be_forced_per_call_and_by_configuration(
    variant_registry: Registry, make_loader: MakeLoader,
) -> None:
    spec = variant_registry.get("v")
    loader = make_loader(tier=TIERS[-1], quantization="q4")
    configured = await loader.acquire(spec)
    forced = await loader.acquire(spec, variant="q8_0")
    assert configured.load_info.variant == "q4_0" and forced.load_info.variant == "q8_0"
    assert configured.model is not forced.model  # the key includes the variant
    assert {k.variant for k in loader.loaded()} == {"q4_0", "q8_0"}
    with pytest.raises(ModelLoadError, match=r"no quantization variant 'q3_k'.*q4_0, q8_0, f16"):
        await loader.acquire(spec, variant="q3_k")
    configured.release()
    forced.release()
    await loader.aclose()


@pytest.mark.parametrize(("option", "value"), [
    ("memory_budget_mb", 0), ("budget_fraction", 1.5), ("max_loaded_models", 0),
    ("keep_alive_s", -1), ("room_wait_s", -0.5), ("sweep_interval_s", 0),
])
def test_nonsense_configuration_is_refused_with_the_option_named(option: str,
                                                                 value: float) -> None:
    with pytest.raises(ConfigurationError, match=option):
        LoaderConfig(**{option: value})


def test_an_agent_without_variants_runs_its_model_file(sized_models: dict[str, Path]) -> None:
    spec = registry(sized_models).get("s")
    for preference in ("q4", "q8", "f16"):
        choice = choose_variant(spec, preference)
        assert choice.name == "default" and choice.source == spec.model


def test_the_estimate_counts_weights_and_a_full_kv_cache(sized_models: dict[str, Path]) -> None:
    layers, embd = SIZES["m"]
    est = estimate_model_memory(sized_models["m"], 512, overhead_bytes=7)
    assert est.weights_bytes == read_gguf_header(sized_models["m"]).data_end
    assert est.kv_cache_bytes == 2 * layers * 512 * embd * 4
    assert est.total_bytes == est.weights_bytes + est.kv_cache_bytes + 7


# --- preloading ------------------------------------------------------------------------------


async def test_a_preload_hint_loads_the_model_before_it_is_asked_for(
    sized_models: dict[str, Path], make_loader: MakeLoader,
) -> None:
    counting = CountingLoad()
    loader = make_loader(load_model=counting)
    spec = registry(sized_models).get("m")
    async with anyio.create_task_group() as tg:
        await tg.start(loader.run)
        assert loader.preload(spec)
        await eventually(lambda: bool(loader.loaded()))
        lease = await loader.acquire(spec)
        loader.stop()
    assert counting.calls == ["tiny-m"]
    assert lease.load_info.preloaded and not lease.load_info.loaded_now
    assert loader.stats.preloads == loader.stats.preload_hits == 1
    lease.release()
    await loader.aclose()


async def test_the_usual_next_model_is_preloaded_from_recent_usage(
    sized_models: dict[str, Path], make_loader: MakeLoader,
) -> None:
    clock = ManualClock()
    loader = make_loader(max_loaded_models=2, predictive_preload=True, clock=clock)
    reg = registry(sized_models)
    async with anyio.create_task_group() as tg:
        await tg.start(loader.run)
        for _ in range(3):  # xs is always followed by s, then m
            for name in ("xs", "s", "m"):
                await use(loader, reg.get(name), clock)
        lease = await loader.acquire(reg.get("xs"))  # s is not loaded, but comes next
        await eventually(lambda: "tiny-s" in {k.source.stem for k in loader.loaded()})
        lease.release()
        clock.advance(1)
        following = await loader.acquire(reg.get("s"))
        loader.stop()
    assert following.load_info.preloaded and not following.load_info.loaded_now
    following.release()
    await loader.aclose()


async def test_stop_ends_the_background_task_and_drops_later_hints(
    sized_models: dict[str, Path], make_loader: MakeLoader,
) -> None:
    loader = make_loader()
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            await tg.start(loader.run)
            loader.stop()
    assert not loader.preload(registry(sized_models).get("s"))
