"""Text <-> token ids for the backend, with the `tokenizers` library and a model's real vocabulary.

Also owns building a byte-level BPE tokenizer.json from a GGUF vocabulary, and streaming
detokenization that never splits a UTF-8 character.
"""

from __future__ import annotations

import re
import threading
import weakref
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Final

from orion_fsm._exceptions import ModelLoadError
from orion_fsm._files import write_atomically

if TYPE_CHECKING:
    # Imported where a tokenizer is built: `tokenizers` costs ~5 ms of `import orion_fsm`.
    import tokenizers

__all__ = [
    "BYTE_TO_UNICODE",
    "UNICODE_TO_BYTE",
    "IncrementalDecoder",
    "Tokenizer",
]

# GGUF token types (gguf.TokenType); spelled out so this module does not need numpy-heavy gguf.
_GIL_FREE_CHARS: Final = 4096  # longer texts are encoded without holding the GIL
_TOKEN_CONTROL: Final = 3
_TOKEN_USER_DEFINED: Final = 4

# llama.cpp pre-tokenizer names whose regex isolates every digit (`\p{N}` before the GPT-2 regex).
_INDIVIDUAL_DIGIT_PRE: Final = frozenset({"smollm", "starcoder", "refact"})


def _bytes_to_unicode() -> dict[int, str]:
    # GPT-2's reversible map: printable bytes stand for themselves, the rest move to U+0100.. so
    # every byte-level BPE token is a printable string.
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    mapping = {b: chr(b) for b in printable}
    shift = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + shift)
            shift += 1
    return mapping


BYTE_TO_UNICODE: Final[Mapping[int, str]] = _bytes_to_unicode()
UNICODE_TO_BYTE: Final[Mapping[str, int]] = {c: b for b, c in BYTE_TO_UNICODE.items()}


# Parsed tokenizers by (file, inode, size, mtime): shared while a model holds one (a Tokenizer is
# never changed once built, and `tokenizers` encodes from several threads at once).
_PARSED: weakref.WeakValueDictionary[tuple[str, int, int, int], Tokenizer] = (
    weakref.WeakValueDictionary())
_PARSED_LOCK = threading.Lock()


