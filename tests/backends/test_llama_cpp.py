"""LlamaRuntime: sequences of one context decoded in shared batches (continuous batching),
sequences joining and leaving, per-sequence sampling and cancellation, prefix copies, cores.

The behaviour every runtime shares is tested on both in test_ctransformers.py.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from orion_fsm._exceptions import ModelLoadError
from orion_fsm.backends import (
    GenerationEvent,
    GenerationOutcome,
    LlamaSequence,
    LlamaStream,
    SamplingParams,
    ensure_converted,
    llama_cpp_available,
)
from orion_fsm.testing import make_tiny_llama_gguf

pytestmark = pytest.mark.skipif(not llama_cpp_available(),
                                reason="the llama-cpp extra is not installed")

PROMPTS = (
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>user\nName a colour.<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>user\nTell me a story about the sea.<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
)
GREEDY = SamplingParams(temperature=0, max_tokens=24)


class HeldGate:
    """A CoreGate that holds the first decode step until `go` is set, so that sequences
    submitted meanwhile are known to join the next step; it records each step's share."""

    def __init__(self) -> None:
        self.go = threading.Event()
        self.entered = threading.Event()
        self.shares: list[int] = []

    def acquire(self, share: int = 1) -> int:
        self.shares.append(share)
        self.entered.set()
        assert self.go.wait(10)
        return 1

    def release(self, granted: int) -> None:
        pass


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("tiny-llama")
    source = make_tiny_llama_gguf(root / "tiny.gguf", seed=7, llama_cpp_layout=True,
                                  tied_embeddings=False)
    return source, ensure_converted(source, root / "cache").tokenizer_path


@pytest.fixture
def slots(tiny_files: tuple[Path, Path]) -> Iterator[list[LlamaSequence]]:
    """Four sequences of one context."""
    first = LlamaSequence.load(*tiny_files, context_length=256, sequences=4, threads=1)
    rest = [first.runtime.open_sequence() for _ in range(3)]
    yield [first, *rest]
    for s in [first, *rest]:
        s.close()


def solo(tiny_files: tuple[Path, Path], prompt: str, params: SamplingParams) -> GenerationOutcome:
    """The generation alone on a fresh runtime: what it gives without batching."""
    with LlamaSequence.load(*tiny_files, context_length=256, threads=1) as model:
        return model.generate(model.tokenizer.encode(prompt), params,
                              on_event=lambda e: None, should_stop=lambda: False)


def drain(stream: LlamaStream) -> tuple[GenerationOutcome, list[GenerationEvent]]:
    events = []
    while (event := stream.next_event()) is not None:
        events.append(event)
    return stream.outcome, events


def test_concurrent_sequences_share_decode_steps_and_match_solo_runs(
    slots: list[LlamaSequence], tiny_files: tuple[Path, Path],
) -> None:
    runtime = slots[0].runtime
    gate = HeldGate()
    streams = [s.open_stream(s.tokenizer.encode(p), GREEDY, cores=gate)
               for s, p in zip(slots, PROMPTS, strict=True)]
    results: dict[int, tuple[GenerationOutcome, list[GenerationEvent]]] = {}
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, drain(streams[i])))
               for i in range(4)]
    threads[0].start()
    assert gate.entered.wait(10)  # the first step is under way, held: the others queue
    for t in threads[1:]:
        t.start()
    while len(runtime._incoming) < 3:
        threading.Event().wait(0.005)
    gate.go.set()
    for t in threads:
        t.join(30)
    assert runtime.batched_steps > 0
    assert max(gate.shares) == 4  # one step decoded for the four sequences, with their cores
    for i, prompt in enumerate(PROMPTS):
        outcome, events = results[i]
        assert outcome.finish_reason == "length"
        assert "".join(e.text for e in events) == outcome.text
        assert outcome.token_ids == solo(tiny_files, prompt, GREEDY).token_ids


