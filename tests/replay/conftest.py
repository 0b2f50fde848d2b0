"""What the replay tests share: the trace records the `make_engine` engines wrote."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from orion_fsm import read_traces


@pytest.fixture
def recorded(tmp_path: Path) -> Callable[[], list[dict[str, Any]]]:
    """Reads the records written so far by this test's `make_engine` engines."""

    def read() -> list[dict[str, Any]]:
        return list(read_traces(tmp_path / "traces" / "test.jsonl"))

    return read
