"""The model registry: which agents exist, the model each runs, and how to prompt and route to it.

Parses and validates `models.json` (JSON Schema, then semantic checks) into frozen values.
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import importlib.util
import json
import math
import re
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from orion_fsm._exceptions import ModelLoadError, RegistryError
from orion_fsm._resources import data_file

if TYPE_CHECKING:
    # jsonschema is imported where a registry is validated: it costs ~35 ms, a third of
    # `import orion_fsm`, and a program that never loads a registry should not pay it.
    import jsonschema
    from jsonschema.exceptions import ValidationError as SchemaError

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
class ChatTemplate:
    """Format strings (with `{content}`) that turn (role, content) messages into a prompt."""

    system: str
    user: str
    assistant: str
    assistant_prefix: str

    @classmethod
    def preset(cls, name: str) -> ChatTemplate:
        try:
            return CHAT_TEMPLATE_PRESETS[name]
        except KeyError:
            known = ", ".join(CHAT_TEMPLATE_PRESETS)
            raise KeyError(f"unknown chat template preset {name!r}; known: {known}") from None

    def render(
        self, messages: Sequence[tuple[str, str]], *, add_generation_prompt: bool = True
    ) -> str:
        formats = {"system": self.system, "user": self.user, "assistant": self.assistant}
        parts: list[str] = []
        for role, content in messages:
            try:
                fmt = formats[role]
            except KeyError:
                raise ValueError(
                    f"unknown message role {role!r}; expected system, user or assistant"
                ) from None
            parts.append(substitute(fmt, content))
        if add_generation_prompt:
            parts.append(self.assistant_prefix)
        return "".join(parts)


def template_fields(fmt: str) -> list[str]:
    """Every replacement field of a template, written back as it appears (`{content:>9}`).

    Only a bare `{content}` may be substituted: a format spec (`{content:>100000000}`), a
    conversion (`{content!r}`) or an attribute (`{content.__class__}`) gives a template the
    power to allocate or to reach into objects, which a registry file must not have.
    """
    fields = []
    for _, name, spec, conversion in string.Formatter().parse(fmt):
        if name is not None and (name != "content" or spec or conversion):
            shown = name + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "")
            fields.append("{" + shown + "}")
    return fields


def substitute(fmt: str, content: str) -> str:
    """`fmt` with each `{content}` replaced and `{{`/`}}` unescaped: str.format without its
    mini-language, so that no template can do more than paste the content in."""
    parts: list[str] = []
    for literal, name, spec, conversion in string.Formatter().parse(fmt):
        parts.append(literal)
        if name is None:
            continue
        if name != "content" or spec or conversion:
            raise ValueError(f"template field {{{name}}} is not {{content}}")
        parts.append(content)
    return "".join(parts)


CHAT_TEMPLATE_PRESETS: Mapping[str, ChatTemplate] = MappingProxyType(
    {
        "chatml": ChatTemplate(
            system="<|im_start|>system\n{content}<|im_end|>\n",
            user="<|im_start|>user\n{content}<|im_end|>\n",
            assistant="<|im_start|>assistant\n{content}<|im_end|>\n",
            assistant_prefix="<|im_start|>assistant\n",
        ),
        "zephyr": ChatTemplate(
            system="<|system|>\n{content}</s>\n",
            user="<|user|>\n{content}</s>\n",
            assistant="<|assistant|>\n{content}</s>\n",
            assistant_prefix="<|assistant|>\n",
        ),
        "llama3": ChatTemplate(
            system="<|start_header_id|>system<|end_header_id|>\n\n{content}<|eot_id|>",
            user="<|start_header_id|>user<|end_header_id|>\n\n{content}<|eot_id|>",
            assistant="<|start_header_id|>assistant<|end_header_id|>\n\n{content}<|eot_id|>",
            assistant_prefix="<|start_header_id|>assistant<|end_header_id|>\n\n",
        ),
    }
)


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
            doc = json.loads(text, parse_constant=_NonFinite)
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
        from jsonschema.exceptions import best_match  # see TYPE_CHECKING above

        _check_plain_data(doc)
        error = best_match(_validator().iter_errors(doc))
        if error is not None:
            path, message = _describe_schema_error(error)
            raise RegistryError(message, json_path=path)
        assert isinstance(doc, dict)  # the schema guarantees it; this tells the type checker
        _check_semantics(doc)
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
        members=tuple(VirtualMember(m["agent"], m["role"], float(m.get("weight", 0.5)) / total)
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


def nested_repeat(pattern: str) -> bool:
    """Whether `pattern` repeats without bound something that itself repeats without bound
    (`(a+)+`, `(\\w+\\s?)*`): the shape that backtracks exponentially."""
    # The parser `re` compiles with (no stubs; its shape is stable since 3.11).
    parser: Any = importlib.import_module("re._parser")

    repeats = {parser.MAX_REPEAT, parser.MIN_REPEAT, parser.POSSESSIVE_REPEAT}

    def walk(items: Any, inside: bool) -> bool:
        for op, arg in items:
            if op in repeats:
                _, high, sub = arg
                unbounded = high == parser.MAXREPEAT
                if (unbounded and inside and op is not parser.POSSESSIVE_REPEAT) \
                        or walk(sub, inside or unbounded):
                    return True
                continue
            if op is parser.SUBPATTERN:
                children = [arg[-1]]
            elif op is parser.BRANCH:
                children = list(arg[1])
            elif op in (parser.ASSERT, parser.ASSERT_NOT):
                children = [arg[1]]
            else:
                continue
            if any(walk(child, inside) for child in children):
                return True
        return False

    return walk(parser.parse(pattern), False)


def _digest(doc: object) -> str:
    canonical = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


# --- validation -----------------------------------------------------------------------------


@functools.cache
def _schema_document() -> dict[str, Any]:
    schema: dict[str, Any] = json.loads(data_file("models.schema.json").read_text(encoding="utf-8"))
    return schema


@functools.cache
def _schema() -> dict[str, Any]:
    import jsonschema  # see TYPE_CHECKING above

    schema = _schema_document()
    jsonschema.Draft202012Validator.check_schema(schema)
    return schema


@functools.cache
def generation_bounds() -> Mapping[str, tuple[float, float]]:
    """Inclusive `(low, high)` of each numeric generation parameter, read from the schema.

    models.schema.json is the one home of these bounds: a request's parameters and an agent's
    defaults are held to the same numbers. An exclusive bound becomes the nearest value inside
    it (the next float, or the next integer), so `low <= value <= high` is the whole test.
    Built on first use, without jsonschema: reading the schema is all it needs.
    """
    properties = _schema_document()["$defs"]["generation"]["properties"]
    bounds: dict[str, tuple[float, float]] = {}
    for name, spec in properties.items():
        if spec.get("type") not in ("integer", "number"):
            continue
        integral = spec["type"] == "integer"
        low = spec.get("minimum", -math.inf)
        if "exclusiveMinimum" in spec:
            low = _inside(spec["exclusiveMinimum"], up=True, integral=integral)
        high = spec.get("maximum", math.inf)
        if "exclusiveMaximum" in spec:
            high = _inside(spec["exclusiveMaximum"], up=False, integral=integral)
        bounds[name] = (low, high)
    return MappingProxyType(bounds)


def _inside(bound: float, *, up: bool, integral: bool) -> float:
    """The nearest value strictly beyond an exclusive `bound`, upwards or downwards."""
    if integral:
        return bound + 1 if up else bound - 1
    return math.nextafter(bound, math.inf if up else -math.inf)


@functools.cache
def _validator() -> jsonschema.Draft202012Validator:
    import jsonschema  # see TYPE_CHECKING above

    return jsonschema.Draft202012Validator(_schema())


_IDENTIFIER = re.compile(r"^[A-Za-z_$][A-Za-z0-9_$]*$")


def _json_path(parts: Sequence[str | int]) -> str:
    out = "$"
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        elif _IDENTIFIER.match(part):
            out += f".{part}"
        else:
            out += f"[{json.dumps(part)}]"
    return out


def _show(value: object) -> str:
    text = repr(value) if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 60 else text[:57] + "..."


_TYPE_NAMES = {
    "integer": "an integer",
    "number": "a number",
    "string": "a string",
    "boolean": "true or false",
    "array": "an array",
    "object": "an object",
    "null": "null",
}


def _expected(schema: object) -> str:
    """Say in words what a (sub)schema accepts, e.g. 'an integer ≥ 64'."""
    if not isinstance(schema, Mapping):
        return "nothing (this field is not allowed here)"
    if "title" in schema:
        return str(schema["title"])
    if "$ref" in schema:
        return _expected(_schema()["$defs"][schema["$ref"].rsplit("/", 1)[-1]])
    if "const" in schema:
        return _show(schema["const"])
    if "enum" in schema:
        return "one of " + ", ".join(_show(v) for v in schema["enum"])
    for key in ("oneOf", "anyOf"):
        if key in schema:
            return " or ".join(_expected(s) for s in schema[key])
    types = schema.get("type", [])
    types = [types] if isinstance(types, str) else types
    words = " or ".join(_TYPE_NAMES.get(t, t) for t in types) or "a value"
    if schema.get("minLength") == 1:
        words = "a non-empty string"
    bounds = [
        f"{sym} {schema[key]}"
        for key, sym in (
            ("minimum", "≥"),
            ("exclusiveMinimum", ">"),
            ("maximum", "≤"),
            ("exclusiveMaximum", "<"),
        )
        if key in schema
    ]
    if bounds:
        words += " " + " and ".join(bounds)
    if "pattern" in schema:
        words += f" matching {schema['pattern']}"
    if schema.get("uniqueItems"):
        words += " without duplicates"
    return words


def _describe_schema_error(error: SchemaError) -> tuple[str, str]:
    """Turn the most relevant schema error into (JSON path, what was expected)."""
    parts = list(error.absolute_path)
    instance = error.instance
    schema = error.schema if isinstance(error.schema, Mapping) else {}
    if error.validator == "required" and isinstance(instance, Mapping):
        required: list[str] = list(error.validator_value)  # type: ignore[arg-type]
        missing = next(k for k in required if k not in instance)
        field = schema.get("properties", {}).get(missing, {})
        return _json_path([*parts, missing]), (
            f"missing required field {missing!r} (expected {_expected(field)})"
        )
    if error.validator == "additionalProperties" and isinstance(instance, Mapping):
        allowed = list(schema.get("properties", {}))
        extra = next(k for k in instance if k not in allowed)
        hint = difflib.get_close_matches(extra, allowed, n=1)
        suggestion = f"did you mean {hint[0]!r}? " if hint else ""
        return _json_path([*parts, extra]), (
            f"unknown field {extra!r}; {suggestion}allowed fields: {', '.join(allowed)}"
        )
    if error.validator in ("oneOf", "anyOf") and isinstance(instance, Mapping) and error.context:
        branch = _closest_branch(error)
        if branch is not None:
            return _describe_schema_error(branch)
    if error.validator == "minItems":
        return _json_path(parts), (
            f"expected at least {error.validator_value} item(s), got {_show(instance)}"
        )
    if error.validator in ("maxItems", "uniqueItems"):
        return _json_path(parts), error.message
    return _json_path(parts), f"expected {_expected(error.schema)}, got {_show(instance)}"


def _closest_branch(error: SchemaError) -> SchemaError | None:
    """For an object matching no alternative, pick the alternative sharing the most field names.

    `{"package": "x"}` is then reported as missing `file`, not as "not a model source"; a tie
    (fields of two alternatives mixed) keeps the general message.
    """
    keys = set(error.instance)  # type: ignore[arg-type]
    alternatives: list[object] = list(error.validator_value)  # type: ignore[arg-type]
    scored: dict[int, int] = {}
    for branch, sub in enumerate(alternatives):
        if isinstance(sub, Mapping) and sub.get("type") == "object":
            scored[branch] = len(keys & set(sub.get("properties", {})))
    ranked = sorted(scored.items(), key=lambda item: -item[1])
    if not ranked or ranked[0][1] == 0 or (len(ranked) > 1 and ranked[1][1] == ranked[0][1]):
        return None
    branch_errors = [e for e in error.context if e.relative_schema_path[0] == ranked[0][0]]
    from jsonschema.exceptions import best_match  # see TYPE_CHECKING above

    chosen: SchemaError | None = best_match(branch_errors)
    return chosen


MAX_DEPTH = 32  # the schema's deepest path is 5 levels; anything far deeper is not a registry


class _NonFinite(str):
    """What `NaN`, `Infinity` and `-Infinity` parse to, so that they are reported by path."""


def _check_plain_data(doc: object) -> None:
    """Refuse non-finite numbers and absurd nesting before the schema walks the document.

    Walked with an explicit stack: jsonschema recurses, and a 100,000-deep document would end
    in RecursionError; NaN compares false with every bound, so a schema lets it through.
    """
    stack: list[tuple[object, tuple[str | int, ...]]] = [(doc, ())]
    while stack:
        value, parts = stack.pop()
        if len(parts) > MAX_DEPTH:
            raise RegistryError(
                f"nested deeper than {MAX_DEPTH} levels; a registry is a shallow document",
                json_path=_json_path(parts[:MAX_DEPTH]),
            )
        if isinstance(value, _NonFinite) or (isinstance(value, float) and not math.isfinite(value)):
            raise RegistryError(
                f"{value} is not a number JSON allows; write a finite number",
                json_path=_json_path(parts),
            )
        if isinstance(value, Mapping):
            stack.extend((v, (*parts, str(k))) for k, v in value.items())
        elif isinstance(value, list | tuple):
            stack.extend((v, (*parts, i)) for i, v in enumerate(value))


def _check_semantics(doc: Mapping[str, Any]) -> None:
    """Rules JSON Schema cannot express; each error names the JSON path to fix."""
    agents: Sequence[Mapping[str, Any]] = doc["agents"]
    index: dict[str, int] = {}
    for i, agent in enumerate(agents):
        if agent["id"] in index:
            raise RegistryError(
                f"duplicate agent id {agent['id']!r} (already defined at "
                f"$.agents[{index[agent['id']]}]); agent ids must be unique",
                json_path=f"$.agents[{i}].id",
            )
        index[agent["id"]] = i
    known = ", ".join(index)

    if doc["default_agent"] not in index:
        raise RegistryError(
            f"default_agent {doc['default_agent']!r} is not an agent; known agents: {known}",
            json_path="$.default_agent",
        )

    for i, agent in enumerate(agents):
        fallback = agent.get("fallback")
        if fallback is not None and fallback not in index:
            raise RegistryError(
                f"fallback {fallback!r} is not an agent; known agents: {known}, or null",
                json_path=f"$.agents[{i}].fallback",
            )

    # A cycle is reported at its first member in document order, never at an agent that
    # merely leads into it (a self-fallback on agents[1] is agents[1]'s error).
    for i, agent in enumerate(agents):
        chain = [agent["id"]]
        nxt = agent.get("fallback")
        while nxt is not None:
            if nxt in chain and nxt != agent["id"]:
                break
            if nxt in chain:
                cycle = " -> ".join([*chain, nxt])
                raise RegistryError(
                    f"fallback cycle {cycle}; end the chain with a null fallback",
                    json_path=f"$.agents[{i}].fallback",
                )
            chain.append(nxt)
            nxt = agents[index[nxt]].get("fallback")

    for i, agent in enumerate(agents):
        _check_agent(agent, f"$.agents[{i}]")
    _check_virtual(doc.get("virtual_agents", ()), index)


def _check_virtual(virtual: Sequence[Mapping[str, Any]], index: Mapping[str, int]) -> None:
    known = ", ".join(index)
    seen: set[str] = set()
    for i, spec in enumerate(virtual):
        at = f"$.virtual_agents[{i}]"
        if spec["id"] in index or spec["id"] in seen:
            raise RegistryError(f"duplicate agent id {spec['id']!r}; agent and virtual agent "
                                "ids must be unique", json_path=f"{at}.id")
        seen.add(spec["id"])
        roles = [m["role"] for m in spec["members"]]
        if len(set(roles)) != len(roles):
            raise RegistryError(f"members share the role {roles[0]!r}; give one member the "
                                "role solution and the other explanation",
                                json_path=f"{at}.members")
        for k, member in enumerate(spec["members"]):
            if member["agent"] not in index:
                raise RegistryError(f"member {member['agent']!r} is not an agent; known "
                                    f"agents: {known}", json_path=f"{at}.members[{k}].agent")
        fallback = spec.get("fallback")
        if fallback is not None and fallback not in index:
            raise RegistryError(f"fallback {fallback!r} is not an agent; known agents: "
                                f"{known}, or null", json_path=f"{at}.fallback")
        _check_agent({"chat_template": "chatml", **spec}, at)  # its routing patterns


def _check_agent(agent: Mapping[str, Any], at: str) -> None:
    template = agent["chat_template"]
    if isinstance(template, str):
        if template not in CHAT_TEMPLATE_PRESETS:
            raise RegistryError(
                f"unknown chat template preset {template!r}; known presets: "
                f"{', '.join(CHAT_TEMPLATE_PRESETS)}, or an object with system, user, "
                "assistant and assistant_prefix",
                json_path=f"{at}.chat_template",
            )
    else:
        for key in ("system", "user", "assistant"):
            try:
                fields = template_fields(template[key])
            except ValueError as exc:
                raise RegistryError(
                    f"invalid template ({exc}); only {{content}} may be substituted, "
                    "write literal braces as {{ and }}",
                    json_path=f"{at}.chat_template.{key}",
                ) from None
            if fields:
                raise RegistryError(
                    f"template field {fields[0]} is not allowed; only a bare {{content}} may be "
                    "substituted (no format spec, conversion or attribute), write literal "
                    "braces as {{ and }}",
                    json_path=f"{at}.chat_template.{key}",
                )

    for k, pattern in enumerate(agent.get("routing", {}).get("patterns", ())):
        try:
            re.compile(pattern)
        except re.error as exc:
            raise RegistryError(
                f"invalid regular expression {pattern!r}: {exc}",
                json_path=f"{at}.routing.patterns[{k}]",
            ) from None
        if nested_repeat(pattern):
            raise RegistryError(
                f"regular expression {pattern!r} nests an unbounded repetition inside another "
                "(as in (a+)+): it can take exponential time on a hostile prompt; bound the "
                "inner one (e.g. {1,20}) or remove the outer one",
                json_path=f"{at}.routing.patterns[{k}]",
            )

    seen: set[str] = set()
    for k, variant in enumerate(agent.get("quantization", ())):
        if variant["name"] in seen:
            raise RegistryError(
                f"duplicate quantization variant {variant['name']!r}",
                json_path=f"{at}.quantization[{k}].name",
            )
        seen.add(variant["name"])

    max_tokens = agent.get("generation", {}).get("max_tokens")
    if max_tokens is not None and max_tokens >= agent["context_length"]:
        raise RegistryError(
            f"max_tokens {max_tokens} leaves no room for the prompt in a context of "
            f"{agent['context_length']} tokens; lower it or raise context_length",
            json_path=f"{at}.generation.max_tokens",
        )