def test_sequences_join_and_leave_at_any_step(
    slots: list[LlamaSequence], tiny_files: tuple[Path, Path],
) -> None:
    short = SamplingParams(temperature=0, max_tokens=3)
    long = SamplingParams(temperature=0, max_tokens=40)
    a = slots[0].open_stream(slots[0].tokenizer.encode(PROMPTS[0]), long)
    assert a.next_event() is not None  # a is generating
    b = slots[1].open_stream(slots[1].tokenizer.encode(PROMPTS[1]), short)
    b_outcome, _ = drain(b)  # b joined a running batch and left it early
    c = slots[2].open_stream(slots[2].tokenizer.encode(PROMPTS[2]), short)
    c_outcome, _ = drain(c)  # c joined after b had left
    a_outcome, _ = drain(a)
    assert (len(b_outcome.token_ids), len(c_outcome.token_ids)) == (3, 3)
    assert a_outcome.token_ids == solo(tiny_files, PROMPTS[0], long).token_ids
    assert b_outcome.token_ids == solo(tiny_files, PROMPTS[1], short).token_ids
    assert c_outcome.token_ids == solo(tiny_files, PROMPTS[2], short).token_ids


def test_cancelling_one_sequence_leaves_the_others_running(slots: list[LlamaSequence]) -> None:
    long = SamplingParams(temperature=0, max_tokens=60)
    stop_b = threading.Event()
    streams = [s.open_stream(s.tokenizer.encode(p), long,
                             should_stop=stop_b.is_set if i == 1 else None)
               for i, (s, p) in enumerate(zip(slots[:3], PROMPTS, strict=False))]
    for stream in streams:
        assert stream.next_event() is not None
    stop_b.set()  # b's caller gives up: b ends at the next step
    streams[2].close()  # c's stream is closed by its caller
    outcomes = [drain(s)[0] for s in streams]
    assert outcomes[0].finish_reason == "length"
    assert len(outcomes[0].token_ids) == 60
    assert outcomes[1].finish_reason == "cancelled"
    assert outcomes[2].finish_reason == "cancelled"
    assert not any(s.generating for s in slots)
    # The cancelled sequences are free again.
    again = slots[1].generate(slots[1].tokenizer.encode(PROMPTS[1]), GREEDY,
                              on_event=lambda e: None, should_stop=lambda: False)
    assert again.finish_reason == "length"


def test_a_caller_that_fell_behind_takes_the_queued_tokens_as_one_event(
    slots: list[LlamaSequence],
) -> None:
    sequence = slots[0]
    stream = sequence.open_stream(sequence.tokenizer.encode(PROMPTS[0]),
                                  SamplingParams(temperature=0, max_tokens=60, scores=True))
    first = stream.next_event()
    while sequence.generating:  # the loop runs to the end while nobody reads
        time.sleep(0.01)
    rest = list(iter(stream.next_event, None))
    outcome = stream.outcome
    assert first is not None and len(rest) == 1  # one hop for all that was queued
    assert outcome.finish_reason == "length"
    assert first.token_ids + rest[0].token_ids == outcome.token_ids
    assert first.text + rest[0].text == outcome.text
    assert len(rest[0].logprobs) == len(rest[0].entropies) == len(rest[0].token_ids)


def test_each_sequence_samples_with_its_own_parameters(
    slots: list[LlamaSequence], tiny_files: tuple[Path, Path],
) -> None:
    seeded = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, max_tokens=24, seed=99)
    stopped = SamplingParams(temperature=0, max_tokens=24,
                             stop=(solo(tiny_files, PROMPTS[1], GREEDY).text[4:6],))
    gate = HeldGate()
    plans = [(seeded, PROMPTS[0]), (GREEDY, PROMPTS[0]), (stopped, PROMPTS[1])]
    streams = [s.open_stream(s.tokenizer.encode(p), params, cores=gate)
               for s, (params, p) in zip(slots, plans, strict=False)]
    results: list[GenerationOutcome | None] = [None] * 3
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, drain(streams[i])[0]))
               for i in range(3)]
    threads[0].start()
    assert gate.entered.wait(10)
    for t in threads[1:]:
        t.start()
    gate.go.set()
    for t in threads:
        t.join(30)
    for (params, prompt), outcome in zip(plans, results, strict=True):
        assert outcome == solo(tiny_files, prompt, params)
    assert results[2] is not None and results[2].finish_reason == "stop"


