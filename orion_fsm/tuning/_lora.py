"""LoRA fine-tuning of an agent on CPU: its GGUF dequantized by transformers, PEFT adapters on
the last blocks, a held-out split with early stopping, the answer check before and after, and
the adapters merged into the weights and written back as a GGUF the runtime loads.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final

from orion_fsm._exceptions import ConfigurationError, TuningError
from orion_fsm.backends._convert import ensure_converted, write_gguf_copy
from orion_fsm.backends._tokenizer import Tokenizer
from orion_fsm.evaluation._answers import AnswerCheck, matches
from orion_fsm.services.feedback._store import TrainingExample
from orion_fsm.services.models._registry import AgentSpec, Registry

from ._data import load_examples, split_examples
from ._variant import REPORT_FILENAME, register_variant, store_model, variant_id

__all__ = ["TuneConfig", "TuneReport", "tune_agent"]

ProgressCallback = Callable[[str, int, int], None]
# Projections whose GGUF tensors are stored as transformers holds them. attn_q/attn_k are
# permuted by llama.cpp's converter (transformers undoes it on load): left out, so a merged
# weight is written back without redoing the permutation.
_TARGETS: Final = {"v_proj": ("self_attn", "attn_v"), "o_proj": ("self_attn", "attn_output"),
                   "gate_proj": ("mlp", "ffn_gate"), "up_proj": ("mlp", "ffn_up"),
                   "down_proj": ("mlp", "ffn_down")}
_ANSWER_BATCH: Final = 16  # held-out prompts answered together by the answer check


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
    # torch's threads; None: the cores other processes leave free, read again at every step
    # (two threads train 1.8x faster than one on an idle 2-core machine, and 5x slower than
    # one beside a busy process: torch's threads wait on each other like ggml's)
    threads: int | None = None
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
                  ("threads", self.threads is None or self.threads >= 1,
                   "at least 1 or None"))
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
    seconds: dict[str, float]  # load, prefix, train (and per step), check, write, total
    config: dict[str, Any] = field(default_factory=dict)
    tokens: dict[str, float] = field(default_factory=dict)  # per training example, on average
    steps_by_threads: dict[int, int] = field(default_factory=dict)  # torch threads -> steps

    def as_dict(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["train_loss"], doc["held_out_loss"] = list(self.train_loss), list(self.held_out_loss)
        return doc


@dataclass(frozen=True, slots=True)
class _Encoded:
    prompt: list[int]
    target: list[int]
    answer: str  # the target text the check compares with

    @property
    def length(self) -> int:
        return len(self.prompt) + len(self.target)


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
    pace = _Pace(torch, config.threads)
    pace()

    model = _load(transformers, torch, source)
    load_s = time.monotonic() - started
    stops = _stop_ids(spec, tokenizer)
    blocks = int(model.config.num_hidden_layers)
    layers = list(range(blocks - min(config.layers or blocks, blocks), blocks))
    t = time.monotonic()
    # The blocks below the tuned ones never change: what enters the first tuned block is
    # computed once per example here, not once per example per epoch.
    train_in = _states_below(torch, model, train, layers[0], config.batch)
    held_in = _states_below(torch, model, held, layers[0], config.batch)
    prefix_s = time.monotonic() - t
    t = time.monotonic()
    held_losses = [_mean_loss(torch, model, held, held_in, layers[0], config.batch)]
    before = _accuracy(torch, model, held, stops, tokenizer, spec, config, progress,
                       "check before")
    check_s = time.monotonic() - t

    tuned = peft.get_peft_model(model, peft.LoraConfig(
        r=config.rank, lora_alpha=config.alpha or 2 * config.rank, lora_dropout=0.0,
        target_modules=list(_TARGETS), layers_to_transform=layers, bias="none"))
    trainable = [p for p in tuned.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.lr)
    t = time.monotonic()
    train_losses: list[float] = []
    best, best_epoch, worse = held_losses[0], 0, 0
    best_state = [p.detach().clone() for p in trainable]
    stopped_early = False
    steps = 0
    for epoch in range(1, config.epochs + 1):
        tuned.train()
        order = list(range(len(train)))
        random.shuffle(order)
        batches = [order[i:i + config.batch] for i in range(0, len(order), config.batch)]
        losses = []
        for step, picked in enumerate(batches, start=1):
            pace(step=True)
            # `model` holds the adapters peft put in place: called directly, it runs the
            # tuned blocks only, from the states below them.
            loss = _loss(torch, model, [train[i] for i in picked], [train_in[i] for i in picked],
                         layers[0])
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(float(loss.detach()))
            steps += 1
            if progress is not None:
                progress(f"epoch {epoch}/{config.epochs}", step, len(batches))
        train_losses.append(sum(losses) / len(losses))
        pace()
        held_losses.append(_mean_loss(torch, model, held, held_in, layers[0], config.batch))
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
    pace()
    model = tuned.merge_and_unload()
    after = _accuracy(torch, model, held, stops, tokenizer, spec, config, progress,
                      "check after")
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
        seconds={"load": round(load_s, 1), "prefix": round(prefix_s, 1),
                 "train": round(train_s, 1), "train_step": round(train_s / max(steps, 1), 2),
                 "check": round(check_s, 1), "write": round(write_s, 1),
                 "total": round(time.monotonic() - started, 1)},
        config={**asdict(config), "targets": list(_TARGETS), "layers_tuned": layers},
        tokens=_token_counts(train), steps_by_threads=dict(sorted((+pace.used).items())))
    _save_report(model_path.parent / REPORT_FILENAME, report)
    return report


class _Pace:
    """Sets torch's threads before each step: `fixed`, or the cores the machine leaves free
    (the core pool's capacity: usable cores minus other processes' load)."""

    def __init__(self, torch: Any, fixed: int | None) -> None:
        from orion_fsm.services.models._cpu import CpuAllotter

        self._torch = torch
        self._fixed = fixed
        self._pool = CpuAllotter() if fixed is None else None
        self.used: Counter[int] = Counter()

    def __call__(self, *, step: bool = False) -> None:
        threads = self._pool.capacity() if self._pool is not None else self._fixed or 1
        if threads != self._torch.get_num_threads():
            self._torch.set_num_threads(threads)
        self.used[threads] += step  # training steps by threads (the report's)


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


@contextlib.contextmanager
def _blocks(model: Any, start: int, stop: int | None, *, final_norm: bool) -> Iterator[Any]:
    """`model`'s decoder with only blocks [start, stop) (and, without `final_norm`, no final
    norm): it then maps the states entering block `start` to those leaving block stop - 1."""
    core = model.model
    layers, norm = core.layers, core.norm
    core.layers = layers[start:stop]
    if not final_norm:
        core.norm = _identity()
    try:
        yield core
    finally:
        core.layers, core.norm = layers, norm


def _identity() -> Any:
    import torch

    return torch.nn.Identity()


def _padded(torch: Any, rows: Sequence[Any]) -> tuple[Any, Any]:
    """Right-padded (batch, width, hidden) states and their attention mask."""
    states = torch.nn.utils.rnn.pad_sequence(list(rows), batch_first=True)
    mask = torch.zeros(states.shape[:2], dtype=torch.long)
    for i, row in enumerate(rows):
        mask[i, :len(row)] = 1
    return states, mask


def _states_below(torch: Any, model: Any, examples: Sequence[_Encoded], first: int,
                  size: int) -> list[Any]:
    """Per example, the states entering block `first` ((tokens, hidden), no padding)."""
    model.eval()
    out = []
    with torch.no_grad(), _blocks(model, 0, first, final_norm=False) as below:
        for i in range(0, len(examples), size):
            batch = examples[i:i + size]
            width = max(e.length for e in batch)
            ids = torch.tensor([e.prompt + e.target + [0] * (width - e.length) for e in batch])
            mask = (torch.arange(width)[None, :]
                    < torch.tensor([e.length for e in batch])[:, None]).long()
            # Right padding: under the causal mask no real token attends to a pad.
            states = below(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
            out += [row[:e.length].clone() for row, e in zip(states, batch, strict=True)]
    return out


def _loss(torch: Any, model: Any, batch: Sequence[_Encoded], states: Sequence[Any],
          first: int) -> Any:
    """Mean cross-entropy of the target tokens, from the states entering block `first`. The
    output head (49k x 576 on SmolLM2) runs on the target positions only, not the prompt's."""
    padded, mask = _padded(torch, states)
    with _blocks(model, first, None, final_norm=True) as top:
        hidden = top(inputs_embeds=padded, attention_mask=mask, use_cache=False).last_hidden_state
    rows: list[int] = []
    cols: list[int] = []
    labels: list[int] = []
    for i, e in enumerate(batch):
        start = len(e.prompt) - 1  # the position before a token predicts it
        rows += [i] * len(e.target)
        cols += range(start, start + len(e.target))
        labels += e.target
    logits = model.lm_head(hidden[rows, cols])
    return torch.nn.functional.cross_entropy(logits.float(), torch.tensor(labels))


