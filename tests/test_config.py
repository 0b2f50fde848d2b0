"""Defaults in one module: the cache folder, the trace file, the REPL history and the limits,
and the engine and services agree with them."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest

from orion_fsm import Engine, MemoryMonitor
from orion_fsm import _config as config
from orion_fsm.services.resilience._admission import AdmissionController, TimeoutPolicy


def test_cache_dir_is_the_variable_else_the_xdg_cache_else_home(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("ORION_FSM_CACHE", str(tmp_path / "mine"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert config.default_cache_dir() == tmp_path / "mine"
    monkeypatch.setenv("ORION_FSM_CACHE", "")  # empty counts as unset
    assert config.default_cache_dir() == tmp_path / "xdg" / "orion-fsm"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert config.default_cache_dir() == tmp_path / "home" / ".cache" / "orion-fsm"


def test_a_given_cache_dir_wins_and_the_files_under_it_are_named_once(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("ORION_FSM_CACHE", str(tmp_path / "env"))
    assert config.resolve_cache_dir(str(tmp_path / "given")) == tmp_path / "given"
    assert config.resolve_cache_dir(None) == tmp_path / "env"
    assert config.caches_dir(tmp_path) == tmp_path / "caches"
    assert config.repl_history_path(tmp_path) == tmp_path / "repl-history"


def test_trace_path_is_the_variable_else_the_xdg_state_folder_never_the_working_directory(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("ORION_FSM_TRACE_FILE", raising=False)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    assert config.default_trace_path() == (
        tmp_path / "state" / "orion-fsm" / "traces" / "orion-fsm.jsonl")
    monkeypatch.delenv("XDG_STATE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert config.default_trace_path() == (
        tmp_path / "home" / ".local" / "state" / "orion-fsm" / "traces" / "orion-fsm.jsonl")
    monkeypatch.setenv("ORION_FSM_TRACE_FILE", str(tmp_path / "t.jsonl"))
    assert config.default_trace_path() == tmp_path / "t.jsonl"


def test_the_engine_and_the_services_use_the_same_defaults(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    engine = inspect.signature(Engine).parameters
    assert engine["timeout_s"].default == config.DEFAULT_TIMEOUT_S
    assert engine["max_in_flight"].default == config.DEFAULT_MAX_IN_FLIGHT
    assert engine["max_queue"].default == config.DEFAULT_MAX_QUEUE
    assert engine["memory_interval_s"].default == config.DEFAULT_MEMORY_INTERVAL_S
    admission = AdmissionController()
    assert (admission.max_in_flight, admission.max_queue) == (
        config.DEFAULT_MAX_IN_FLIGHT, config.DEFAULT_MAX_QUEUE)
    assert TimeoutPolicy().timeout_s == config.DEFAULT_TIMEOUT_S
    assert MemoryMonitor().interval_s == config.DEFAULT_MEMORY_INTERVAL_S
    built = Engine(cache_dir=tmp_path, embeddings=False)
    assert built.trace_path == config.default_trace_path()
    assert built.trace_path.is_absolute()
    assert built.caches is not None and built.caches.root == config.caches_dir(tmp_path)
    monkeypatch.setenv("ORION_FSM_CACHE", str(tmp_path / "env"))
    from_env = Engine(embeddings=False)  # no cache_dir: the configured default
    assert from_env.caches is not None
    assert from_env.caches.root == config.caches_dir(tmp_path / "env")
