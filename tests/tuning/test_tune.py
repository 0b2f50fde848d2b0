"""`orion-fsm models tune` end to end on a tiny llama (GGUF as llama.cpp writes it): the
held-out loss falls, the merged GGUF loads in ctransformers, the registered variant answers
through the Engine; bad input is one line and leaves nothing half-written."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from orion_fsm import Engine, Registry, TuneConfig, TuningError, tune_agent
from orion_fsm.cli import main
from orion_fsm.testing import make_tiny_llama_gguf
from tests.conftest import agent

TARGET = "OK."


@dataclass(frozen=True)
class Tuned:
    root: Path
    registry: Path
    cache: Path
    data: Path
    report: dict[str, Any]
    registry_bytes: bytes  # the base registry's file before the tune


def _write_data(path: Path, count: int, target: str = TARGET) -> Path:
    path.write_text("".join(json.dumps({"input": f"please answer {i}", "target": target,
                                        "system": "Answer in one word."}) + "\n"
                            for i in range(count)), encoding="utf-8")
    return path


def _tune_args(t: Tuned | Path, *extra: str) -> list[str]:
    root = t.root if isinstance(t, Tuned) else t
    return ["--registry", str(root / "models.json"), "--cache-dir", str(root / "cache"),
            "models", "tune", "conversation", "--lr", "0.01", "--epochs", "4",
            "--min-examples", "10", "--layers", "0", *extra]


@pytest.fixture(scope="module")
def tuned(tmp_path_factory: pytest.TempPathFactory) -> Tuned:
    """One tune through the CLI, shared by the tests that look at what it made."""
    root = tmp_path_factory.mktemp("tune")
    model = make_tiny_llama_gguf(root / "model" / "tiny.gguf", n_layers=2, n_embd=64, seed=4,
                                 llama_cpp_layout=True)
    doc = {"version": 1, "default_agent": "conversation", "agents": [
        agent("conversation", model, generation={"max_tokens": 8, "temperature": 0,
                                                  "top_k": 1, "stop": ["<|im_end|>"]}),
        agent("other", "model/tiny.gguf", fallback="conversation"),  # a relative path
    ]}
    registry = root / "models.json"
    registry.write_text(json.dumps(doc), encoding="utf-8")
    data = _write_data(root / "train.jsonl", 60)
    before = registry.read_bytes()
    out = root / "report.txt"
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()) as printed:
        assert main(_tune_args(root, "--data", str(data), "--json")) == 0
    out.write_text(printed.getvalue())
    return Tuned(root, registry, root / "cache", data, json.loads(printed.getvalue()), before)


def test_the_held_out_loss_falls_and_the_answer_check_improves(tuned: Tuned) -> None:
    report = tuned.report
    losses = report["held_out_loss"]
    assert len(losses) == report["epochs_run"] + 1
    assert min(losses[1:]) < losses[0] / 2
    assert report["best_epoch"] >= 1
    assert report["accuracy_before"] == 0.0 and report["accuracy_after"] > 0.5
    assert report["train_examples"] == 48 and report["held_out_examples"] == 12


def test_each_training_step_took_the_cores_the_machine_left_free(tuned: Tuned) -> None:
    from orion_fsm.services.models._cpu import usable_cores

    # No --threads: torch's threads follow the core pool's capacity, step by step.
    by_threads = {int(k): v for k, v in tuned.report["steps_by_threads"].items()}
    assert sum(by_threads.values()) == tuned.report["epochs_run"] * 6  # 48 examples, batch 8
    assert set(by_threads) <= set(range(1, usable_cores() + 1))


def test_the_variant_is_registered_beside_the_cache_and_the_base_registry_is_untouched(
        tuned: Tuned) -> None:
    assert tuned.registry.read_bytes() == tuned.registry_bytes
    user = Registry.load(tuned.cache / "models.user.json")
    variant = user.get(tuned.report["variant"])
    assert variant.id.startswith("conversation-tuned-")
    assert variant.fallback == "conversation" and variant.routing.keywords == ()
    assert variant.model.path == Path(tuned.report["model_path"])
    assert variant.model.path.parent.parent == tuned.cache / "tuned"
    assert (variant.model.path.parent / "tokenizer.json").is_file()
    assert json.loads((variant.model.path.parent / "report.json").read_text()) == tuned.report
    # A relative path of the base registry still names the same file from the copy.
    assert user.get("other").model.locate() == (tuned.root / "model" / "tiny.gguf")
    assert not [p for p in (tuned.cache / "tuned").iterdir() if p.name.startswith(".")]


def test_only_the_tuned_projections_change_in_the_written_gguf(tuned: Tuned) -> None:
    import gguf
    import numpy as np

    from orion_fsm import ModelCache

    base = ModelCache(tuned.cache).runtime_file(tuned.root / "model" / "tiny.gguf")
    assert base is not None
    old = {t.name: t for t in gguf.GGUFReader(base).tensors}
    new = {t.name: t for t in gguf.GGUFReader(tuned.report["model_path"]).tensors}
    assert old.keys() == new.keys()
    changed = {n for n in old if not np.array_equal(old[n].data, new[n].data)}
    assert changed and all(n.split(".")[2] in ("attn_v", "attn_output", "ffn_gate", "ffn_up",
                                                "ffn_down") for n in changed)


def test_the_tuned_weights_are_the_ones_transformers_trained(tuned: Tuned) -> None:
    """The GGUF names the merge writes to are the tensors transformers read: the base
    model's v_proj as transformers loads it equals the runtime file's blk.0.attn_v."""
    import gguf
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    from orion_fsm import ModelCache

    model = AutoModelForCausalLM.from_pretrained(str(tuned.root / "model"),
                                                 gguf_file="tiny.gguf", dtype=torch.float32)
    base = ModelCache(tuned.cache).runtime_file(tuned.root / "model" / "tiny.gguf")
    tensors = {t.name: t for t in gguf.GGUFReader(base).tensors}  # type: ignore[arg-type]
    for i in range(2):
        for hf, name in (("self_attn.v_proj", "attn_v"), ("mlp.down_proj", "ffn_down")):
            weight = model.get_submodule(f"model.layers.{i}.{hf}").weight.detach().numpy()
            assert np.array_equal(weight, tensors[f"blk.{i}.{name}.weight"].data)


@pytest.mark.anyio
async def test_the_variant_answers_through_the_engine(tuned: Tuned) -> None:
    registry = Registry.load(tuned.cache / "models.user.json")
    async with Engine(registry=registry, cache_dir=tuned.cache, trace_path=False,
                      embeddings=False, threads=1, feedback=False) as engine:
        tuned_answer = await engine.infer("please answer 999", agent=tuned.report["variant"],
                                          system="Answer in one word.")
        base_answer = await engine.infer("please answer 999", agent="conversation",
                                         system="Answer in one word.")
    assert tuned_answer.text.strip() == TARGET
    assert base_answer.text.strip() != TARGET


@pytest.mark.parametrize(("case", "message"), [
    ("unknown agent", "unknown agent 'nobody'"),
    ("missing file", "does not exist"),
    ("empty file", "holds no examples"),
    ("not json", "line 2: not JSON"),
    ("no target", "line 1: 'target' must be non-empty text"),
    ("too few", "holds 5 examples; at least 10 are needed"),
    ("bad lr", "lr must be between 0 and 1"),
])
def test_bad_input_is_one_line_and_writes_nothing(
        tmp_path: Path, case: str, message: str, capsys: pytest.CaptureFixture[str]) -> None:
    model = make_tiny_llama_gguf(tmp_path / "model" / "tiny.gguf", llama_cpp_layout=True)
    doc = {"version": 1, "default_agent": "conversation",
           "agents": [agent("conversation", model)]}
    (tmp_path / "models.json").write_text(json.dumps(doc))
    data = tmp_path / "train.jsonl"
    args = _tune_args(tmp_path, "--data", str(data))
    if case == "unknown agent":
        _write_data(data, 20)
        args[args.index("conversation")] = "nobody"
    elif case == "empty file":
        data.write_text("\n\n")
    elif case == "not json":
        data.write_text('{"input": "a", "target": "b"}\n{"input": \n')
    elif case == "no target":
        data.write_text('{"input": "a", "target": ""}\n')
    elif case == "too few":
        _write_data(data, 5)
    elif case == "bad lr":
        _write_data(data, 20)
        args[args.index("--lr") + 1] = "3"
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "cache" / "tuned").exists()
    assert not (tmp_path / "cache" / "models.user.json").exists()


def test_tune_agent_raises_tuning_error_for_a_model_transformers_cannot_read(
        tmp_path: Path) -> None:
    # A GGUF v2 with raw-byte tokens (what ctransformers loads, not what llama.cpp writes).
    model = make_tiny_llama_gguf(tmp_path / "model" / "tiny.gguf")
    registry = Registry.from_dict({"version": 1, "default_agent": "conversation",
                                   "agents": [agent("conversation", model)]})
    with pytest.raises(TuningError, match="transformers cannot read") as caught:
        tune_agent(registry, "conversation", _write_data(tmp_path / "d.jsonl", 12),
                   cache_dir=tmp_path / "cache", registry_out=tmp_path / "user.json",
                   config=TuneConfig(min_examples=10, epochs=1))
    assert "\n" not in str(caught.value)
    assert not (tmp_path / "user.json").exists()


def test_a_failed_write_leaves_no_model_and_no_registry(
        tuned: Tuned, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from orion_fsm.tuning import _lora

    real: Callable[..., None] = _lora.write_gguf_copy

    def fail_halfway(source: Path, target: Path, replace: dict[str, Any], **kw: Any) -> None:
        real(source, target, replace, **kw)
        with target.open("r+b") as f:
            f.truncate(target.stat().st_size // 2)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(_lora, "write_gguf_copy", fail_halfway)
    registry_out = tmp_path / "user.json"
    before = sorted(p.name for p in (tuned.cache / "tuned").iterdir())
    with pytest.raises(OSError, match="No space left"):
        tune_agent(Registry.load(tuned.registry), "conversation", tuned.data,
                   cache_dir=tuned.cache, registry_out=registry_out,
                   config=TuneConfig(min_examples=10, epochs=1, lr=0.01, layers=None,
                                     seed=7))
    assert sorted(p.name for p in (tuned.cache / "tuned").iterdir()) == before
    assert not registry_out.exists()


def test_the_cli_summary_names_the_variant_and_how_to_use_it(
        tuned: Tuned, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "mine.json"
    assert main(_tune_args(tuned, "--data", str(tuned.data), "--epochs", "1",
                           "--output", str(out))) == 0
    first, model, registry = capsys.readouterr().out.splitlines()
    variant = first.split(":")[0]
    assert variant.startswith("conversation-tuned-") and "held-out accuracy 0% -> " in first
    assert model.startswith(f"model: {tuned.cache / 'tuned'}")
    assert registry.endswith(f"--registry {out} run --agent {variant} PROMPT")
    assert variant in Registry.load(out).agents


@pytest.mark.parametrize("first", [0, 2])
def test_the_trained_loss_is_the_models_own_loss_on_the_target_tokens(
        tmp_path: Path, first: int) -> None:
    """The tune runs the frozen blocks below `first` once per example and the output head on
    the target positions only: the loss it trains is still the one transformers computes."""
    import torch
    from transformers import AutoModelForCausalLM

    from orion_fsm.tuning._lora import _Encoded, _loss, _states_below

    make_tiny_llama_gguf(tmp_path / "tiny.gguf", n_layers=4, n_embd=64, seed=3,
                         llama_cpp_layout=True)
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="tiny.gguf",
                                                 dtype=torch.float32)
    batch = [_Encoded([5, 9, 14, 3], [7, 8], "a"), _Encoded([4, 6], [11, 12, 13], "b"),
             _Encoded([2, 3, 4, 5, 6, 7], [9], "c")]
    width = max(e.length for e in batch)
    ids = torch.tensor([e.prompt + e.target + [0] * (width - e.length) for e in batch])
    mask = torch.tensor([[1] * e.length + [0] * (width - e.length) for e in batch])
    labels = torch.tensor([[-100] * len(e.prompt) + e.target + [-100] * (width - e.length)
                           for e in batch])
    with torch.no_grad():
        direct = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        states = _states_below(torch, model, batch, first, size=2)
        ours = _loss(torch, model, batch, states, first)
    assert [len(s) for s in states] == [e.length for e in batch]
    assert float(ours) == pytest.approx(float(direct), rel=1e-5)
    assert len(model.model.layers) == 4  # the blocks are put back
