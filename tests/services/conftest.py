"""Fixtures shared by the service tests."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest

from orion_fsm.services.routing._embeddings import EmbeddingService, default_model_dir


@pytest.fixture(scope="session")
def model_dir() -> Path:
    """Load the real embedding model once per session; every service of the process shares it."""
    folder = default_model_dir()

    async def load() -> None:
        async with EmbeddingService(folder) as service:
            await service.embed("warm up")

    anyio.run(load)
    return folder
