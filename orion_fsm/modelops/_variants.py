"""`register_variant`: add a model file to an agent of a registry file as a named variant.

The registry (a models.json the user owns, never the packaged one) gains or replaces one
`quantization` entry; the new document is validated before it replaces the file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Final

from orion_fsm._exceptions import ModelFileError, RegistryError
from orion_fsm.backends import read_gguf_header
from orion_fsm.backends._gguf_io import replace_atomically
from orion_fsm.services.models._registry import Registry
from orion_fsm.services.models._tiers import DEFAULT_VARIANT

__all__ = ["register_variant"]

# general.file_type (llama.cpp's LlamaFileType) -> bits per weight of the matrices.
_FILE_TYPE_BITS: Final = {0: 32, 1: 16, 2: 4, 3: 4, 7: 8, 8: 5, 9: 5, 10: 2, 11: 3, 12: 3,
                          13: 3, 14: 4, 15: 4, 16: 5, 17: 5, 18: 6, 32: 16}


def register_variant(registry_file: Path, agent_id: str, name: str, model: Path,
                     bits: int | None = None) -> Registry:
    """Make `model` the agent's variant `name` (e.g. q8_0, merged) in `registry_file`; the
    loader serves it when asked for that variant (Engine/--quantization). `bits` defaults to
    what the model's file type says. Returns the new registry."""
    registry_file = Path(registry_file)
    current = Registry.load(registry_file)  # one-line RegistryError if it is not usable
    if agent_id not in current.agents:
        raise ModelFileError(f"{registry_file} has no agent {agent_id!r}; known: "
                             f"{', '.join(current.agents)}")
    doc = json.loads(registry_file.read_text(encoding="utf-8"))
    entry = {"name": name, "bits": bits if bits is not None else _bits(Path(model)),
             "source": {"path": str(Path(model).resolve())}}
    for agent in doc["agents"]:
        if agent["id"] == agent_id:
            variants = agent.get("quantization") or [
                # The agent's own model becomes a variant too, or the new one would be the
                # only choice; the RAM tier (or --quantization) then picks among them by bits.
                {"name": DEFAULT_VARIANT, "bits": _bits(current.agents[agent_id].model.locate()),
                 "source": agent["model"]}]
            variants = [v for v in variants if v.get("name") != name]
            agent["quantization"] = [*variants, entry]
    try:
        updated = Registry.from_dict(doc, source=registry_file.resolve())
    except RegistryError as exc:
        raise ModelFileError(f"cannot register variant {name!r}: {exc}") from None
    text = json.dumps(doc, indent=2, ensure_ascii=False) + "\n"
    replace_atomically(registry_file, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    return updated


def _bits(model: Path) -> int:
    file_type = read_gguf_header(model).metadata.get("general.file_type")
    return _FILE_TYPE_BITS.get(file_type, 16) if isinstance(file_type, int) else 16
