"""What a context store's operations return: a document added, a chunk found, the store's
statistics (each with `as_dict()` for the CLI's --json and the traces)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["AddResult", "ContextHit", "ContextStats"]


@dataclass(frozen=True, slots=True)
class AddResult:
    """What adding one document did."""

    document_id: int
    name: str
    tokens_added: int
    chunks: int
    duplicates: int  # chunks dropped as exact or near duplicates of chunks already held
    unchanged: bool = False  # the same name with the same content was already there
    evicted: tuple[str, ...] = ()  # least recently used documents removed to make room

    def as_dict(self) -> dict[str, Any]:
        return {"document_id": self.document_id, "name": self.name,
                "tokens_added": self.tokens_added, "chunks": self.chunks,
                "duplicates": self.duplicates, "unchanged": self.unchanged,
                "evicted": list(self.evicted)}


@dataclass(frozen=True, slots=True)
class ContextHit:
    """A chunk found by a search, with why it was found."""

    chunk_id: int
    document_id: int
    document: str
    position: int  # the chunk's place in its document
    heading: str
    text: str
    tokens: int
    score: float  # the fused (or single-ranker) score: higher is better
    lexical_rank: int | None = None  # 1-based rank in BM25, None if BM25 did not find it
    semantic_rank: int | None = None
    similarity: float | None = None  # cosine with the query
    matched_terms: tuple[str, ...] = ()
    rerank_rank: int | None = None  # 1-based rank by the reranker's likelihood, if reranked
    likelihood: float | None = None  # mean log-probability of the question after the chunk

    @property
    def why(self) -> str:
        parts = []
        if self.lexical_rank is not None:
            terms = ", ".join(self.matched_terms) or "stemmed terms"
            parts.append(f"BM25 #{self.lexical_rank} ({terms})")
        if self.semantic_rank is not None:
            parts.append(f"embedding #{self.semantic_rank} (cosine {self.similarity:.2f})")
        if self.rerank_rank is not None:
            parts.append(f"reranker #{self.rerank_rank} (log-likelihood {self.likelihood:.2f})")
        return "; ".join(parts) or "no ranker"

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ContextHit:
        """Back from `as_dict()` (a trace record's retrieved chunks)."""
        return cls(int(d["chunk_id"]), int(d["document_id"]), str(d["document"]),
                   int(d["position"]), str(d.get("heading") or ""), str(d.get("text") or ""),
                   int(d.get("tokens") or 0), float(d.get("score") or 0.0),
                   d.get("lexical_rank"), d.get("semantic_rank"), d.get("similarity"),
                   tuple(d.get("matched_terms") or ()), d.get("rerank_rank"),
                   d.get("likelihood"))

    def as_dict(self, *, text: bool = True) -> dict[str, Any]:
        out: dict[str, Any] = {
            "chunk_id": self.chunk_id, "document_id": self.document_id,
            "document": self.document, "position": self.position, "heading": self.heading,
            "tokens": self.tokens, "score": round(self.score, 6),
            "lexical_rank": self.lexical_rank, "semantic_rank": self.semantic_rank,
            "similarity": None if self.similarity is None else round(self.similarity, 4),
            "matched_terms": list(self.matched_terms), "why": self.why}
        if self.rerank_rank is not None:  # absent otherwise: older traces keep their shape
            out["rerank_rank"] = self.rerank_rank
            out["likelihood"] = None if self.likelihood is None else round(self.likelihood, 4)
        if text:
            out["text"] = self.text
        return out


@dataclass(frozen=True, slots=True)
class ContextStats:
    """How much a store holds and how ready its indexes are."""

    name: str
    path: Path
    documents: int
    chunks: int
    tokens: int
    capacity_tokens: int
    embedded: int  # chunks with a vector
    raw_bytes: int  # of the documents' text as added
    disk_bytes: int  # the store's files (database and write-ahead log)
    embeddings: str  # "ready", "pending", "off" or the reason they failed
    tokenizer: str

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "path": str(self.path), "documents": self.documents,
                "chunks": self.chunks, "tokens": self.tokens,
                "capacity_tokens": self.capacity_tokens, "embedded": self.embedded,
                "raw_bytes": self.raw_bytes, "disk_bytes": self.disk_bytes,
                "embeddings": self.embeddings, "tokenizer": self.tokenizer}
