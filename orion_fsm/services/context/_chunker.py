"""Cutting a document into retrievable chunks that follow its structure.

Owns parsing reST, Markdown and plain text into blocks (headings, paragraphs, code and literal
blocks), packing blocks into chunks of a token budget with overlap, and the fingerprints that
find exact and near-duplicate chunks.
"""

from __future__ import annotations

import hashlib
import itertools
import re
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

__all__ = [
    "Chunk",
    "ChunkingConfig",
    "DuplicateFilter",
    "Encoder",
    "TextFormat",
    "chunk_text",
    "detect_format",
    "exact_key",
    "normalise",
    "simhash",
]

TextFormat = Literal["rst", "markdown", "text"]

_RST_ADORNMENT = re.compile(r"^([=\-~^\"'*+#`:.])\1{2,}\s*$")
_MD_HEADING = re.compile(r"^(#{1,6})\s+(.+?)\s*#*\s*$")
_FENCE = re.compile(r"^\s*(```|~~~)")
_WORD = re.compile(r"\w+", re.UNICODE)
_NONSPACE = re.compile(r"\S+")
# reST adornment characters in the order Python's docs use them: earlier is a higher level.
_RST_LEVELS = "#*=-^\"'~+`:."


class Encoder(Protocol):
    """Text to token ids: the agent's real tokenizer counts every chunk."""

    def encode(self, text: str) -> list[int]: ...


@dataclass(frozen=True, slots=True)
class ChunkingConfig:
    """How big a chunk is and how much of the previous one it repeats, in tokens."""

    max_tokens: int = 320
    overlap_tokens: int = 48
    # A section shorter than this joins the next one rather than standing alone.
    min_tokens: int = 64


@dataclass(frozen=True, slots=True)
class Chunk:
    """One retrievable piece of a document: where it is, what it says, how many tokens."""

    position: int  # 0-based, in document order
    heading: str  # the section path, "Title > Section > Subsection"
    text: str  # the document's text from `start` to `end`
    tokens: int  # of `text`, by the store's tokenizer
    start: int  # character offsets into the document (line ends normalised to "\n")
    end: int


@dataclass(frozen=True, slots=True)
class _Block:
    heading: str
    text: str
    tokens: int
    opens_section: bool  # the first block after a heading
    start: int  # character offsets of `text` in the document
    end: int


def detect_format(text: str, name: str = "") -> TextFormat:
    """reST or Markdown by the file suffix, else by what the text looks like."""
    lowered = name.lower()
    if lowered.endswith((".rst", ".rst.txt", ".rest")):
        return "rst"
    if lowered.endswith((".md", ".markdown")):
        return "markdown"
    head = text[:20000].splitlines()
    if any(_MD_HEADING.match(line) for line in head) or "```" in text[:20000]:
        return "markdown"
    if any(_RST_ADORNMENT.match(b) and a.strip() and len(b.rstrip()) >= len(a.rstrip())
           for a, b in itertools.pairwise(head)):
        return "rst"
    return "text"


def _paragraphs(lines: Sequence[str], fmt: TextFormat
                ) -> Iterator[tuple[str, int, str, int, int]]:
    """("heading", level, title, first, end) and ("para", 0, text, first, end) items, in
    order, with the lines they span (`lines[first:end]`; a paragraph's text is exactly those
    lines joined).

    Fenced code (Markdown) and indented literal blocks (reST `::`, directives) stay whole:
    blank lines inside them do not split them.
    """
    levels: list[str] = []  # reST adornments in the order they first appear
    para: list[str] = []
    para_at = 0
    i, n = 0, len(lines)

    def flush() -> Iterator[tuple[str, int, str, int, int]]:
        if para:
            text = "\n".join(para)
            if text.strip():
                yield "para", 0, text, para_at, para_at + len(para)
            para.clear()

    while i < n:
        line = lines[i]
        if fmt == "markdown":
            if _FENCE.match(line):
                yield from flush()
                fence = _FENCE.match(line)
                assert fence is not None
                first = i
                i += 1
                while i < n and not lines[i].lstrip().startswith(fence.group(1)):
                    i += 1
                i = min(i + 1, n)
                yield "para", 0, "\n".join(lines[first:i]), first, i
                continue
            heading = _MD_HEADING.match(line)
            if heading:
                yield from flush()
                yield "heading", len(heading.group(1)), heading.group(2), i, i + 1
                i += 1
                continue
        elif fmt == "rst":
            # Overlined title: adornment, title, adornment.
            if (_RST_ADORNMENT.match(line) and i + 2 < n and lines[i + 1].strip()
                    and lines[i + 2].rstrip() == line.rstrip()):
                yield from flush()
                key = "o" + line.strip()[0]
                if key not in levels:
                    levels.append(key)
                yield "heading", levels.index(key) + 1, lines[i + 1].strip(), i, i + 3
                i += 3
                continue
            if (line.strip() and not line[0].isspace() and i + 1 < n
                    and _RST_ADORNMENT.match(lines[i + 1])
                    and len(lines[i + 1].rstrip()) >= len(line.rstrip())):
                yield from flush()
                key = lines[i + 1].strip()[0]
                if key not in levels:
                    levels.append(key)
                yield "heading", levels.index(key) + 1, line.strip(), i, i + 2
                i += 2
                continue
        if not line.strip():
            # A blank line ends a paragraph unless an indented block goes on after it.
            j = i + 1
            while j < n and not lines[j].strip():
                j += 1
            indented_next = j < n and lines[j][:1].isspace()
            if para and indented_next and (para[-1].rstrip().endswith("::")
                                           or para[0][:1].isspace()
                                           or para[0].startswith(".. ")):
                para.extend(lines[i:j])
                i = j
                continue
            yield from flush()
            i = j
            continue
        if not para:
            para_at = i
        para.append(line)
        i += 1
    yield from flush()


