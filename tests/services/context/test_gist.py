from __future__ import annotations

from pathlib import Path

import anyio
import numpy as np
import pytest

from orion_fsm import ChunkingConfig, ContextStore
from orion_fsm.services.context._gist import gist, plain
from tests.services.context.conftest import ConceptEmbedder, WordTokenizer

CHUNK = """\
   .. versionchanged:: 3.6
      Accepts a :term:`path-like object`.


.. function:: pick(seq, *, k=1)

   Return a random element from the non-empty sequence *seq*.  If *seq* is
   empty, raise :exc:`IndexError`.

.. class:: Shelf(size)

   :noindex:

   A box of ``size`` items, see :func:`~shelves.open_shelf`.
"""


def test_plain_keeps_the_words_that_roles_and_literals_mark() -> None:
    assert plain("See :func:`~random.choice` and ``x + 1``, *seq* or "
                 ":ref:`the guide <guide-label>`.") == (
        "See random.choice and x + 1, seq or the guide.")


def test_gist_lists_each_definition_with_its_first_sentence_after_the_heading() -> None:
    text = gist(":mod:`shelves` --- Boxes > Functions", CHUNK, 1000)
    lines = text.split("\n")
    assert lines[0] == "shelves --- Boxes > Functions"
    assert lines[1] == "pick(seq, *, k=1): Return a random element from the non-empty sequence seq."
    assert lines[2] == "Shelf(size): A box of size items, see shelves.open_shelf."
    # Then the prose, directive lines left out.
    assert lines[3].startswith("Accepts a path-like object. Return a random element")
    assert "versionchanged" not in text and ":noindex:" not in text


def test_gist_is_cut_to_the_limit() -> None:
    assert len(gist("Heading", CHUNK, 50)) == 50
    assert gist("Heading", "Plain words only.", 440) == "Heading\nPlain words only."


@pytest.mark.anyio
async def test_the_store_embeds_the_gist_of_each_chunk(tmp_path: Path) -> None:
    class Recording(ConceptEmbedder):
        def __init__(self) -> None:
            super().__init__()
            self.seen: list[str] = []

        def _vector(self, text: str) -> np.ndarray:
            self.seen.append(text)
            return super()._vector(text)

    embedder = Recording()
    async with await ContextStore.open(
            tmp_path / "s", tokenizer=WordTokenizer(), tokenizer_id="words",
            embeddings=embedder, chunking=ChunkingConfig(max_tokens=400)) as store:
        await store.add("Shelves\n=======\n\n" + CHUNK, name="shelves.rst")
        async with anyio.create_task_group() as tg:
            await tg.start(store.run)
            await store.wait_embedded()
            tg.cancel_scope.cancel()
    assert any(t.startswith("Shelves\npick(seq, *, k=1): Return a random element")
               for t in embedder.seen)
