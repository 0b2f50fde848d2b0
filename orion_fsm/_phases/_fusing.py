"""fusing: a virtual agent's member answers become one, in a stated structure (the solution,
then the explanation), or the virtual agent's own fallback when no member served.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Final

from ..services.observability import _attributes as attr
from ._members import MemberRun
from ._state import Next, Region, RequestState, Services

SECTION_SEPARATOR: Final = "\n\n"


async def fusing(services: Services,
                 state: RequestState) -> AsyncGenerator[str | Region | Next, None]:
    """Yields what a streaming caller has not seen yet, then `fused` or `unserved`."""
    spec = state.virtual
    assert spec is not None
    served = [r for r in state.members if r.outcome == "done" and r.text()]
    if not served:
        state.failures.extend(f for r in state.members for f in r.state.failures)
        state.failure_kind = "members_failed"  # not transient: straight to the next agent
        state.notes[attr.VIRTUAL_SERVED] = []
        yield Next("unserved")
        return
    used = fused_members(spec.strategy, spec.min_weight, served)
    text = SECTION_SEPARATOR.join(r.text() for r in used)
    already = "".join(state.text_parts)  # the solution, streamed as soon as it was final
    rest = text[len(already):] if text.startswith(already) else text
    state.text_parts = [text]
    state.fusion = {"strategy": spec.strategy, "used": [r.role for r in used],
                    "weights": {r.role: round(r.weight, 4) for r in state.members}}
    state.finish_reason = "stop" if all(
        r.state.finish_reason == "stop" for r in used) else "length"
    if state.first_token_at is None:
        firsts = [r.state.first_token_at for r in used if r.state.first_token_at is not None]
        state.first_token_at = min(firsts) if firsts else None
    state.notes.update({attr.VIRTUAL_STRATEGY: spec.strategy,
                        attr.VIRTUAL_USED: [r.member.agent for r in used],
                        attr.GEN_AI_USAGE_OUTPUT_TOKENS: sum(len(r.state.token_ids)
                                                             for r in state.members)})
    if state.streaming and rest:
        state.emitted_chars += len(rest)
        yield rest
    yield Next("fused")


def fused_members(strategy: str, min_weight: float, served: list[MemberRun]) -> list[MemberRun]:
    """The members whose answers make the fused one, in role order (solution first)."""
    if strategy == "best":
        return [max(served, key=lambda r: r.weight * (r.confidence() or 0.0))]
    kept = [r for r in served if r.weight >= min_weight]
    return kept or [max(served, key=lambda r: r.weight)]
