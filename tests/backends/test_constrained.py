"""The masked sampler on a tiny random-weight model: whatever small schema hypothesis draws,
at any temperature and seed, the output is complete, parses and validates; sampling keeps its
meaning (greedy is the best allowed token, a seed repeats its output)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orion_fsm._exceptions import GrammarError
from orion_fsm.backends import GenerationOutcome, LoadedModel, SamplingParams, compile_grammar
from orion_fsm.testing import make_tiny_llama_gguf


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LoadedModel]:
    path = make_tiny_llama_gguf(tmp_path_factory.mktemp("m") / "tiny.gguf", n_layers=2,
                                n_embd=32, seed=9)
    with LoadedModel.load(path, path.parent / "tokenizer.json", context_length=1024,
                          threads=1) as loaded:
        yield loaded


def generate(model: LoadedModel, params: SamplingParams) -> GenerationOutcome:
    prompt = model.tokenizer.encode("<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n")
    return model.generate(prompt, params, on_event=lambda _: None, should_stop=lambda: False)


_LEAVES = st.one_of(
    st.builds(lambda lo, span: {"type": "integer", "minimum": lo, "maximum": lo + span},
              st.integers(-50, 50), st.integers(0, 100)),
    st.builds(lambda n: {"type": "string", "maxLength": n}, st.integers(0, 6)),
    st.just({"type": "boolean"}),
    st.just({"type": "null"}),
    st.lists(st.text("abcxyz", min_size=1, max_size=4), min_size=1, max_size=3,
             unique=True).map(lambda xs: {"enum": xs}),
    st.builds(lambda p: {"type": "string", "pattern": p},
              st.sampled_from(["^[a-f]{2}$", "^[0-9]{1,3}-[A-Z]$", "^(yes|no)$"])),
)


def _containers(children: st.SearchStrategy[dict[str, Any]]) -> st.SearchStrategy[Any]:
    names = st.text("abcdefgh", min_size=1, max_size=4)
    objects = st.dictionaries(names, children, min_size=1, max_size=3).flatmap(
        lambda props: st.lists(st.sampled_from(sorted(props)), unique=True).map(
            lambda required: {"type": "object", "properties": props, "required": required,
                              "additionalProperties": False}))
    arrays = st.builds(lambda items, lo, extra: {"type": "array", "items": items,
                                                 "minItems": lo, "maxItems": lo + extra},
                       children, st.integers(0, 2), st.integers(0, 1))
    any_of = st.lists(children, min_size=2, max_size=2).map(lambda xs: {"anyOf": xs})
    return st.one_of(objects, arrays, any_of)


SCHEMAS = st.recursive(_LEAVES, _containers, max_leaves=6)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(schema=SCHEMAS, temperature=st.sampled_from([0.0, 0.7, 1.5]),
       seed=st.integers(0, 2**16), top_k=st.sampled_from([0, 1, 40]))
def test_any_small_schema_gives_complete_valid_json(model: LoadedModel, schema: dict[str, Any],
                                                    temperature: float, seed: int,
                                                    top_k: int) -> None:
    grammar = compile_grammar("json_schema", schema)
    outcome = generate(model, SamplingParams(max_tokens=600, temperature=temperature,
                                             top_k=top_k, seed=seed, grammar=grammar))
    assert outcome.mask is not None and outcome.mask.complete, outcome.text
    assert outcome.finish_reason == "stop"
    jsonschema.validate(json.loads(outcome.text), schema)


def test_a_seed_repeats_its_output_and_greedy_takes_the_best_allowed_token(
        model: LoadedModel) -> None:
    grammar = compile_grammar("regex", "[a-z]{12}")
    sampled = [generate(model, SamplingParams(max_tokens=20, temperature=1.2, seed=s,
                                              grammar=grammar)).text for s in (5, 5, 6)]
    assert sampled[0] == sampled[1] != sampled[2]
    anything = compile_grammar("regex", "[\\s\\S]{1,40}")
    for penalty in (1.0, 1.3):
        free = generate(model, SamplingParams(max_tokens=24, temperature=0,
                                              repetition_penalty=penalty))
        masked = generate(model, SamplingParams(max_tokens=24, temperature=0,
                                                repetition_penalty=penalty, grammar=anything))
        # A mask that allows everything changes nothing: ctransformers' own greedy tokens,
        # repetition penalty included.
        assert masked.token_ids == free.token_ids
        assert masked.mask is not None and masked.mask.forced == 0


@pytest.mark.parametrize(("kind", "source"), [
    ("json_schema", {"type": "strin"}), ("regex", "(unclosed"), ("lark", "start: nowhere"),
    ("xml", "<a/>"),
])
def test_a_grammar_that_does_not_compile_says_why(kind: str, source: Any) -> None:
    with pytest.raises(GrammarError) as refused:
        compile_grammar(kind, source)
    assert str(refused.value)


def test_a_compiled_grammar_is_named_by_its_digest() -> None:
    a = compile_grammar("regex", "[0-9]+")
    assert a == compile_grammar("regex", "[0-9]+") and len(a.digest) == 64
    assert a.digest != compile_grammar("regex", "[0-9]*").digest


def test_output_cut_off_by_max_tokens_is_reported_incomplete(model: LoadedModel) -> None:
    grammar = compile_grammar("regex", "[a-z]{30}")
    outcome = generate(model, SamplingParams(max_tokens=3, temperature=0, grammar=grammar))
    assert outcome.finish_reason == "length"
    assert outcome.mask is not None and not outcome.mask.complete
    assert len(outcome.mask.mask_ms) == outcome.mask.steps == 3


def test_the_backend_path_is_untouched_without_a_grammar(model: LoadedModel) -> None:
    outcome = generate(model, SamplingParams(max_tokens=5, temperature=0))
    assert outcome.mask is None


