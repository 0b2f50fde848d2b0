"""`Engine.embed`: the engine's shared embedding model for callers (the HTTP server's
/v1/embeddings); refused with a one-line error when embeddings are off or the engine is not
running. The vectors themselves are checked with the real MiniLM in tests/http."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from orion_fsm import EmbeddingError, Engine, OrionError

pytestmark = pytest.mark.anyio


async def test_embed_without_embeddings_says_how_to_enable_them(
        make_engine: Callable[..., Engine]) -> None:
    async with make_engine(embeddings=False) as engine:
        with pytest.raises(EmbeddingError, match="embeddings are off"):
            await engine.embed(["hello"])


async def test_embed_outside_the_engine_block_is_refused(
        make_engine: Callable[..., Engine]) -> None:
    engine = make_engine(embeddings=False)
    with pytest.raises(OrionError, match="not running"):
        await engine.embed(["hello"])
