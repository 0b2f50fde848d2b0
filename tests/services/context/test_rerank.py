"""Reranking by query likelihood: the score a llama.cpp model gives (checked against the
model's full logits), the search that fuses it in, and the settings that refuse what cannot
run. On a tiny random llama.cpp model: its likelihoods are arbitrary but exact. The
reranker runs on llama.cpp, which `make test` installs (the llama-cpp extra)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from orion_fsm import ConfigurationError, ContextStore, Engine, Reranker
from orion_fsm.backends._likelihood import LikelihoodScorer
from orion_fsm.testing import make_tiny_llama_gguf
from tests.services.context.conftest import WordTokenizer

DOCS = {
    "lamp.md": "# Lamp\n\nThe keeper lights the lamp at dusk and trims the wick at midnight.\n",
    "fuel.md": "# Fuel\n\nThe lamp burns paraffin; a full tank lasts eleven hours.\n",
    "tides.md": "# Tides\n\nThe sea rises twice a day; the tide tables hang by the door.\n",
    "stairs.md": "# Stairs\n\nOne hundred and twelve steps lead to the lamp room.\n",
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tiny-rerank")
    return make_tiny_llama_gguf(root / "tiny.gguf", seed=11, llama_cpp_layout=True,
                                tied_embeddings=False)


def test_a_score_is_the_mean_log_probability_of_the_continuation(tiny: Path) -> None:
    llama_cpp = pytest.importorskip("llama_cpp")
    prefix, continuation = [5, 9, 17, 33, 2, 41], [7, 12, 30]
    with LikelihoodScorer(tiny) as scorer:
        got = scorer.score(prefix, continuation)
        head = [] if scorer.bos is None else [scorer.bos]
    # The same tokens through llama-cpp-python's own API, with logits at every position.
    full = llama_cpp.Llama(str(tiny), n_ctx=64, logits_all=True, verbose=False)
    try:
        tokens = [*head, *prefix, *continuation]
        full.eval(tokens)
        logits = np.asarray(full.scores[: len(tokens)], dtype=np.float64)
    finally:
        full.close()
    first = len(tokens) - len(continuation) - 1
    rows = logits[first: first + len(continuation)]
    top = rows.max(axis=1, keepdims=True)
    logp = rows - top - np.log(np.exp(rows - top).sum(axis=1, keepdims=True))
    expected = float(np.mean(logp[np.arange(len(continuation)), continuation]))
    assert got == pytest.approx(expected, abs=1e-3)
    assert got < 0


def test_the_scorer_refuses_what_it_cannot_read(tiny: Path) -> None:
    with LikelihoodScorer(tiny, context_length=16) as scorer:
        with pytest.raises(ValueError, match="the continuation is empty"):
            scorer.score([1, 2], [])
        with pytest.raises(ValueError, match="leaves no room for a prefix"):
            scorer.score([1, 2], list(range(1, 17)))
        # A long prefix is cut to fit: the score still reads the whole continuation.
        assert scorer.score(list(range(1, 40)), [3, 4]) < 0


@pytest.mark.anyio
async def test_a_reranked_search_fuses_both_rankings(tiny: Path, tmp_path: Path) -> None:
    store = await ContextStore.open(tmp_path / "store", tokenizer=WordTokenizer(),
                                    tokenizer_id="words")
    async with store, await Reranker.open(model=tiny, candidates=3) as reranker:
        for name, text in DOCS.items():
            await store.add(text, name=name)
        query = "lamp keeper dusk paraffin"
        plain = await store.search(query, 3)
        hits = await store.search(query, 2, reranker=reranker)
        likelihoods = await reranker.likelihoods(query, [(h.heading, h.text) for h in plain])
    assert len(hits) == 2
    assert {h.chunk_id for h in hits} <= {h.chunk_id for h in plain}
    ranked = sorted(range(3), key=lambda i: -likelihoods[i])
    for hit in hits:
        search_rank = [h.chunk_id for h in plain].index(hit.chunk_id) + 1
        assert hit.rerank_rank == ranked.index(search_rank - 1) + 1
        assert hit.likelihood == pytest.approx(likelihoods[search_rank - 1])
        assert hit.score == pytest.approx(1 / (0.5 + search_rank) + 1 / (0.5 + hit.rerank_rank))
        assert f"reranker #{hit.rerank_rank}" in hit.why
    assert hits[0].score >= hits[1].score


@pytest.mark.parametrize(("rerank", "message"), [
    ("/nowhere/model.gguf", "rerank must be True, False or the path of a GGUF model file"),
])
def test_a_reranker_that_cannot_run_is_refused_when_the_engine_is_built(
        rerank: str, message: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match=message):
        Engine(cache_dir=tmp_path, trace_path=False, embeddings=False, rerank=rerank)
