"""Structured logs (JSON and key=value) with request/trace ids, the machine's log listener, and
sanitisation of secrets and personal data in logs and trace records (tests/data corpus)."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import pytest

from orion_fsm import ConfigurationError, Engine
from orion_fsm._machine import request_chart
from orion_fsm.services.observability._logging import (
    LogListener,
    configure_logging,
    get_logger,
    request_context,
)
from orion_fsm.services.observability._sanitize import sanitize, sanitize_text
from orion_fsm.services.observability._tracefile import TraceWriter
from tests.conftest import read_trace_lines

CORPUS = json.loads((Path(__file__).parents[2] / "data" / "secrets_corpus.json")
                    .read_text(encoding="utf-8"))
POSITIVE = [pytest.param(c, id=f"{c['kind']}:{c['text'][:30]}") for c in CORPUS["positive"]]
NEGATIVE = [pytest.param(t, id=t[:40]) for t in CORPUS["negative"]]


@pytest.fixture
def log_stream() -> Iterator[Callable[..., io.StringIO]]:
    logger = logging.getLogger("orion_fsm")
    saved = (list(logger.handlers), logger.level, logger.propagate)

    def configure(**kwargs: Any) -> io.StringIO:
        stream = io.StringIO()
        configure_logging(stream=stream, **kwargs)
        return stream

    yield configure
    logger.handlers[:] = saved[0]
    logger.setLevel(saved[1])
    logger.propagate = saved[2]


def lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


# --- formatting -----------------------------------------------------------------------------


def test_json_lines_carry_level_logger_event_ids_and_fields(
        log_stream: Callable[..., io.StringIO]) -> None:
    stream = log_stream(level="DEBUG")
    log = get_logger("engine")
    with request_context("req-1", "trace-1"):
        log.debug("routing", extra={"agent": "code", "score": 0.5})
        log.warning("slow phase", extra={"phase": "loading_agent", "ms": 812.5})
    log.critical("engine stopped")
    first, second, third = lines(stream)
    assert first["level"] == "DEBUG" and first["logger"] == "orion_fsm.engine"
    assert first["event"] == "routing"
    assert (first["request_id"], first["trace_id"]) == ("req-1", "trace-1")
    assert (first["agent"], first["score"]) == ("code", 0.5)
    assert second["level"] == "WARN" and second["ms"] == 812.5
    assert third["level"] == "CRITICAL" and third["request_id"] is None
    assert first["ts"].endswith("Z") and "T" in first["ts"]


def test_level_filters_and_warn_is_accepted_as_a_level_name(
        log_stream: Callable[..., io.StringIO]) -> None:
    stream = log_stream(level="WARN")
    log = get_logger("orion_fsm.loader")
    log.info("not shown")
    log.error("shown", extra={"agent": "a"})
    (only,) = lines(stream)
    assert only["level"] == "ERROR" and only["logger"] == "orion_fsm.loader"


def test_unknown_level_is_refused(log_stream: Callable[..., io.StringIO]) -> None:
    with pytest.raises(ConfigurationError, match="DEBUG, INFO, WARN, ERROR, CRITICAL"):
        log_stream(level="LOUD")


def test_ids_passed_as_extra_win_over_the_context(
        log_stream: Callable[..., io.StringIO]) -> None:
    stream = log_stream()
    with request_context("outer", "t-outer"):
        get_logger("x").info("e", extra={"request_id": "inner"})
    (record,) = lines(stream)
    assert (record["request_id"], record["trace_id"]) == ("inner", "t-outer")


@pytest.mark.anyio
async def test_each_task_logs_its_own_request_ids(
        log_stream: Callable[..., io.StringIO]) -> None:
    stream = log_stream()
    log = get_logger("engine")

    async def request(n: int) -> None:
        with request_context(f"req-{n}", f"trace-{n}"):
            await anyio.lowlevel.checkpoint()
            log.info("done", extra={"n": n})

    async with anyio.create_task_group() as tg:
        for n in range(5):
            tg.start_soon(request, n)
    assert {(r["n"], r["request_id"], r["trace_id"]) for r in lines(stream)} == {
        (n, f"req-{n}", f"trace-{n}") for n in range(5)}


def test_verbose_mode_prints_readable_key_value_lines(
        log_stream: Callable[..., io.StringIO]) -> None:
    stream = log_stream(level="DEBUG", verbose=True)
    with request_context("req-1", None):
        get_logger("engine").debug("phase done", extra={"phase": "routing",
                                                        "note": "two words"})
    line = stream.getvalue().strip()
    assert " DEBUG orion_fsm.engine phase done request_id=req-1 phase=routing " in line
    assert 'note="two words"' in line and "trace_id" not in line
    assert "at=test_logging:" in line


def test_exceptions_are_logged_with_their_traceback_sanitised(
        log_stream: Callable[..., io.StringIO]) -> None:
    stream = log_stream()
    try:
        raise RuntimeError("login failed for jean.dupont@example.fr")
    except RuntimeError:
        get_logger("engine").exception("request crashed")
    (record,) = lines(stream)
    assert record["level"] == "ERROR"
    assert "RuntimeError: login failed for [REDACTED:email]" in record["exception"]
    assert "example.fr" not in stream.getvalue()


def test_configuring_twice_replaces_the_handler_and_never_touches_the_root_logger(
        log_stream: Callable[..., io.StringIO]) -> None:
    root_handlers = list(logging.getLogger().handlers)
    log_stream()
    stream = log_stream()
    get_logger("x").info("once")
    assert len(lines(stream)) == 1
    assert logging.getLogger().handlers == root_handlers


# --- the machine listener -------------------------------------------------------------------


def test_log_listener_logs_each_transition_of_a_request_machine(
        log_stream: Callable[..., io.StringIO]) -> None:
    stream = log_stream()
    listener = LogListener(get_logger("request"), "req-9", "trace-9")
    machine = request_chart()(listeners=[listener])
    for event in ("start", "valid", "routed", "load_failed", "retry", "loaded", "completed"):
        machine.send(event)
    records = lines(stream)
    assert [(r["trigger"], r["source"], r["target"]) for r in records] == [
        ("start", "idle", "validating"), ("valid", "validating", "routing"),
        ("routed", "routing", "loading_agent"), ("load_failed", "loading_agent", "fallback"),
        ("retry", "fallback", "loading_agent"), ("loaded", "loading_agent", "inferencing"),
        ("completed", "inferencing", "success")]
    assert {(r["level"], r["event"], r["request_id"], r["trace_id"]) for r in records} == {
        ("INFO", "transition", "req-9", "trace-9")}


def test_log_listener_is_idle_when_info_is_disabled(
        log_stream: Callable[..., io.StringIO]) -> None:
    stream = log_stream(level="ERROR")
    listener = LogListener(get_logger("request"), "r", "t")
    assert not listener.enabled
    machine = request_chart()(listeners=[listener])
    machine.send("start")
    assert stream.getvalue() == ""


# --- sanitisation ---------------------------------------------------------------------------


@pytest.mark.parametrize("case", POSITIVE)
def test_secrets_and_personal_data_are_redacted(case: dict[str, str]) -> None:
    out = sanitize_text(case["text"])
    assert case["secret"] not in out
    assert f"[REDACTED:{case['kind']}]" in out


@pytest.mark.parametrize("text", NEGATIVE)
def test_lookalikes_are_left_exactly_as_they_are(text: str) -> None:
    assert sanitize_text(text) == text


def test_the_corpus_is_large_enough_to_mean_something() -> None:
    kinds = {c["kind"] for c in CORPUS["positive"]}
    assert len(CORPUS["positive"]) >= 50 and len(CORPUS["negative"]) >= 40
    assert kinds >= {"openai_key", "aws_access_key", "github_token", "slack_token", "bearer",
                     "jwt", "assignment", "private_key", "email", "card", "iban", "phone"}


def test_labels_stay_readable_when_only_the_value_is_secret() -> None:
    assert sanitize_text("retry with password=hunter22 later") == (
        "retry with password=[REDACTED:assignment] later")
    assert sanitize_text("Authorization: Bearer abcdefghijklmnop1234") == (
        "Authorization: Bearer [REDACTED:authorization]")


def test_sanitize_walks_nested_structures_and_redacts_sensitive_keys_whole() -> None:
    record = {"request": {"messages": [{"role": "user",
                                        "content": "mail me: ana@example.org"}]},
              "headers": {"Authorization": "Basic abc", "X-Api-Key": "k1", "tokens": 12},
              "token_ids": [1, 2, 3], "password": "", "ok": ("tuple", 4111111111111111)}
    out = sanitize(record)
    assert out["request"]["messages"][0]["content"] == "mail me: [REDACTED:email]"
    assert out["headers"] == {"Authorization": "[REDACTED:secret]",
                              "X-Api-Key": "[REDACTED:secret]", "tokens": 12}
    assert out["token_ids"] == [1, 2, 3] and out["password"] == ""
    assert out["ok"] == ("tuple", 4111111111111111)  # numbers are not text: left alone
    assert record["request"]["messages"][0]["content"] == "mail me: ana@example.org"


def test_sanitize_returns_clean_structures_unchanged_without_copying() -> None:
    record = {"a": [1, 2, {"b": "loading_agent"}], "c": "4bf92f3577b34da6a3ce929d0e0e4736"}
    assert sanitize(record) is record


def test_json_logs_never_contain_the_corpus_secrets(
        log_stream: Callable[..., io.StringIO]) -> None:
    stream = log_stream()
    log = get_logger("engine")
    for case in CORPUS["positive"]:
        log.info(case["text"], extra={"prompt": case["text"], "nested": {"t": [case["text"]]}})
    written = stream.getvalue()
    for case in CORPUS["positive"]:
        assert case["secret"] not in written, case


@pytest.fixture
def secret_prompt() -> str:
    return " ".join(c["text"] for c in CORPUS["positive"][:12]).replace("\n", " ")


@pytest.mark.anyio
async def test_trace_record_of_a_real_request_is_sanitised_before_writing(
        make_engine: Callable[..., Engine], tmp_path: Path, secret_prompt: str) -> None:
    async with make_engine() as engine:
        await engine.infer(secret_prompt, agent="long", max_tokens=4)
    (record,) = read_trace_lines(engine.trace_path)  # type: ignore[arg-type]
    clean_path = tmp_path / "clean.jsonl"
    writer = TraceWriter(clean_path)
    async with anyio.create_task_group() as tg:
        await tg.start(writer.run)
        writer.submit(sanitize(record))
        writer.close()
    written = clean_path.read_text(encoding="utf-8")
    for case in CORPUS["positive"][:12]:
        assert case["secret"] not in written
    (clean,) = read_trace_lines(clean_path)
    assert clean["prompt_token_ids"] == record["prompt_token_ids"]
    assert clean["trace_id"] == record["trace_id"]
    assert clean["transitions"] == record["transitions"]


@pytest.mark.anyio
async def test_service_logs_made_during_a_request_carry_its_ids(
        make_engine: Callable[..., Engine], log_stream: Callable[..., io.StringIO]) -> None:
    stream = log_stream(level="INFO")
    async with make_engine() as engine:
        result = await engine.infer("hello", agent="long", max_tokens=2, cache=False)
    loaded = [line for line in lines(stream) if line["event"] == "model_loaded"]
    assert loaded, "the loader logs the model it loads for the request"
    assert (loaded[0]["request_id"], loaded[0]["trace_id"]) == (
        result.request_id, result.trace_id)
