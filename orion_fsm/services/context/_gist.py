"""What a chunk is about, in the few hundred characters the embedding model reads: its section
path, then each API definition it holds (signature and the first sentence of its description),
then its opening text, with reST markup reduced to the words it marks.
"""

from __future__ import annotations

import re
from typing import Final

__all__ = ["gist", "plain"]

# Directives that define something a user asks about (Sphinx's Python and std domains).
_DEFINITION: Final = re.compile(
    r"^( *)\.\. (?:py:)?(function|method|class|data|attribute|exception|decorator|"
    r"decoratormethod|coroutinefunction|coroutinemethod|classmethod|staticmethod|"
    r"abstractmethod|property|cmdoption|option|envvar|opcode|describe|pdbcommand)::\s*(.*)$")
# `:role:`~a.b``, `:role:`text <target>``: the words a reader sees.
_ROLE: Final = re.compile(r":[\w:+-]+:`[~!]?([^`<]*?)\s*(?:<[^>]*>)?`")
_MARKUP: Final = re.compile(r"``|\*\*|(?<!\w)\*(?=\w)|(?<=\w)\*(?!\w)|`_?|\\(?=\S)")
_DIRECTIVE_LINE: Final = re.compile(r"^ *\.\. [\w:-]+::.*$|^ *:[\w-]+:( .*)?$|^ *\.\. _[^:]+:$",
                                    re.MULTILINE)
_SPACE: Final = re.compile(r"\s+")
_SENTENCE_END: Final = re.compile(r"(?<=[.!?])\s")


def plain(text: str) -> str:
    """reST roles and inline markup reduced to their words, whitespace to single spaces."""
    return _SPACE.sub(" ", _MARKUP.sub("", _ROLE.sub(r"\1", text))).strip()


def _first_sentence(lines: list[str]) -> str:
    """The first sentence of a directive's body (its indented lines, options skipped)."""
    words: list[str] = []
    for line in lines:
        stripped = line.strip()
        if not stripped:
            if words:
                break
            continue
        if stripped.startswith((":", ".. ")) and not words:
            continue  # directive options, nested directives before any prose
        words.append(stripped)
        joined = " ".join(words)
        if _SENTENCE_END.search(joined + " "):
            break
    text = plain(" ".join(words))
    end = _SENTENCE_END.search(text + " ")
    return text[:end.start()] if end else text


def _definitions(text: str) -> list[str]:
    """"signature: first sentence" for each definition in the text, in order."""
    lines = text.split("\n")
    out: list[str] = []
    for at, line in enumerate(lines):
        found = _DEFINITION.match(line)
        if found is None:
            continue
        indent = len(found.group(1))
        body: list[str] = []
        for following in lines[at + 1:]:
            if following.strip() and len(following) - len(following.lstrip()) <= indent:
                break
            body.append(following)
        # A signature keeps its `*args`: only roles are markup there.
        signature = _SPACE.sub(" ", _ROLE.sub(r"\1", found.group(3))).strip()
        sentence = _first_sentence(body)
        out.append(f"{signature}: {sentence}" if sentence else signature)
    return out


def gist(heading: str, text: str, limit: int) -> str:
    """At most `limit` characters saying what the chunk is about: section path, definitions,
    then the chunk's prose from its start (directive lines left out)."""
    parts = [plain(heading), *_definitions(text),
             plain(_DIRECTIVE_LINE.sub("", text))]
    return "\n".join(p for p in parts if p)[:limit]
