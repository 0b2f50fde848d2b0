"""The model registry: which agents exist, the model each runs, and how to prompt and route to it.

Parses `models.json`, once `_registry_checks` has validated it, into frozen values.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from orion_fsm._exceptions import ModelLoadError, RegistryError
from orion_fsm._resources import data_file
from orion_fsm.services.models._chat_templates import CHAT_TEMPLATE_PRESETS, ChatTemplate
from orion_fsm.services.models._registry_checks import (
    MAX_DEPTH,
    NonFinite,
    generation_bounds,
    validate,
)

__all__ = [
    "CHAT_TEMPLATE_PRESETS",
    "AgentSpec",
    "ChatTemplate",
    "GenerationDefaults",
    "ModelSource",
    "QuantVariant",
    "Registry",
    "RoutingHints",
    "VirtualMember",
    "VirtualSpec",
    "generation_bounds",
]


@dataclass(frozen=True)
class ModelSource:
    """Where a model file lives: a filesystem `path`, or a `file` inside an installed `package`."""

    path: Path | None = None
    package: str | None = None
    file: str | None = None

    def describe(self) -> str:
        if self.path is not None:
            return str(self.path)
        return f"{self.file} from package {self.package}"

    def locate(self) -> Path:
        """Return the model file's path, checking that it exists.

        Package sources are found with `find_spec`, which does not import the package: model
        packages often import heavy runtimes at import time.
        """
        if self.path is not None:
            candidate = self.path
        else:
            assert self.package is not None and self.file is not None
            spec = importlib.util.find_spec(self.package)
            if spec is None or not spec.submodule_search_locations:
                raise ModelLoadError(
                    f"model package {self.package!r} is not installed; install it "
                    f'or point the registry at a file with {{"path": ...}}'
                )
            candidate = Path(next(iter(spec.submodule_search_locations))) / self.file
        if not candidate.is_file():
            raise ModelLoadError(f"model file not found: {self.describe()} (looked at {candidate})")
        return candidate


@dataclass(frozen=True)
class GenerationDefaults:
    """Sampling parameters an agent uses unless the request overrides them."""

    max_tokens: int = 256
    temperature: float = 0.7
    top_k: int = 40
    top_p: float = 0.95
    repetition_penalty: float = 1.1
    seed: int = -1  # -1: a fresh seed per request
    stop: tuple[str, ...] = ()


@dataclass(frozen=True)
class QuantVariant:
    name: str
    bits: int
    source: ModelSource


@dataclass(frozen=True)
class RoutingHints:
    """What a router matches requests against; patterns are Python regexes (ignore case)."""

    keywords: tuple[str, ...] = ()
    patterns: tuple[str, ...] = ()
    examples: tuple[str, ...] = ()
    priority: int = 0


@dataclass(frozen=True)
class AgentSpec:
    id: str
    role: str
    description: str
    capabilities: tuple[str, ...]
    model: ModelSource
    format: str
    model_type: str
    chat_template: ChatTemplate
    system_prompt: str
    context_length: int
    generation: GenerationDefaults
    quantization: tuple[QuantVariant, ...]
    ram_estimate_mb: float
    fallback: str | None
    routing: RoutingHints
    keep_alive_s: float | None = None  # None: the loader's default for the RAM tier
    parallel: int | None = None  # slots (model instances); None ("auto"): from cores and budget
    stall_s: float | None = None  # no token for this long: abandoned; None: from token times
    runtime: str = "ctransformers"  # | "llama_cpp" (the `llama-cpp` extra)
    # Circuit-breaker settings of its model instance (BreakerConfig field, value), as written;
    # empty: the engine's. Pairs, not a dict: an AgentSpec stays hashable.
    breaker: tuple[tuple[str, float], ...] = ()


@dataclass(frozen=True)
class VirtualMember:
    """One member of a virtual agent: the agent, and its region (role) in the answer."""

    agent: str
    role: str  # "solution" | "explanation": the region of the parallel state it runs in
    weight: float  # fixed weight, normalised over the members
    # Its part of the answer, told to its model (appended to the serving agent's system
    # prompt); None: it answers the request in full.
    instruction: str | None = None


@dataclass(frozen=True)
class VirtualSpec:
    """A virtual agent: its members answer in parallel; their answers are fused into one."""

    id: str
    description: str
    members: tuple[VirtualMember, ...]  # in role order: solution, then explanation
    strategy: str = "sections"  # sections | best
    weights: str = "fixed"  # fixed | router
    min_weight: float = 0.0
    early_stop: str = "first_confident"  # first_confident | leader_first | none
    # first_confident's values, calibrated for SmolLM2-135M on eval/virtual.jsonl (the
    # shipped code+logic is leader_first, calibrated by python -m bench --only virtual).
    threshold: float = 0.3875
    early_stop_max_tokens: int = 96
    leader: str = "solution"  # leader_first: the role whose member starts alone
    # leader_first: the followers join as soon as the leader opens a code block within its
    # first `code_within` tokens (a composite answer shows itself early); 0: never for this.
    code_within: int = 0
    fallback: str | None = None
    routing: RoutingHints = RoutingHints()


ROLES = ("solution", "explanation")  # the regions of machines/request.scxml, in answer order


@dataclass(frozen=True)
class Registry:
    """A validated registry; `agents` keeps the document's order."""

    agents: Mapping[str, AgentSpec]
    default_agent: str
    source: Path | None
    digest: str
    virtual: Mapping[str, VirtualSpec] = field(default_factory=lambda: MappingProxyType({}))

    def known(self, agent_id: str) -> bool:
        """An agent or a virtual agent of this registry."""
        return agent_id in self.agents or agent_id in self.virtual

    def known_ids(self) -> str:
        return ", ".join([*self.agents, *self.virtual])

    def context_length(self, agent_id: str) -> int:
        """The context an agent's prompt must fit (a virtual agent's: its smallest member's)."""
        spec = self.virtual.get(agent_id)
        if spec is None:
            return self.get(agent_id).context_length
        return min(self.get(m.agent).context_length for m in spec.members)

    def get(self, agent_id: str) -> AgentSpec:
        try:
            return self.agents[agent_id]
        except KeyError:
            known = ", ".join(self.agents)
            raise RegistryError(
                f"unknown agent {agent_id!r}; known agents: {known}", json_path="$.agents"
            ) from None

    def fallback_chain(self, agent_id: str) -> tuple[str, ...]:
        virtual = self.virtual.get(agent_id)
        if virtual is not None:
            # The virtual agent itself, then its own fallback's chain (no member served).
            after = () if virtual.fallback is None else self.fallback_chain(virtual.fallback)
            return (virtual.id, *after)
        chain = [self.get(agent_id).id]
        nxt = self.agents[agent_id].fallback
        # Loading rejects cycles; the membership test keeps hand-built registries from looping.
        while nxt is not None and nxt not in chain and nxt in self.agents:
            chain.append(nxt)
            nxt = self.agents[nxt].fallback
        return tuple(chain)

    @classmethod
    def load(cls, path: Path | str | None = None) -> Registry:
        """Read and validate a registry file; None loads the packaged default `models.json`."""
        file = data_file("models.json") if path is None else Path(path).expanduser()
        try:
            text = file.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise RegistryError(
                f"registry file {str(file)!r} does not exist; pass the path of a models.json "
                "with --registry or Engine(registry=...)"
            ) from None
        except (OSError, UnicodeDecodeError) as exc:
            raise RegistryError(
                f"cannot read registry file {str(file)!r} ({exc}); pass the path of a "
                "models.json with --registry or Engine(registry=...)"
            ) from exc
        try:
            doc = json.loads(text, parse_constant=NonFinite)
        except json.JSONDecodeError as exc:
            raise RegistryError(
                f"{file} is not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}"
            ) from None
        except RecursionError:
            raise RegistryError(
                f"{file} nests arrays or objects deeper than Python's parser can follow; "
                f"a registry needs at most {MAX_DEPTH} levels"
            ) from None
        return cls.from_dict(doc, source=file.resolve())

    @classmethod
    def from_dict(cls, doc: object, *, source: Path | None = None) -> Registry:
        """Validate a parsed document; relative model paths resolve against `source`'s folder."""
        doc = validate(doc)
        base = source.parent if source is not None else None
        agents = {raw["id"]: _agent(raw, base) for raw in doc["agents"]}
        virtual = {raw["id"]: _virtual(raw) for raw in doc.get("virtual_agents", ())}
        return cls(
            agents=MappingProxyType(agents),
            default_agent=doc["default_agent"],
            source=source,
            digest=_digest(doc),
            virtual=MappingProxyType(virtual),
        )