def _split_long(text: str, limit: int, encoder: Encoder) -> list[tuple[int, int, int]]:
    """A block over the limit, cut at line ends (or, for one huge line, between words):
    (start, end, tokens) of each piece, offsets into `text`."""
    pieces: list[tuple[int, int, int]] = []
    start = end = count = 0  # the piece being filled: text[start:end]
    at = 0
    for line in text.split("\n"):
        line_at, at = at, at + len(line) + 1
        tokens = len(encoder.encode(line)) + 1
        if tokens > limit:
            if count:
                pieces.append((start, end, count))
            words = [m.span() for m in _NONSPACE.finditer(line)]
            step = max(1, len(words) * limit // tokens)
            for first in range(0, len(words), step):
                a, b = words[first][0], words[min(first + step, len(words)) - 1][1]
                pieces.append((line_at + a, line_at + b,
                               len(encoder.encode(line[a:b]))))
            start, end, count = at, at, 0
            continue
        if count + tokens > limit and count:
            pieces.append((start, end, count))
            start, count = line_at, 0
        elif not count:
            start = line_at
        end = line_at + len(line)
        count += tokens
    if count:
        pieces.append((start, end, count))
    return pieces


def _blocks(text: str, fmt: TextFormat, config: ChunkingConfig,
            encoder: Encoder) -> Iterator[_Block]:
    lines = text.split("\n")
    line_at = [0]
    for line in lines:
        line_at.append(line_at[-1] + len(line) + 1)
    path: list[tuple[int, str]] = []
    opens = True
    for kind, level, value, first, _ in _paragraphs(lines, fmt):
        if kind == "heading":
            while path and path[-1][0] >= level:
                path.pop()
            path.append((level, value))
            opens = True
            continue
        heading = " > ".join(title for _, title in path)
        start = line_at[first]
        tokens = len(encoder.encode(value))
        if tokens > config.max_tokens:
            # Pieces leave room for the overlap the next chunk starts with.
            limit = max(1, config.max_tokens - config.overlap_tokens - 2)
            for a, b, count in _split_long(value, limit, encoder):
                yield _Block(heading, value[a:b], count, opens, start + a, start + b)
                opens = False
        else:
            yield _Block(heading, value, tokens, opens, start, start + len(value))
        opens = False


def _tail(blocks: Sequence[_Block], budget: int, encoder: Encoder) -> list[_Block]:
    """The end of a chunk repeated at the start of the next one: whole lines, ≤ budget."""
    if budget <= 0 or not blocks:
        return []
    lines = blocks[-1].text.split("\n")
    kept: list[str] = []
    used = 0
    for line in reversed(lines):
        cost = len(encoder.encode(line)) + 1
        if used + cost > budget:
            break
        kept.insert(0, line)
        used += cost
    if not kept or (len(kept) == len(lines) and len(blocks) == 1):
        return [] if not kept else [blocks[-1]]
    last = blocks[-1]
    text = "\n".join(kept)
    return [_Block(last.heading, text, used, False, last.end - len(text), last.end)]


def normalise(text: str) -> str:
    """The text chunk offsets point into: line ends as "\\n"."""
    return text.replace("\r\n", "\n")


def chunk_text(text: str, encoder: Encoder, *, fmt: TextFormat = "text",
               config: ChunkingConfig | None = None) -> list[Chunk]:
    """The chunks of `text`: sections start a new chunk, a long section is cut between
    paragraphs (or lines) into chunks of ≤ max_tokens that repeat ≤ overlap_tokens of the
    previous one. A chunk is a span of the (normalised) text, so a short section merged into
    the next one keeps its heading line. Token counts are `encoder`'s on the chunk's text."""
    config = config or ChunkingConfig()
    text = normalise(text)
    sep = 2  # the blank line between blocks: at most two tokens, usually one
    chunks: list[Chunk] = []
    current: list[_Block] = []
    count = 0

    def emit() -> None:
        start, end = current[0].start, current[-1].end
        body = text[start:end]
        if body.strip():
            chunks.append(Chunk(len(chunks), current[0].heading, body,
                                len(encoder.encode(body)), start, end))

    def gap(before: _Block, after: _Block) -> int:
        # What lies between two blocks of a chunk: a blank line, or a merged heading.
        between = text[before.end:after.start]
        return len(encoder.encode(between)) + sep if between.strip() else sep

    for block in _blocks(text, fmt, config, encoder):
        new_section = block.opens_section and count >= config.min_tokens
        cost = block.tokens + (gap(current[-1], block) if current else 0)
        if current and (new_section or count + cost > config.max_tokens):
            emit()
            carried = [] if new_section else _tail(current, config.overlap_tokens, encoder)
            if carried and (sum(b.tokens for b in carried) + gap(carried[-1], block)
                            + block.tokens > config.max_tokens):
                carried = []
            current = carried
            count = sum(b.tokens for b in current)
            cost = block.tokens + (gap(current[-1], block) if current else 0)
        current.append(block)
        count += cost
    if current:
        emit()
    return chunks


# --- duplicates -----------------------------------------------------------------------------


def _normal_words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def exact_key(text: str) -> bytes:
    """Same words in the same order (case, spacing and punctuation aside): same key."""
    return hashlib.blake2b(" ".join(_normal_words(text)).encode(), digest_size=16).digest()


def simhash(text: str) -> int:
    """A 64-bit SimHash of the text's word 3-shingles: near-identical texts differ in few bits."""
    import numpy as np

    words = _normal_words(text)
    if not words:
        return 0
    hashes = np.fromiter((zlib.crc32(w.encode()) for w in words), dtype=np.uint64,
                         count=len(words))
    if len(hashes) >= 3:
        hashes = (hashes[:-2] * np.uint64(0x9E3779B97F4A7C15)
                  ^ hashes[1:-1] * np.uint64(0xC2B2AE3D27D4EB4F)
                  ^ hashes[2:] * np.uint64(0x165667B19E3779F9))
    else:
        hashes = hashes * np.uint64(0x9E3779B97F4A7C15)
    # Mix the bits once more so every one of the 64 carries information.
    hashes ^= hashes >> np.uint64(31)
    hashes *= np.uint64(0xBF58476D1CE4E5B9)
    hashes ^= hashes >> np.uint64(29)
    bits = (hashes[:, None] >> np.arange(64, dtype=np.uint64)) & np.uint64(1)
    ones = bits.sum(axis=0)
    value = 0
    for bit, count in enumerate(ones.tolist()):
        if count * 2 > len(hashes):
            value |= 1 << bit
    return value - (1 << 64) if value >= 1 << 63 else value  # fits SQLite's signed INTEGER


class DuplicateFilter:
    """Remembers chunk fingerprints by chunk id: an exact key seen before, or a SimHash within
    `max_distance` bits of one seen before (found through 8 bands of 8 bits: two hashes
    7 bits apart share at least one band), is a duplicate. One changed word in 200 moves
    ~4 bits; unrelated texts differ by ~32."""

    __slots__ = ("_bands", "_exact", "_ids", "max_distance")

    def __init__(self, max_distance: int = 7) -> None:
        self.max_distance = max_distance
        self._exact: dict[bytes, int] = {}
        self._ids: dict[int, tuple[bytes, int]] = {}
        self._bands: dict[tuple[int, int], set[int]] = {}

    def __len__(self) -> int:
        return len(self._ids)

    @staticmethod
    def _band_keys(sim: int) -> list[tuple[int, int]]:
        unsigned = sim & 0xFFFF_FFFF_FFFF_FFFF
        return [(band, (unsigned >> (8 * band)) & 0xFF) for band in range(8)]

    def add(self, chunk_id: int, key: bytes, sim: int) -> None:
        self._exact.setdefault(key, chunk_id)
        self._ids[chunk_id] = (key, sim)
        for band in self._band_keys(sim):
            self._bands.setdefault(band, set()).add(chunk_id)

    def discard(self, chunk_id: int) -> None:
        found = self._ids.pop(chunk_id, None)
        if found is None:
            return
        key, sim = found
        if self._exact.get(key) == chunk_id:
            del self._exact[key]
        for band in self._band_keys(sim):
            self._bands.get(band, set()).discard(chunk_id)

    def duplicate_of(self, key: bytes, sim: int) -> tuple[str, int] | None:
        """("exact" | "near", the chunk it repeats), or None for a new chunk."""
        if (same := self._exact.get(key)) is not None:
            return "exact", same
        unsigned = sim & 0xFFFF_FFFF_FFFF_FFFF
        for band in self._band_keys(sim):
            for other in self._bands.get(band, ()):
                if ((self._ids[other][1] & 0xFFFF_FFFF_FFFF_FFFF) ^ unsigned).bit_count() <= (
                        self.max_distance):
                    return "near", other
        return None
