"""What the L1 result cache stores: a `CachedResult`, kept as plain JSON-able data.

Written by the inferencing phase, read back by routing; a stored value of the wrong shape
(an older format, a hand-edited or corrupt entry) reads as a miss, never as an error.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class CachedResult:
    """One complete answer, as the routed agent gave it."""

    text: str
    token_ids: tuple[int, ...]
    prompt_token_ids: tuple[int, ...]
    finish_reason: str

    def as_value(self) -> dict[str, Any]:
        return {"text": self.text, "token_ids": list(self.token_ids),
                "prompt_token_ids": list(self.prompt_token_ids),
                "finish_reason": self.finish_reason}

    @classmethod
    def from_value(cls, value: object) -> CachedResult | None:
        """The entry `value` holds, or None when it is not one (a miss)."""
        if not isinstance(value, Mapping):
            return None
        text, ids, prompt, reason = (value.get("text"), value.get("token_ids"),
                                     value.get("prompt_token_ids"), value.get("finish_reason"))
        if not (isinstance(text, str) and isinstance(reason, str)
                and _ids(ids) and _ids(prompt)):
            return None
        assert isinstance(ids, list | tuple) and isinstance(prompt, list | tuple)
        return cls(text, tuple(ids), tuple(prompt), reason)


def _ids(value: object) -> bool:
    return isinstance(value, list | tuple) and all(
        isinstance(i, int) and not isinstance(i, bool) for i in value)
