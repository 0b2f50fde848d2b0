"""What the L1 result cache stores, and that a stored value of the wrong shape is a miss."""

from __future__ import annotations

import pytest

from orion_fsm.services.caches._entries import CachedResult


def test_an_entry_round_trips_through_plain_data() -> None:
    entry = CachedResult("Paris.", (1, 2, 3), (7, 8), "stop")
    assert CachedResult.from_value(entry.as_value()) == entry


@pytest.mark.parametrize("value", [
    None, "text", 42, [], {},
    {"text": "x", "token_ids": [1], "prompt_token_ids": [2]},  # no finish_reason
    {"text": 1, "token_ids": [1], "prompt_token_ids": [2], "finish_reason": "stop"},
    {"text": "x", "token_ids": ["1"], "prompt_token_ids": [2], "finish_reason": "stop"},
    {"text": "x", "token_ids": [True], "prompt_token_ids": [2], "finish_reason": "stop"},
    {"text": "x", "token_ids": [1], "prompt_token_ids": "12", "finish_reason": "stop"},
])
def test_a_value_of_another_shape_is_not_an_entry(value: object) -> None:
    assert CachedResult.from_value(value) is None
