"""Locate the data files orion_fsm ships: statecharts, the default registry and its schema.

Wheels carry them under `orion_fsm/_data/`; editable installs read them from the repository root.
"""

from __future__ import annotations

from pathlib import Path

# This module sits at the package root, so its folder is the package folder; importing
# orion_fsm here would make every service depend on the package's import-time side effects.
_PACKAGE_DIR = Path(__file__).resolve().parent
_CANDIDATE_ROOTS = (_PACKAGE_DIR / "_data", _PACKAGE_DIR.parent)


def data_file(*parts: str) -> Path:
    """Return the path of a packaged data file or folder, e.g. `data_file("models.json")`."""
    if not parts:
        raise ValueError("data_file() needs at least one path component")
    for root in _CANDIDATE_ROOTS:
        candidate = root.joinpath(*parts)
        if candidate.exists():
            return candidate
    searched = ", ".join(str(root.joinpath(*parts)) for root in _CANDIDATE_ROOTS)
    raise FileNotFoundError(
        f"orion_fsm data file {'/'.join(parts)!r} not found (searched {searched}); "
        "reinstall orion-fsm or run from a checkout of the repository"
    )
