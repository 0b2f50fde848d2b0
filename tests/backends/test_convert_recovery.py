"""A conversion killed half-way, or converted files damaged afterwards (issue 15, class 9):
the next start removes what was left and converts again, never "download it again"."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from orion_fsm.backends import ensure_converted, file_sha256, read_gguf_header
from orion_fsm.backends._tokenizer import Tokenizer
from orion_fsm.testing import make_tiny_llama_gguf

_KILLED_AT = """
import sys, time
from pathlib import Path
from orion_fsm.backends import ensure_converted

def progress(stage, done, total):
    if stage == "convert":
        print("converting", flush=True)
        time.sleep(600)  # SIGKILLed here, half-way through writing the model

ensure_converted(Path(sys.argv[1]), Path(sys.argv[2]), progress=progress)
"""


@pytest.fixture
def source(tmp_path: Path) -> Path:
    return make_tiny_llama_gguf(tmp_path / "src" / "tiny.gguf", llama_cpp_layout=True)


def _leftovers(cache: Path) -> list[str]:
    return sorted(p.name for p in cache.rglob(".*.tmp"))


def test_a_conversion_killed_half_way_leaves_no_temp_file_after_the_next_start(
        source: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])}
    child = subprocess.Popen([sys.executable, "-c", _KILLED_AT, str(source), str(cache)],
                             stdout=subprocess.PIPE, env=env, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline() == "converting\n"
        child.send_signal(signal.SIGKILL)
    finally:
        child.wait(timeout=60)
    assert _leftovers(cache), "the kill left nothing to clean: the test did not test"
    converted = ensure_converted(source, cache)
    assert _leftovers(cache) == []
    assert read_gguf_header(converted.model_path).version == 2
    assert Tokenizer.from_file(converted.tokenizer_path).token_id("<|im_end|>") == 2


@pytest.mark.parametrize("name", [".model.abc123.tmp", ".tokenizer.json.xyz.tmp"])
def test_stale_temp_files_beside_an_intact_conversion_are_swept(
        source: Path, tmp_path: Path, name: str) -> None:
    converted = ensure_converted(source, tmp_path / "cache")
    stale = converted.model_path.parent / name
    stale.write_bytes(b"half a model")
    again = ensure_converted(source, tmp_path / "cache")
    assert again == converted and not stale.exists()


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip_a_byte(path: Path) -> None:
    # Same size, same mtime: only a digest would see it. Changed mtime makes it checked.
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _garbage(path: Path) -> None:
    path.write_bytes(os.urandom(path.stat().st_size))


def _empty(path: Path) -> None:
    path.write_bytes(b"")


def _delete(path: Path) -> None:
    path.unlink()


@pytest.mark.parametrize("damage", [_truncate, _flip_a_byte, _garbage, _empty, _delete])
@pytest.mark.parametrize("which", ["model", "tokenizer"])
def test_a_damaged_converted_file_is_converted_again(
        source: Path, tmp_path: Path, damage: Callable[[Path], None], which: str) -> None:
    converted = ensure_converted(source, tmp_path / "cache")
    path = converted.model_path if which == "model" else converted.tokenizer_path
    digest = file_sha256(path)
    damage(path)
    again = ensure_converted(source, tmp_path / "cache")
    assert again == converted
    assert file_sha256(path) == digest
    assert read_gguf_header(again.model_path).data_end <= again.model_path.stat().st_size


@pytest.mark.parametrize("which", ["model", "tokenizer"])
def test_a_cache_converted_before_manifests_is_checked_and_repaired(
        source: Path, tmp_path: Path, which: str) -> None:
    converted = ensure_converted(source, tmp_path / "cache")
    manifest = converted.model_path.parent / "manifest.json"
    manifest.unlink()
    assert ensure_converted(source, tmp_path / "cache") == converted and manifest.is_file()
    manifest.unlink()
    path = converted.model_path if which == "model" else converted.tokenizer_path
    digest = file_sha256(path)
    _truncate(path)
    assert ensure_converted(source, tmp_path / "cache") == converted
    assert file_sha256(path) == digest and manifest.is_file()