class Tokenizer:
    """A model's tokenizer. Special tokens written in text (`<|im_start|>`) encode to their ids."""

    # weakref: grammar caches key on it
    __slots__ = ("__weakref__", "_backend", "_special_ids", "_special_text", "special_tokens")

    def __init__(self, backend: tokenizers.Tokenizer) -> None:
        self._backend = backend
        added = backend.get_added_tokens_decoder()
        self._special_ids = frozenset(i for i, tok in added.items() if tok.special)
        # The vocabulary's own special (GGUF control) tokens, as text: written in a prompt,
        # each encodes to its id, whatever the chat template (`<file_sep>`, `<jupyter_code>`).
        self.special_tokens: tuple[str, ...] = tuple(
            sorted({tok.content for tok in added.values() if tok.special and tok.content},
                   key=lambda t: (-len(t), t)))
        self._special_text: re.Pattern[str] | None = None

    def find_special(self, text: str) -> tuple[str, int] | None:
        """The first special token written in `text` and its character offset, or None.

        Literal matching, longest first, as the tokenizer's added-token matcher does: exactly
        the text that `encode` would turn into a special id.
        """
        if not self.special_tokens:
            return None
        if self._special_text is None:
            self._special_text = re.compile("|".join(map(re.escape, self.special_tokens)))
        found = self._special_text.search(text)
        return None if found is None else (found.group(), found.start())

    @classmethod
    def from_file(cls, path: Path) -> Tokenizer:
        """The tokenizer of `path`, parsed once per version of the file while any model uses
        it: `tokenizers` holds the GIL for the whole parse (~0.3 s for SmolLM2's 49k tokens,
        the event loop frozen meanwhile), and a model's prepare and each of its slots ask."""
        import tokenizers  # see TYPE_CHECKING above

        try:
            stat = path.stat()
            version = (str(path.resolve()), stat.st_ino, stat.st_size, stat.st_mtime_ns)
        except OSError:
            version = None  # the parse below reports it
        with _PARSED_LOCK:  # one parse of a file at a time: a second asker waits for it
            if version is not None and (parsed := _PARSED.get(version)) is not None:
                return parsed
            try:
                backend = tokenizers.Tokenizer.from_file(str(path))
            except Exception as exc:  # tokenizers raises plain Exception for I/O and JSON
                raise ModelLoadError(
                    f"cannot read tokenizer {path}: {exc}; delete it and let "
                    "ensure_converted() rebuild it from the model file"
                ) from exc
            parsed = cls(backend)
            if version is not None:
                _PARSED[version] = parsed
            return parsed

    @classmethod
    def from_byte_level_bpe(
        cls,
        tokens: Sequence[str],
        token_types: Sequence[int],
        merges: Sequence[str],
        *,
        pre: str = "gpt2",
    ) -> Tokenizer:
        """Build from a GGUF `gpt2` vocabulary: tokens in GPT-2's byte-to-unicode spelling.

        `token_types` are GGUF token types (control tokens become special tokens); `merges` are
        "left right" strings; `pre` is `tokenizer.ggml.pre`, which decides digit splitting.
        """
        import tokenizers  # see TYPE_CHECKING above
        from tokenizers import AddedToken, decoders, models, pre_tokenizers

        vocab = {tok: i for i, tok in enumerate(tokens)}
        pairs = [(left, right) for left, _, right in (m.partition(" ") for m in merges)]
        backend = tokenizers.Tokenizer(
            models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=False)
        )
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        if pre in _INDIVIDUAL_DIGIT_PRE:
            backend.pre_tokenizer = pre_tokenizers.Sequence(
                [pre_tokenizers.Digits(individual_digits=True), byte_level]
            )
        else:
            backend.pre_tokenizer = byte_level
        backend.decoder = decoders.ByteLevel()
        # normalized=False: match the literal text, so "<|im_end|>" is never split by the BPE.
        backend.add_special_tokens(
            [
                AddedToken(tok, special=True, normalized=False)
                for tok, kind in zip(tokens, token_types, strict=True)
                if kind == _TOKEN_CONTROL
            ]
        )
        backend.add_tokens(
            [
                AddedToken(tok, special=False, normalized=False)
                for tok, kind in zip(tokens, token_types, strict=True)
                if kind == _TOKEN_USER_DEFINED
            ]
        )
        return cls(backend)

    @classmethod
    def from_sentencepiece_bpe(
        cls, tokens: Sequence[str], scores: Sequence[float], token_types: Sequence[int],
    ) -> Tokenizer:
        """Build from a GGUF `llama` (SentencePiece BPE) vocabulary, such as Gemma's: pieces
        spelled with "▁" for a space, `<0xNN>` byte pieces for what no piece covers.

        SentencePiece merges the adjacent pair whose result scores highest; a BPE whose merge
        ranks follow the scores of the pieces they make does the same. No space is prepended
        (`add_space_prefix` false, as Gemma's files say).
        """
        import tokenizers  # see TYPE_CHECKING above
        from tokenizers import AddedToken, decoders, models, normalizers

        vocab = {tok: i for i, tok in enumerate(tokens)}
        merges: list[tuple[float, int, int, str, str]] = []
        for piece, score in zip(tokens, scores, strict=True):
            for cut in range(1, len(piece)):
                left, right = piece[:cut], piece[cut:]
                if left in vocab and right in vocab:
                    merges.append((-score, vocab[left], vocab[right], left, right))
        merges.sort()
        backend = tokenizers.Tokenizer(models.BPE(
            vocab=vocab, merges=[(left, right) for *_, left, right in merges],
            unk_token="<unk>" if "<unk>" in vocab else None, fuse_unk=True, byte_fallback=True))
        backend.normalizer = normalizers.Replace(" ", "\u2581")
        backend.decoder = decoders.Sequence(
            [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
        backend.add_special_tokens([
            AddedToken(tok, special=True, normalized=False)
            for tok, kind in zip(tokens, token_types, strict=True) if kind == _TOKEN_CONTROL])
        backend.add_tokens([
            AddedToken(tok, special=False, normalized=False)
            for tok, kind in zip(tokens, token_types, strict=True)
            if kind == _TOKEN_USER_DEFINED])
        return cls(backend)

    def save(self, path: Path) -> None:
        """Write tokenizer.json atomically (temp file + rename: readers never see half a file)."""
        write_atomically(path, lambda tmp: self._backend.save(str(tmp), pretty=False))

    def to_json(self) -> str:
        """The tokenizer.json text (what llguidance builds its token masks from)."""
        text: str = self._backend.to_str()
        return text

    def encode(self, text: str) -> list[int]:
        # No BOS/EOS added: prompts are built by the caller (ChatML), which places them itself.
        if len(text) > _GIL_FREE_CHARS:
            # `encode` holds the GIL throughout (200 ms for 40,000 hostile characters: the
            # event loop stalls even when a worker thread calls it); `encode_batch` lets go.
            long: list[int] = self._backend.encode_batch([text], add_special_tokens=False)[0].ids
            return long
        ids: list[int] = self._backend.encode(text, add_special_tokens=False).ids
        return ids

    def decode(self, ids: Sequence[int], *, skip_special: bool = False) -> str:
        text: str = self._backend.decode(list(ids), skip_special_tokens=skip_special)
        return text

    def token_id(self, token: str) -> int | None:
        token_id: int | None = self._backend.token_to_id(token)
        return token_id

    def is_special(self, token_id: int) -> bool:
        return token_id in self._special_ids

    @property
    def vocab_size(self) -> int:
        size: int = self._backend.get_vocab_size(with_added_tokens=True)
        return size


class IncrementalDecoder:
    """Turns a stream of token ids into text deltas, holding back incomplete UTF-8 characters.

    Decodes a short window of recent ids rather than single ids, so decoders that depend on
    context (leading-space rules) give the same text as decoding the whole sequence at once.
    """

    __slots__ = ("_ids", "_prefix", "_read", "_skip_special", "_tokenizer")

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip_special = skip_special
        self._ids: list[int] = []
        self._prefix = 0  # window start: ids already emitted, kept only as decoding context
        self._read = 0  # ids before this index have been emitted

    def push(self, token_id: int) -> str:
        if self._skip_special and self._tokenizer.is_special(token_id):
            return ""
        self._ids.append(token_id)
        emitted = self._tokenizer.decode(self._ids[self._prefix : self._read])
        text = self._tokenizer.decode(self._ids[self._prefix :])
        # U+FFFD at the end means the last token ended inside a multi-byte character: wait.
        if text.endswith("\ufffd") or len(text) <= len(emitted):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return text[len(emitted) :]

    def flush(self) -> str:
        """Emit whatever is held back (an unfinished character decodes as U+FFFD)."""
        emitted = self._tokenizer.decode(self._ids[self._prefix : self._read])
        text = self._tokenizer.decode(self._ids[self._prefix :])
        self._ids.clear()
        self._prefix = self._read = 0
        return text[len(emitted) :]
