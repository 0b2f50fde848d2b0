"""A tuned model as a registry entry: its folder in the cache (GGUF + tokenizer.json + report,
moved into place complete), and a variant of the base agent in a user registry file (a copy of
the base registry the first time; the packaged models.json is never edited)."""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from orion_fsm._exceptions import RegistryError, TuningError
from orion_fsm._files import make_private_dirs, write_atomically
from orion_fsm.backends._convert import MODEL_FILENAME, TOKENIZER_FILENAME, file_sha256
from orion_fsm.services.models._registry import Registry

__all__ = ["REPORT_FILENAME", "register_variant", "store_model", "variant_id"]

REPORT_FILENAME = "report.json"


def variant_id(agent_id: str, sha256: str) -> str:
    """`conversation-tuned-1a2b3c4d`: the base agent's id and the tuned file's digest (an
    agent id is a lowercase slug, so no `@`)."""
    return f"{agent_id[:46]}-tuned-{sha256[:8]}"


def store_model(tuned_dir: Path, write_model: Callable[[Path], None], tokenizer: Path
                ) -> tuple[Path, str]:
    """Write a tuned model into tuned_dir/<sha256[:16]>/ and return (its GGUF, its sha256).

    Everything is written in a hidden folder beside it and renamed into place in one step:
    a crash or an error leaves no half-written model where the registry would point."""
    try:
        make_private_dirs(tuned_dir)
        staging = Path(tempfile.mkdtemp(dir=tuned_dir, prefix=".tuning-"))
    except OSError as exc:
        raise TuningError(f"cannot write into {tuned_dir}: {exc}; check --cache-dir") from None
    try:
        write_model(staging / MODEL_FILENAME)
        shutil.copyfile(tokenizer, staging / TOKENIZER_FILENAME)
        sha = file_sha256(staging / MODEL_FILENAME)
        final = tuned_dir / sha[:16]
        if (final / MODEL_FILENAME).is_file():
            shutil.rmtree(staging)  # the same weights were written before: keep those
        else:
            os.replace(staging, final)
        return final / MODEL_FILENAME, sha
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def register_variant(base: Registry, agent_id: str, new_id: str, model: Path, target: Path,
                     description: str) -> Registry:
    """Add (or replace) agent `new_id`, a copy of `agent_id` served by `model`, in the registry
    file `target`; created from `base`'s document when it does not exist yet. The variant falls
    back to its base agent and is not routed to: a caller names it (`--agent`)."""
    if target.is_file():
        try:
            doc = json.loads(target.read_text(encoding="utf-8"))
            Registry.from_dict(doc, source=target.resolve())
        except (OSError, ValueError, RegistryError) as exc:
            raise TuningError(f"the registry {target} cannot take the variant: {exc}; name "
                              "another with --output") from None
    else:
        doc = _base_document(base)
    agents: list[dict[str, Any]] = doc["agents"]
    raw = next((a for a in agents if a["id"] == agent_id), None)
    if raw is None:
        raw = next(a for a in _base_document(base)["agents"] if a["id"] == agent_id)
        agents.append(raw)
    variant = copy.deepcopy(raw)
    variant.update({
        "id": new_id, "description": description, "model": {"path": str(model.resolve())},
        "quantization": [], "fallback": agent_id,
        "routing": {"keywords": [], "patterns": [], "examples": []},
    })
    doc["agents"] = [a for a in agents if a["id"] != new_id] + [variant]
    try:
        registry = Registry.from_dict(doc, source=target.resolve())
    except RegistryError as exc:
        raise TuningError(f"the variant does not make a valid registry: {exc}") from None
    _write_json(target, doc)
    return registry


def _base_document(base: Registry) -> dict[str, Any]:
    """The base registry's document, its relative model paths made absolute (the copy lives
    in another folder)."""
    if base.source is None:
        raise TuningError("the registry was built in memory, not read from a file: pass "
                          "--output with an existing registry file")
    doc: dict[str, Any] = json.loads(base.source.read_text(encoding="utf-8"))
    doc.pop("$schema", None)  # a relative reference that would not resolve beside the copy
    for agent in doc["agents"]:
        for source in [agent["model"], *(q["source"] for q in agent.get("quantization", []))]:
            if "path" in source:
                path = Path(source["path"]).expanduser()
                source["path"] = str(path if path.is_absolute() else base.source.parent / path)
    return doc


def _write_json(path: Path, doc: Any) -> None:
    text = json.dumps(doc, indent=2, ensure_ascii=False) + "\n"
    try:
        make_private_dirs(path.parent)
        write_atomically(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    except OSError as exc:
        raise TuningError(f"cannot write {path}: {exc}") from None
