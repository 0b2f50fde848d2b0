"""What BM25 reads of a chunk and of a query: lower-cased words without stop words, and one
FTS5 MATCH expression of quoted terms (the store's contentless `fts` table, porter stemming)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Final

__all__ = ["WORD", "fts_match", "indexed_columns", "query_terms"]

WORD = re.compile(r"\w+", re.UNICODE)
# Words that match nearly every chunk: they only slow BM25 down and add noise to "why".
_STOPWORDS: Final = frozenset((
    "a", "an", "and", "are", "as", "at", "be", "been", "but", "by", "can", "could", "do",
    "does", "did", "for", "from", "had", "has", "have", "how", "i", "if", "in", "into", "is",
    "it", "its", "me", "my", "of", "on", "or", "our", "should", "so", "than", "that", "the",
    "their", "them", "then", "there", "these", "they", "this", "to", "was", "we", "were",
    "what", "when", "where", "which", "while", "who", "why", "will", "with", "would", "you",
    "your", "about", "also", "any",
))


def query_terms(query: str) -> list[str]:
    """A query's distinct words without stop words (all of them if it has only those)."""
    words = [w for w in WORD.findall(query.lower()) if w not in _STOPWORDS]
    return list(dict.fromkeys(words)) or list(dict.fromkeys(WORD.findall(query.lower())))


def indexed_columns(heading: str, text: str) -> tuple[str, str]:
    """The two columns FTS5 indexes for a chunk (the same on insert and delete): its words
    without stop words, which queries never search for and which make a quarter of the
    index (library/: 3.43 MB with them, 2.58 MB without, the same recall)."""
    return _content_words(heading), _content_words(text)


def _content_words(text: str) -> str:
    return " ".join(w for w in WORD.findall(text.lower()) if w not in _STOPWORDS)


def fts_match(terms: Sequence[str]) -> str:
    # Every term quoted: FTS5 operators and punctuation in user text are plain words here.
    return " OR ".join('"' + t.replace('"', '""') + '"' for t in terms)