# --- parsing --------------------------------------------------------------------------------


def _source(raw: Mapping[str, Any], base: Path | None) -> ModelSource:
    if "path" in raw:
        path = Path(raw["path"]).expanduser()
        if base is not None and not path.is_absolute():
            path = base / path
        return ModelSource(path=path)
    return ModelSource(package=raw["package"], file=raw["file"])


def _agent(raw: Mapping[str, Any], base: Path | None) -> AgentSpec:
    template = raw["chat_template"]
    gen = dict(raw.get("generation", {}))
    if "stop" in gen:
        gen["stop"] = tuple(gen["stop"])
    for key in ("temperature", "top_p", "repetition_penalty"):
        if key in gen:
            gen[key] = float(gen[key])
    routing = raw.get("routing", {})
    return AgentSpec(
        id=raw["id"],
        role=raw["role"],
        description=raw["description"],
        capabilities=tuple(raw["capabilities"]),
        model=_source(raw["model"], base),
        format=raw["format"],
        model_type=raw.get("model_type", "llama"),
        chat_template=(
            CHAT_TEMPLATE_PRESETS[template]
            if isinstance(template, str)
            else ChatTemplate(**template)
        ),
        system_prompt=raw["system_prompt"],
        context_length=raw["context_length"],
        generation=GenerationDefaults(**gen),
        quantization=tuple(
            QuantVariant(name=q["name"], bits=q["bits"], source=_source(q["source"], base))
            for q in raw.get("quantization", ())
        ),
        ram_estimate_mb=float(raw["ram_estimate_mb"]),
        fallback=raw.get("fallback"),
        routing=RoutingHints(
            keywords=tuple(routing.get("keywords", ())),
            patterns=tuple(routing.get("patterns", ())),
            examples=tuple(routing.get("examples", ())),
            priority=routing.get("priority", 0),
        ),
        keep_alive_s=None if "keep_alive_s" not in raw else float(raw["keep_alive_s"]),
        parallel=None if raw.get("parallel", "auto") == "auto" else int(raw["parallel"]),
        stall_s=None if "stall_s" not in raw else float(raw["stall_s"]),
        runtime=raw.get("runtime", "ctransformers"),
        breaker=tuple((raw.get("breaker") or {}).items()),
    )


