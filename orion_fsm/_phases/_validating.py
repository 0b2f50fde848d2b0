"""validating: the request's shape, parameters and input guards, before any model is touched."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

from .._exceptions import (
    ValidationError,
)
from .._structured import output_format
from .._types import GenerationParams, Message, Request
from ..services.models._registry import generation_bounds
from ..services.observability import _attributes as attr
from ._state import RequestState, Services

if TYPE_CHECKING:
    pass

_ROLES = frozenset({"system", "user", "assistant", "tool"})
_INTEGRAL = frozenset({"max_tokens", "top_k", "seed"})
_MAX_STOP = 16



def _check_params(params: GenerationParams) -> tuple[str, str] | None:
    for name, (low, high) in generation_bounds().items():
        value = getattr(params, name)
        if value is None:
            continue
        integral = name in _INTEGRAL
        if isinstance(value, bool) or not isinstance(value, int | float) or (
            integral and not isinstance(value, int)
        ):
            kind = "an integer" if integral else "a number"
            return name, f"{name} must be {kind}, got {value!r}"
        if isinstance(value, float) and not math.isfinite(value):
            return name, f"{name} must be finite, got {value!r}"
        if not low <= value <= high:
            if not integral:  # the schema writes 2 where a float parameter means 2.0
                low, high = float(low), float(high)
            shown_low = 0 if name == "top_p" else low
            rel = "above 0 and at most" if name == "top_p" else f"between {shown_low} and"
            return name, f"{name} must be {rel} {high}, got {value!r}"
    if params.stop is not None:
        if not isinstance(params.stop, tuple):
            return "stop", ("stop must be a string or a list of strings, got "
                            f"{type(params.stop).__name__}")
        if len(params.stop) > _MAX_STOP:
            return "stop", f"at most {_MAX_STOP} stop sequences, got {len(params.stop)}"
        for s in params.stop:
            if not isinstance(s, str) or not s:
                return "stop", f"stop sequences must be non-empty strings, got {s!r}"
    return None


def _check_messages(messages: Sequence[Message]) -> tuple[str, str] | None:
    if not messages:
        return "prompt", "the prompt is empty: pass a non-empty string or at least one message"
    for i, m in enumerate(messages):
        where = "prompt" if len(messages) == 1 else f"messages[{i}]"
        if not isinstance(m.content, str):
            return where, f"{where} must be text, got {type(m.content).__name__}"
        if m.role not in _ROLES:
            return where, f"{where} has role {m.role!r}; expected system, user, assistant or tool"
        if "\x00" in m.content:
            return where, f"{where} contains a NUL character; remove it"
    if not any(m.role == "user" and m.content.strip() for m in messages):
        return "prompt", ("the prompt is empty or only whitespace: "
                          "give the model a question or an instruction")
    return None


def _check_options(request: Request) -> tuple[str, str] | None:
    if request.agent is not None and not isinstance(request.agent, str):
        return "agent", f"agent must be an agent id (text), got {type(request.agent).__name__}"
    if request.cache is not None and not isinstance(request.cache, bool):
        return "cache", f"cache must be True, False or None, got {request.cache!r:.40}"
    return None


async def validating(services: Services, state: RequestState) -> str:
    request, registry = state.request, services.registry
    problem = (request.refused or _check_messages(request.messages)
               or _check_params(request.params) or _check_options(request))
    if problem is None and request.agent is not None and not registry.known(request.agent):
        known = registry.known_ids()
        problem = "agent", f"unknown agent {request.agent!r}; known agents: {known}"
    if problem is None:
        try:
            state.output_format = fmt = output_format(request)
        except ValidationError as exc:
            problem = exc.field, exc.message
        else:
            if fmt is not None:
                state.notes.update({attr.OUTPUT_FORMAT: fmt.kind,
                                    attr.OUTPUT_GRAMMAR_DIGEST: fmt.grammar.digest})
    if problem is not None:
        state.fail("invalid", problem[1], field=problem[0])
        return "invalid"
    state.notes[attr.MESSAGES] = len(request.messages)
    if services.guardrails is not None:
        agents = registry.agents
        context = (registry.context_length(request.agent) if request.agent is not None
                   else max(a.context_length for a in agents.values()))
        verdict = services.guardrails.check_input(request.messages, request.params,
                                                  context_length=context)
        state.notes.update(verdict.as_notes())
        if (blocked := verdict.blocked) is not None:
            state.fail("invalid", blocked.message, field=blocked.field)
            return "invalid"
    return "valid"
