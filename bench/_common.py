"""What every benchmark module shares: the shape of a check, percentiles, a tiny registry."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def check(figure: str, value: float, target: str, met: bool) -> dict[str, Any]:
    """One measured figure against its target, as the report lists it."""
    return {"figure": figure, "value": round(value, 4), "target": target, "met": met}


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile; 0 for no values (a run where nothing of that kind happened)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] if ordered else 0.0


def tiny_registry_doc(model: Path, *, max_tokens: int = 1) -> dict[str, Any]:
    """A one-agent registry over a tiny model: engine costs with almost no generation."""
    return {"version": 1, "default_agent": "a", "agents": [{
        "id": "a", "role": "a", "description": "tiny", "capabilities": [],
        "model": {"path": str(model)}, "format": "gguf", "model_type": "llama",
        "chat_template": "chatml", "system_prompt": "", "context_length": 128,
        "generation": {"max_tokens": max_tokens, "temperature": 0}, "ram_estimate_mb": 1,
        "fallback": None}]}
