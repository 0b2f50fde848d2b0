"""Test doubles for the context store's seams: a word tokenizer and a concept embedder."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

# Words of one group mean the same thing: the embedder maps them to one direction, so a
# query finds a chunk that shares no word with it (what BM25 alone cannot do).
CONCEPTS: tuple[frozenset[str], ...] = (
    frozenset({"car", "automobile", "vehicle", "sedan"}),
    frozenset({"fruit", "apple", "banana", "pear"}),
    frozenset({"ocean", "sea", "waves", "tide"}),
    frozenset({"music", "song", "melody", "tune"}),
    frozenset({"database", "sqlite", "table", "index"}),
)


class WordTokenizer:
    """One token per whitespace-separated word: easy to reason about in tests."""

    def encode(self, text: str) -> list[int]:
        return [hash(w) & 0xFFFF for w in text.split()]


class ConceptEmbedder:
    """Unit vectors over CONCEPTS (plus one dimension for everything else)."""

    def __init__(self) -> None:
        self.calls = 0
        self.texts = 0

    def _vector(self, text: str) -> np.ndarray:
        v = np.zeros(len(CONCEPTS) + 1, dtype=np.float32)
        for word in text.lower().replace(".", " ").split():
            hits = [i for i, group in enumerate(CONCEPTS) if word in group]
            for i in hits:
                v[i] += 1.0
            if not hits:
                v[-1] += 0.05
        return v / max(float(np.linalg.norm(v)), 1e-9)

    async def embed(self, text: str) -> np.ndarray:
        return self._vector(text)

    async def embed_many(self, texts: Sequence[str], *, remember: bool = True
                         ) -> list[np.ndarray]:
        self.calls += 1
        self.texts += len(texts)
        return [self._vector(t) for t in texts]