def _mean_loss(torch: Any, model: Any, examples: Sequence[_Encoded], states: Sequence[Any],
               first: int, size: int) -> float:
    """Mean loss per target token over `examples`."""
    model.eval()
    total, tokens = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(examples), size):
            batch = examples[i:i + size]
            count = sum(len(e.target) for e in batch)
            total += float(_loss(torch, model, batch, states[i:i + size], first)) * count
            tokens += count
    return total / tokens if tokens else math.nan


def _accuracy(torch: Any, model: Any, examples: Sequence[_Encoded], stops: list[int],
              tokenizer: Tokenizer, spec: AgentSpec, config: TuneConfig,
              progress: ProgressCallback | None, stage: str) -> float:
    """Share of `examples` whose greedy answer passes the evaluator's `exact` check."""
    model.eval()
    passed = 0
    size = _ANSWER_BATCH
    for i in range(0, len(examples), size):
        batch = examples[i:i + size]
        answers = _generate(torch, model, tokenizer, batch, stops, spec, config.answer_tokens)
        passed += sum(matches(AnswerCheck(exact=e.answer), a)
                      for a, e in zip(answers, batch, strict=True))
        if progress is not None:
            progress(stage, min(i + size, len(examples)), len(examples))
    return passed / len(examples)


def _generate(torch: Any, model: Any, tokenizer: Tokenizer, batch: Sequence[_Encoded],
              stops: list[int], spec: AgentSpec, limit: int) -> list[str]:
    """Greedy answers to the batch's prompts, decoded together (left-padded: one pass over
    the weights per token for the whole batch, not per prompt), each cut at its first stop."""
    width = max(len(e.prompt) for e in batch)
    pad = stops[0] if stops else 0
    ids = torch.tensor([[pad] * (width - len(e.prompt)) + e.prompt for e in batch])
    mask = torch.tensor([[0] * (width - len(e.prompt)) + [1] * len(e.prompt) for e in batch])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=limit,
                             do_sample=False, eos_token_id=stops or None, pad_token_id=pad)
    texts = []
    for row in out[:, width:].tolist():
        tokens = []
        for token in row:
            if token in stops:
                break
            tokens.append(token)
        text = tokenizer.decode(tokens, skip_special=True)
        for stop in spec.generation.stop:
            text = text.split(stop, 1)[0]
        texts.append(text.strip())
    return texts


def _token_counts(examples: Sequence[_Encoded]) -> dict[str, float]:
    n = len(examples)
    return {"prompt": round(sum(len(e.prompt) for e in examples) / n, 1),
            "target": round(sum(len(e.target) for e in examples) / n, 1),
            "longest": max(e.length for e in examples)}


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
