from __future__ import annotations

import itertools

from orion_fsm import ChunkingConfig
from orion_fsm.services.context._chunker import (
    DuplicateFilter,
    chunk_text,
    detect_format,
    exact_key,
    simhash,
)
from tests.services.context.conftest import WordTokenizer

RST = """\
=========
The title
=========

Intro paragraph one.

Section A
=========

Alpha text here.

Example::

    def f():
        return 1

    print(f())

Subsection A.1
--------------

Deep text.

Section B
=========

Bravo text.
"""

MARKDOWN = """\
# Guide

Intro.

## Install

Run this:

```sh
pip install thing

thing --version
```

## Use

Call it.
"""


def test_format_is_detected_by_suffix_then_content() -> None:
    assert detect_format("x", "doc.rst.txt") == "rst"
    assert detect_format("x", "README.md") == "markdown"
    assert detect_format(MARKDOWN) == "markdown"
    assert detect_format(RST) == "rst"
    assert detect_format("just words\n\nmore words") == "text"


def test_rst_sections_start_chunks_and_carry_their_heading_path() -> None:
    config = ChunkingConfig(max_tokens=200, overlap_tokens=0, min_tokens=1)
    chunks = chunk_text(RST, WordTokenizer(), fmt="rst", config=config)
    headings = [c.heading for c in chunks]
    assert headings == ["The title", "The title > Section A",
                        "The title > Section A > Subsection A.1", "The title > Section B"]
    # The literal block after `::` stays whole, blank line included, with its paragraph.
    assert "def f():\n        return 1\n\n    print(f())" in chunks[1].text
    assert [c.position for c in chunks] == [0, 1, 2, 3]


def test_markdown_fenced_code_is_never_split_at_its_blank_lines() -> None:
    config = ChunkingConfig(max_tokens=200, overlap_tokens=0, min_tokens=1)
    chunks = chunk_text(MARKDOWN, WordTokenizer(), fmt="markdown", config=config)
    install = next(c for c in chunks if c.heading == "Guide > Install")
    assert "```sh\npip install thing\n\nthing --version\n```" in install.text


def test_long_sections_are_cut_within_budget_with_overlap() -> None:
    lines = [f"line {i} " + "word " * 8 for i in range(60)]  # 10 tokens a line
    text = "Heading\n=======\n\n" + "\n".join(lines)
    config = ChunkingConfig(max_tokens=100, overlap_tokens=25, min_tokens=10)
    chunks = chunk_text(text, WordTokenizer(), fmt="rst", config=config)
    assert len(chunks) > 5
    assert all(c.tokens <= 100 for c in chunks)
    tok = WordTokenizer()
    assert all(c.tokens == len(tok.encode(c.text)) for c in chunks)  # counted, not estimated
    for before, after in itertools.pairwise(chunks):
        repeated = [ln for ln in after.text.split("\n") if ln in before.text.split("\n")]
        assert repeated, "each chunk starts with the end of the previous one"
        assert sum(len(ln.split()) for ln in repeated) <= 25
    # Every line of the section is in some chunk.
    assert all(any(ln in c.text for c in chunks) for ln in lines)


def test_small_sections_merge_below_min_tokens() -> None:
    text = "A\n=\n\none two\n\nB\n=\n\nthree four\n"
    config = ChunkingConfig(max_tokens=100, overlap_tokens=0, min_tokens=50)
    chunks = chunk_text(text, WordTokenizer(), fmt="rst", config=config)
    assert len(chunks) == 1 and "three four" in chunks[0].text


def test_exact_key_ignores_case_spacing_and_punctuation() -> None:
    assert exact_key("Hello,  World!") == exact_key("hello world")
    assert exact_key("hello world") != exact_key("world hello")


def test_near_duplicates_are_found_and_distinct_texts_are_not() -> None:
    base = " ".join(f"w{i}" for i in range(300))
    near = base.replace("w150", "changed")
    other = " ".join(f"x{i}" for i in range(300))
    dups = DuplicateFilter()
    dups.add(1, exact_key(base), simhash(base))
    assert dups.duplicate_of(exact_key(base), simhash(base)) == ("exact", 1)
    assert dups.duplicate_of(exact_key(near), simhash(near)) == ("near", 1)
    assert dups.duplicate_of(exact_key(other), simhash(other)) is None
    dups.discard(1)
    assert dups.duplicate_of(exact_key(near), simhash(near)) is None