def _routing(raw: Mapping[str, Any]) -> RoutingHints:
    return RoutingHints(keywords=tuple(raw.get("keywords", ())),
                        patterns=tuple(raw.get("patterns", ())),
                        examples=tuple(raw.get("examples", ())),
                        priority=raw.get("priority", 0))


def _virtual(raw: Mapping[str, Any]) -> VirtualSpec:
    members = sorted(raw["members"], key=lambda m: ROLES.index(m["role"]))
    total = sum(float(m.get("weight", 0.5)) for m in members)
    fusion, stop = raw.get("fusion", {}), raw.get("early_stop", {})
    defaults = VirtualSpec(id="", description="", members=())
    return VirtualSpec(
        id=raw["id"],
        description=raw["description"],
        members=tuple(VirtualMember(m["agent"], m["role"], float(m.get("weight", 0.5)) / total,
                                    m.get("instruction"))
                      for m in members),
        strategy=fusion.get("strategy", defaults.strategy),
        weights=fusion.get("weights", defaults.weights),
        min_weight=float(fusion.get("min_weight", defaults.min_weight)),
        early_stop=stop.get("policy", defaults.early_stop),
        threshold=float(stop.get("threshold", defaults.threshold)),
        early_stop_max_tokens=int(stop.get("max_tokens", defaults.early_stop_max_tokens)),
        leader=stop.get("leader", defaults.leader),
        code_within=int(stop.get("code_within", defaults.code_within)),
        fallback=raw.get("fallback"),
        routing=_routing(raw.get("routing", {})),
    )


def _digest(doc: object) -> str:
    canonical = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()
