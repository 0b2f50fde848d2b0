"""engine.feedback: a rating of a recent answer is stored with its trace id, the prompt as
the agent saw it and the answer, redacted; bad ratings are refused with one line; the CLI
exports the training JSONL; the HTTP server takes POST /v1/feedback."""

from __future__ import annotations

import json
import stat
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from orion_fsm import Engine, FeedbackError, FeedbackStore, default_feedback_path
from orion_fsm.cli import main
from orion_fsm.http import create_app
from tests.conftest import read_trace_lines

pytestmark = pytest.mark.anyio
SECRET = "sk-proj-" + "A1b2C3d4E5f6G7h8I9j0K1l2M3n4O5p6"


async def test_a_rating_keeps_the_prompt_the_agent_saw_its_answer_and_trace_id(
        make_engine: Callable[..., Engine], tmp_path: Path) -> None:
    async with make_engine() as engine:
        result = await engine.infer("hello there", agent="conversation")
        record = await engine.feedback(result.request_id, 5)
    assert record.trace_id == result.trace_id and record.agent == "conversation"
    assert record.system == "You are the conversation agent."  # the agent's system prompt
    assert record.input == "hello there" and record.answer == result.text
    (trace,) = read_trace_lines(tmp_path / "traces" / "test.jsonl")
    assert trace["trace_id"] == record.trace_id
    stored = list(FeedbackStore(default_feedback_path()).records())
    assert [r.as_dict() for r in stored] == [record.as_dict()]
    assert stat.S_IMODE(default_feedback_path().stat().st_mode) == 0o600


async def test_secrets_in_prompt_and_correction_are_redacted_before_the_disk(
        make_engine: Callable[..., Engine]) -> None:
    async with make_engine() as engine:
        result = await engine.infer(f"hello, my api key is {SECRET}", agent="conversation")
        await engine.feedback(result.request_id, 0,
                              correction=f"Never share {SECRET}; write to bob@example.com")
    raw = default_feedback_path().read_bytes() + b"".join(
        p.read_bytes() for p in default_feedback_path().parent.glob("*-wal"))
    assert SECRET.encode() not in raw and b"bob@example.com" not in raw
    (record,) = FeedbackStore(default_feedback_path()).records()
    assert "[REDACTED:" in record.input and "[REDACTED:" in record.correction  # type: ignore[operator]


async def test_a_conversation_turn_keeps_its_history(make_engine: Callable[..., Engine]) -> None:
    async with make_engine() as engine:
        session = engine.session(agent="conversation")
        first = await session.infer("hello")
        second = await session.infer("and then?")
        record = await engine.feedback(second.request_id, 4)
    assert record.input == "and then?"
    assert record.history == (("user", "hello"), ("assistant", first.text))


@pytest.mark.parametrize(("request_id", "score", "correction", "field"), [
    ("0123456789abcdef", 5, None, "request_id"),
    (None, 6, None, "score"),
    (None, -1, None, "score"),
    (None, "5", None, "score"),
    (None, 1.5, None, "score"),
    (None, 0, "   ", "correction"),
])
async def test_bad_ratings_are_refused_with_one_line_naming_the_field(
        make_engine: Callable[..., Engine], request_id: str | None, score: object,
        correction: str | None, field: str) -> None:
    async with make_engine() as engine:
        result = await engine.infer("hello", agent="conversation")
        with pytest.raises(FeedbackError) as caught:
            await engine.feedback(request_id or result.request_id, score,  # type: ignore[arg-type]
                                  correction)
    assert caught.value.field == field and "\n" not in str(caught.value)
    assert not default_feedback_path().exists()  # nothing stored


async def test_a_failed_request_cannot_be_rated(make_engine: Callable[..., Engine]) -> None:
    async with make_engine() as engine:
        with pytest.raises(Exception) as failed:
            await engine.infer("hello", agent="conversation", max_tokens=-3)
        with pytest.raises(FeedbackError, match="no answered request"):
            await engine.feedback(failed.value.request_id, 5)  # type: ignore[attr-defined]


async def test_feedback_off_refuses_ratings(make_engine: Callable[..., Engine]) -> None:
    async with make_engine(feedback=False) as engine:
        result = await engine.infer("hello", agent="conversation")
        with pytest.raises(FeedbackError, match="feedback is off"):
            await engine.feedback(result.request_id, 5)


async def test_export_writes_corrections_and_well_rated_answers_as_training_lines(
        make_engine: Callable[..., Engine], tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    async with make_engine() as engine:
        good = await engine.infer("hello one", agent="conversation")
        bad = await engine.infer("hello two", agent="conversation")
        fixed = await engine.infer("hello three", agent="conversation")
        await engine.feedback(good.request_id, True)
        await engine.feedback(bad.request_id, 1)
        await engine.feedback(fixed.request_id, 5)
        await engine.feedback(fixed.request_id, 0, correction="Hi! How can I help?")  # replaces
    out = tmp_path / "train.jsonl"
    assert main(["feedback", "export", "--output", str(out)]) == 0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert lines == [
        {"input": "hello one", "target": good.text, "system": "You are the conversation agent."},
        {"input": "hello three", "target": "Hi! How can I help?",
         "system": "You are the conversation agent."},
    ]
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert main(["feedback", "stats", "--json"]) == 0
    stats = json.loads(capsys.readouterr().out.split("\n", 1)[1])
    assert stats == {"total": 3, "by_score": {"0": 1, "1": 1, "5": 1},
                     "by_agent": {"conversation": 3}, "corrections": 1, "exportable": 2,
                     "min_score": 4}


def test_export_without_a_store_is_a_one_line_error(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["feedback", "export", "--output", str(tmp_path / "t.jsonl")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no feedback store" in err
    assert not (tmp_path / "t.jsonl").exists()


async def test_http_feedback_rates_a_completion_and_refuses_bad_bodies(
        make_engine: Callable[..., Engine]) -> None:
    app = create_app(lambda meter_provider: make_engine(meter_provider=meter_provider))
    async with app.router.lifespan_context(app), httpx.AsyncClient(
            transport=httpx.ASGITransport(app), base_url="http://orion") as http:
        answer = (await http.post("/v1/chat/completions", json={
            "model": "conversation", "messages": [{"role": "user", "content": "hello"}],
            "max_tokens": 3})).json()
        request_id = answer["orion"]["request_id"]
        rated = await http.post("/v1/feedback", json={"request_id": request_id, "score": 1,
                                                      "correction": "Hello!"})
        unknown = await http.post("/v1/feedback", json={"request_id": "feedfeedfeedfeed",
                                                        "score": 1})
        bad_score = await http.post("/v1/feedback", json={"request_id": request_id,
                                                          "score": 9})
        no_id = await http.post("/v1/feedback", json={"score": 1})
    assert rated.status_code == 200 and rated.json()["request_id"] == request_id
    assert rated.json()["correction"] is True
    assert unknown.status_code == 404 and unknown.json()["error"]["param"] == "request_id"
    assert bad_score.status_code == 400 and bad_score.json()["error"]["param"] == "score"
    assert no_id.status_code == 400
    (record,) = FeedbackStore(default_feedback_path()).records()
    assert record.correction == "Hello!" and record.input == "hello"