def test_a_prompt_prefix_is_copied_from_the_sequence_that_holds_it(
    slots: list[LlamaSequence],
) -> None:
    first, second = slots[0], slots[1]
    encode = first.tokenizer.encode
    system = "<|im_start|>system\nYou are a careful assistant who answers in short sentences." \
             "<|im_end|>\n"
    a, b = encode(system + PROMPTS[0]), encode(system + PROMPTS[1])
    first.generate(a, GREEDY, on_event=lambda e: None, should_stop=lambda: False)
    outcome = second.generate(b, GREEDY, on_event=lambda e: None, should_stop=lambda: False)
    shared = next(i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y)
    assert shared >= 16
    assert outcome.prefilled == len(b) - shared  # the system prompt was not evaluated again
    assert second.cached_ids[:shared] == tuple(b[:shared])


def test_the_runtime_is_freed_with_its_last_sequence(tiny_files: tuple[Path, Path]) -> None:
    first = LlamaSequence.load(*tiny_files, context_length=128, sequences=2, threads=1)
    runtime = first.runtime
    second = runtime.open_sequence()
    with pytest.raises(ModelLoadError, match="taken"):
        runtime.open_sequence()
    first.close()
    assert not runtime.closed
    second.close()
    assert runtime.closed
    assert not runtime._thread.is_alive()
    with pytest.raises(ModelLoadError, match="closed"):
        runtime.open_sequence()


def test_sequences_given_back_while_the_decode_thread_is_stuck_free_the_runtime_when_it_returns(
    tiny_files: tuple[Path, Path],
) -> None:
    first = LlamaSequence.load(*tiny_files, context_length=128, sequences=2, threads=1)
    runtime = first.runtime
    second = runtime.open_sequence()
    stuck = HeldGate()  # the decode step does not come back until `go`
    streams = [s.open_stream(s.tokenizer.encode(p), GREEDY, cores=stuck)
               for s, p in zip((first, second), PROMPTS, strict=False)]
    waiting = [threading.Thread(target=drain, args=(s,)) for s in streams]
    for thread in waiting:
        thread.start()
    assert stuck.entered.wait(10)
    first.abandon()  # the stall watchdog gave up on both: nothing waits for the thread
    second.abandon()
    assert first.generating and second.generating
    assert not runtime.closed and runtime._thread.is_alive()
    with pytest.raises(ModelLoadError, match="closed"):
        runtime.open_sequence()
    stuck.go.set()  # the runtime call returns: the thread ends both jobs, stops, frees all
    runtime._thread.join(10)
    assert not runtime._thread.is_alive()
    assert runtime.closed
    for thread in waiting:
        thread.join(10)
        assert not thread.is_alive()
    assert [s.outcome.finish_reason for s in streams] == ["cancelled", "cancelled"]


def test_a_file_llama_cpp_cannot_read_is_a_model_load_error(tmp_path: Path,
                                                           tiny_files: tuple[Path, Path]) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(ModelLoadError, match="could not load"):
        LlamaSequence.load(bad, tiny_files[1], context_length=64)


@pytest.mark.parametrize(("preset", "expected"), [
    ({}, "ACTIVE 300000"),
    # A user's own choice of either is kept, and the other is not set beside it.
    ({"OMP_WAIT_POLICY": "PASSIVE"}, "PASSIVE None"),
    ({"GOMP_SPINCOUNT": "10"}, "None 10"),
])
def test_openmp_keeps_spinning_at_barriers_when_threads_outnumber_cores(
        preset: dict[str, str], expected: str) -> None:
    """Loading llama.cpp sets how libgomp waits (read once, when it loads) in a fresh
    process: with more OpenMP threads than cores it would otherwise sleep at every barrier."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    code = ("import os; from orion_fsm.backends._llama_cpp import _llama; _llama(); "
            "print(os.environ.get('OMP_WAIT_POLICY'), os.environ.get('GOMP_SPINCOUNT'))")
    out = subprocess.run([sys.executable, "-c", code], env={**env, **preset},
                         capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip().splitlines()[-1] == expected
