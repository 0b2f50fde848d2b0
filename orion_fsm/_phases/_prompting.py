"""The prompt's token ids and the sampling parameters of an agent's generation."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Final

import anyio

from .._types import GenerationParams
from ..backends import Grammar, SamplingParams
from ..services.caches._cacheset import cache_key
from ..services.observability import _attributes as attr
from ._output import persist_unless_secret
from ._state import RequestState, Services

if TYPE_CHECKING:
    from .._seams import Prepared
    from ..services.models._registry import AgentSpec


# Past this many characters a prompt is tokenised in a worker thread: 40,000 characters take
# 10-30 ms, which the event loop (every other request's stream) must not wait for.
_ENCODE_ON_LOOP_CHARS: Final = 4096


async def _encode(prepared: Prepared, prompt: str) -> list[int]:
    if len(prompt) <= _ENCODE_ON_LOOP_CHARS:
        return prepared.tokenizer.encode(prompt)
    return await anyio.to_thread.run_sync(prepared.tokenizer.encode, prompt)


async def prompt_token_ids(services: Services, prompt: str, prepared: Prepared,
                           notes: dict[str, Any]) -> list[int]:
    """Rendered prompt -> token ids, through L3 (memory tier only on the hot path)."""
    caches = services.caches
    if caches is None:
        return await _encode(prepared, prompt)
    key = cache_key("prompt-ids", prepared.sha256, prompt)
    cached = caches.l3.get_memory(key)
    if cached is not None:
        notes[attr.CACHE_L3] = "hit"
        return list(cached)
    ids = await _encode(prepared, prompt)
    caches.l3.put_memory(key, tuple(ids))
    services.background(persist_unless_secret, caches.l3, key, tuple(ids), (prompt,))
    return ids


def grammar_of(state: RequestState) -> Grammar | None:
    return state.output_format.grammar if state.output_format is not None else None


def sampling_params(agent: AgentSpec, params: GenerationParams, room: int,
                    grammar: Grammar | None = None, *, scores: bool = False) -> SamplingParams:
    d = agent.generation
    stop = params.stop if params.stop is not None else d.stop
    return SamplingParams(
        max_tokens=min(params.max_tokens or d.max_tokens, room),
        temperature=d.temperature if params.temperature is None else params.temperature,
        top_k=d.top_k if params.top_k is None else params.top_k,
        top_p=d.top_p if params.top_p is None else params.top_p,
        repetition_penalty=(d.repetition_penalty if params.repetition_penalty is None
                            else params.repetition_penalty),
        seed=d.seed if params.seed is None else params.seed,
        stop=tuple(stop),
        grammar=grammar,
        scores=scores,
    )
