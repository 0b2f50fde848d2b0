"""LoRA fine-tuning of an agent on CPU: its GGUF dequantized by transformers, PEFT adapters on
the last blocks, a held-out split with early stopping, the answer check before and after, and
the adapters merged into the weights and written back as a GGUF the runtime loads.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final

from orion_fsm._exceptions import ConfigurationError, TuningError
from orion_fsm.backends._convert import ensure_converted, write_gguf_copy
from orion_fsm.backends._tokenizer import Tokenizer
from orion_fsm.services.feedback._store import TrainingExample
from orion_fsm.services.models._registry import AgentSpec, Registry

from ._data import answer_matches, load_examples, split_examples
from ._variant import REPORT_FILENAME, register_variant, store_model, variant_id

__all__ = ["TuneConfig", "TuneReport", "tune_agent"]

ProgressCallback = Callable[[str, int, int], None]
# Projections whose GGUF tensors are stored as transformers holds them. attn_q/attn_k are
# permuted by llama.cpp's converter (transformers undoes it on load): left out, so a merged
# weight is written back without redoing the permutation.
_TARGETS: Final = {"v_proj": ("self_attn", "attn_v"), "o_proj": ("self_attn", "attn_output"),
                   "gate_proj": ("mlp", "ffn_gate"), "up_proj": ("mlp", "ffn_up"),
                   "down_proj": ("mlp", "ffn_down")}
_IGNORE: Final = -100  # label of a token the loss skips (the prompt's)


@dataclass(frozen=True, slots=True)
class TuneConfig:
    """How to tune. Epochs, lr and batch start from the seed's (3, 2e-5, 8); LoRA usually wants
    a larger lr (1e-4 to 1e-3) on a few hundred examples."""

    epochs: int = 3
    lr: float = 2e-5
    batch: int = 8
    rank: int = 8
    alpha: float | None = None  # None: 2 x rank
    held_out: float = 0.2  # share of the examples kept aside for the loss and the check
    patience: int = 1  # epochs without a better held-out loss before stopping
    min_examples: int = 50  # the seed's "at least 50 feedbacks before retraining"
    layers: int | None = 10  # LoRA on the last N blocks (backward stops there); None: all
    max_tokens: int = 512  # an example longer than this (prompt + target) is left out
    answer_tokens: int = 48  # generated per held-out example by the answer check
    threads: int = 1  # torch's threads: the cores are shared with serving
    seed: int = 0

    def __post_init__(self) -> None:
        checks = (("epochs", self.epochs >= 1, "at least 1"),
                  ("lr", 0 < self.lr < 1, "between 0 and 1"),
                  ("batch", self.batch >= 1, "at least 1"),
                  ("rank", self.rank >= 1, "at least 1"),
                  ("held_out", 0 < self.held_out < 1, "between 0 and 1"),
                  ("patience", self.patience >= 1, "at least 1"),
                  ("min_examples", self.min_examples >= 2, "at least 2"),
                  ("layers", self.layers is None or self.layers >= 1, "at least 1 or None"),
                  ("max_tokens", self.max_tokens >= 8, "at least 8"),
                  ("answer_tokens", self.answer_tokens >= 1, "at least 1"),
                  ("threads", self.threads >= 1, "at least 1"))
        for name, ok, expected in checks:
            if not ok:
                raise ConfigurationError(name, getattr(self, name), expected)


@dataclass(frozen=True, slots=True)
class TuneReport:
    """What a tune did and measured; also written as report.json beside the model."""

    agent: str
    variant: str
    model_path: str
    registry_path: str
    train_examples: int
    held_out_examples: int
    skipped_examples: int  # longer than max_tokens
    epochs_run: int
    stopped_early: bool
    train_loss: tuple[float, ...]  # mean per epoch
    held_out_loss: tuple[float, ...]  # before training, then after each epoch
    best_epoch: int  # whose adapters were merged (0: none helped, the base weights)
    accuracy_before: float  # held-out answers passing the check, base model
    accuracy_after: float
    seconds: dict[str, float]  # load, train, check, write, total
    config: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["train_loss"], doc["held_out_loss"] = list(self.train_loss), list(self.held_out_loss)
        return doc


@dataclass(frozen=True, slots=True)
class _Encoded:
    prompt: list[int]
    target: list[int]
    answer: str  # the target text the check compares with


def tune_agent(registry: Registry, agent_id: str, data: Path, *, cache_dir: Path,
               registry_out: Path, config: TuneConfig | None = None,
               progress: ProgressCallback | None = None) -> TuneReport:
    """Fine-tune `agent_id` on the JSONL `data`, write the merged model into the cache and
    register it as a variant agent in `registry_out`. Blocking and CPU-bound (minutes on
    SmolLM2): run it from a worker thread in async code. TuningError on bad input."""
    config = config or TuneConfig()
    started = time.monotonic()
    spec = registry.get(agent_id)
    examples = load_examples(Path(data))
    if len(examples) < config.min_examples:
        raise TuningError(f"{data} holds {len(examples)} examples; at least "
                          f"{config.min_examples} are needed (rate more answers, or lower "
                          "--min-examples)")
    torch, transformers, peft = _libraries()
    source = spec.model.locate()
    converted = ensure_converted(source, cache_dir, progress=progress)
    tokenizer = Tokenizer.from_file(converted.tokenizer_path)
    encoded = [_encode(spec, tokenizer, e) for e in examples]
    kept = [e for e in encoded if len(e.prompt) + len(e.target) <= config.max_tokens]
    if len(kept) < config.min_examples:
        raise TuningError(f"only {len(kept)} of the {len(encoded)} examples fit in "
                          f"{config.max_tokens} tokens; at least {config.min_examples} must "
                          "(raise --max-tokens)")
    train, held = split_examples(kept, config.held_out, config.seed)
    random.seed(config.seed)
    torch.manual_seed(config.seed)
    torch.set_num_threads(config.threads)

    model = _load(transformers, torch, source)
    load_s = time.monotonic() - started
    stops = _stop_ids(spec, tokenizer)
    t = time.monotonic()
    held_losses = [_mean_loss(torch, model, held, config.batch)]
    before = _accuracy(torch, model, tokenizer, held, stops, spec, config.answer_tokens,
                       progress, "check before")
    check_s = time.monotonic() - t

    blocks = int(model.config.num_hidden_layers)
    layers = list(range(blocks - min(config.layers or blocks, blocks), blocks))
    model = peft.get_peft_model(model, peft.LoraConfig(
        r=config.rank, lora_alpha=config.alpha or 2 * config.rank, lora_dropout=0.0,
        target_modules=list(_TARGETS), layers_to_transform=layers, bias="none"))
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.lr)
    t = time.monotonic()
    train_losses: list[float] = []
    best, best_epoch, worse = held_losses[0], 0, 0
    best_state = [p.detach().clone() for p in trainable]
    stopped_early = False
    for epoch in range(1, config.epochs + 1):
        model.train()
        order = list(train)
        random.shuffle(order)
        batches = [order[i:i + config.batch] for i in range(0, len(order), config.batch)]
        losses = []
        for step, batch in enumerate(batches, start=1):
            loss = _loss(torch, model, batch)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(float(loss.detach()))
            if progress is not None:
                progress(f"epoch {epoch}/{config.epochs}", step, len(batches))
        train_losses.append(sum(losses) / len(losses))
        held_losses.append(_mean_loss(torch, model, held, config.batch))
        if held_losses[-1] < best - 1e-4:
            best, best_epoch, worse = held_losses[-1], epoch, 0
            best_state = [p.detach().clone() for p in trainable]
        else:
            worse += 1
            if worse >= config.patience:
                stopped_early = epoch < config.epochs
                break
    with torch.no_grad():  # the best epoch's adapters (the base weights if none helped)
        for p, saved in zip(trainable, best_state, strict=True):
            p.copy_(saved)
    train_s = time.monotonic() - t

    t = time.monotonic()
    model = model.merge_and_unload()
    after = _accuracy(torch, model, tokenizer, held, stops, spec, config.answer_tokens,
                      progress, "check after")
    check_s += time.monotonic() - t

    t = time.monotonic()
    replaced = _merged_tensors(model, layers)
    model_path, sha = store_model(
        cache_dir / "tuned",
        lambda path: write_gguf_copy(converted.model_path, path, replaced, progress=progress),
        converted.tokenizer_path)
    new_id = variant_id(spec.id, sha)
    register_variant(registry, spec.id, new_id, model_path, registry_out,
                     f"{spec.description} Fine-tuned on {len(train)} examples of "
                     f"{Path(data).name} (held-out accuracy {before:.0%} -> {after:.0%}).")
    write_s = time.monotonic() - t
    report = TuneReport(
        agent=spec.id, variant=new_id, model_path=str(model_path),
        registry_path=str(registry_out), train_examples=len(train),
        held_out_examples=len(held), skipped_examples=len(encoded) - len(kept),
        epochs_run=len(train_losses), stopped_early=stopped_early,
        train_loss=tuple(round(x, 4) for x in train_losses),
        held_out_loss=tuple(round(x, 4) for x in held_losses), best_epoch=best_epoch,
        accuracy_before=before, accuracy_after=after,
        seconds={"load": round(load_s, 1), "train": round(train_s, 1),
                 "check": round(check_s, 1), "write": round(write_s, 1),
                 "total": round(time.monotonic() - started, 1)},
        config={**asdict(config), "targets": list(_TARGETS), "layers_tuned": layers})
    _save_report(model_path.parent / REPORT_FILENAME, report)
    return report


def _libraries() -> tuple[Any, Any, Any]:
    try:
        import peft
        import torch
        import transformers
    except ImportError as exc:
        raise TuningError(f"fine-tuning needs {exc.name}: install the tune extra, "
                          "pip install 'orion-fsm[tune]'") from None
    return torch, transformers, peft


def _load(transformers: Any, torch: Any, source: Path) -> Any:
    """The agent's model, dequantized to float32 by transformers' GGUF reader."""
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            str(source.parent), gguf_file=source.name, dtype=torch.float32)
    except Exception as exc:  # transformers raises ValueError/OSError/KeyError on odd files
        raise TuningError(f"transformers cannot read {source} ({type(exc).__name__}: "
                          f"{str(exc).splitlines()[0] if str(exc) else ''}); tuning needs a "
                          "llama-family GGUF as llama.cpp writes it") from None
    if model.config.model_type != "llama":
        raise TuningError(f"{source} is a {model.config.model_type} model; tuning writes back "
                          "llama-family models only")
    return model


def _encode(spec: AgentSpec, tokenizer: Tokenizer, example: TrainingExample) -> _Encoded:
    """The prompt as the engine renders it for this agent, and the answer with its end of
    turn (so the model learns to stop)."""
    turns = [("system", example.system or spec.system_prompt), *example.history,
             ("user", example.input)]
    prompt = spec.chat_template.render([t for t in turns if t[1]])
    end = spec.chat_template.assistant.split("{content}", 1)[1]
    return _Encoded(tokenizer.encode(prompt), tokenizer.encode(example.target + end),
                    example.target)


def _stop_ids(spec: AgentSpec, tokenizer: Tokenizer) -> list[int]:
    ids = {tokenizer.token_id(s) for s in spec.generation.stop}
    end = spec.chat_template.assistant.split("{content}", 1)[1].strip()
    ids.add(tokenizer.token_id(end) if end else None)
    return sorted(i for i in ids if i is not None)


def _batch(torch: Any, batch: Sequence[_Encoded]) -> tuple[Any, Any, Any]:
    """input ids, attention mask and labels, right-padded; the loss reads the target only."""
    width = max(len(e.prompt) + len(e.target) for e in batch)
    ids, mask, labels = [], [], []
    for e in batch:
        row = e.prompt + e.target
        pad = width - len(row)
        ids.append(row + [0] * pad)
        mask.append([1] * len(row) + [0] * pad)
        labels.append([_IGNORE] * len(e.prompt) + e.target + [_IGNORE] * pad)
    return torch.tensor(ids), torch.tensor(mask), torch.tensor(labels)


def _loss(torch: Any, model: Any, batch: Sequence[_Encoded]) -> Any:
    ids, mask, labels = _batch(torch, batch)
    return model(input_ids=ids, attention_mask=mask, labels=labels).loss


def _mean_loss(torch: Any, model: Any, examples: Sequence[_Encoded], size: int) -> float:
    """Mean loss per target token over `examples`."""
    model.eval()
    total, tokens = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(examples), size):
            batch = examples[i:i + size]
            count = sum(len(e.target) for e in batch)
            total += float(_loss(torch, model, batch)) * count
            tokens += count
    return total / tokens if tokens else math.nan


def _accuracy(torch: Any, model: Any, tokenizer: Tokenizer, examples: Sequence[_Encoded],
              stops: list[int], spec: AgentSpec, limit: int,
              progress: ProgressCallback | None, stage: str) -> float:
    """Share of `examples` whose greedy answer passes the answer check."""
    model.eval()
    passed = 0
    with torch.no_grad():
        for done, e in enumerate(examples, start=1):
            answer = _generate(torch, model, tokenizer, e.prompt, stops, spec, limit)
            passed += answer_matches(answer, e.answer)
            if progress is not None:
                progress(stage, done, len(examples))
    return passed / len(examples)


def _generate(torch: Any, model: Any, tokenizer: Tokenizer, prompt: list[int],
              stops: list[int], spec: AgentSpec, limit: int) -> str:
    """Greedy decoding with the KV cache, until a stop token or `limit` tokens."""
    out: list[int] = []
    cache = None
    step = torch.tensor([prompt])
    for _ in range(limit):
        result = model(input_ids=step, cache=cache, use_cache=True, logits_to_keep=1)
        cache = result.cache
        token = int(result.logits[0, -1].argmax())
        if token in stops:
            break
        out.append(token)
        step = torch.tensor([[token]])
    text = tokenizer.decode(out, skip_special=True)
    for stop in spec.generation.stop:
        text = text.split(stop, 1)[0]
    return text.strip()


def _merged_tensors(model: Any, layers: Sequence[int]) -> dict[str, Any]:
    """The merged weights of the tuned projections, by GGUF tensor name."""
    blocks = model.model.layers
    out = {}
    for i in layers:
        for name, (part, gguf_name) in _TARGETS.items():
            module = getattr(getattr(blocks[i], part), name)
            out[f"blk.{i}.{gguf_name}.weight"] = module.weight.detach().float().numpy()
    return out


def _save_report(path: Path, report: TuneReport) -> None:
    import json

    try:
        path.write_text(json.dumps(report.as_dict(), indent=2) + "\n", encoding="utf-8")
    except OSError as exc:
        raise TuningError(f"cannot write the report {path}: {exc}") from None
