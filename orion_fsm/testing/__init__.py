"""Test utilities: tiny random-weight llama models that ctransformers really loads and runs.

They share the default model's code path (byte-level BPE, ChatML special tokens, GGUF v2 with a
tokenizer.json beside it) and load in milliseconds, so most tests and benchmarks use them.
"""

from __future__ import annotations

import os
import struct
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Final

import numpy as np
import numpy.typing as npt

from orion_fsm.backends._tokenizer import BYTE_TO_UNICODE, UNICODE_TO_BYTE, Tokenizer

__all__ = ["TINY_SPECIAL_TOKENS", "make_tiny_llama_gguf"]

TINY_SPECIAL_TOKENS: Final = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")  # ids 0, 1, 2

# A few English merges so that common words become single tokens, as in a real vocabulary.
_MERGES: Final = (
    ("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("Ġ", "a"), ("e", "r"), ("o", "n"),
    ("Ġ", "s"), ("r", "e"), ("a", "t"), ("e", "n"), ("i", "s"), ("Ġ", "i"), ("Ġi", "s"),
    ("Ġ", "o"), ("Ġo", "f"), ("Ġ", "c"), ("o", "r"), ("a", "n"), ("Ġ", "w"),
)  # fmt: skip
_CONTROL: Final = 3  # gguf.TokenType.CONTROL
_NORMAL: Final = 1  # gguf.TokenType.NORMAL


def _vocabulary(extra_special: Sequence[str] = ()) -> tuple[list[str], list[int], list[str]]:
    """(tokens in GPT-2 spelling, GGUF token types, merges): the same for every tiny model,
    with `extra_special` control tokens appended at the end."""
    tokens = [*TINY_SPECIAL_TOKENS, *(BYTE_TO_UNICODE[b] for b in range(256))]
    tokens += [left + right for left, right in _MERGES]
    types = [_CONTROL] * len(TINY_SPECIAL_TOKENS) + [_NORMAL] * (len(tokens) - 3)
    tokens += extra_special
    types += [_CONTROL] * len(extra_special)
    return tokens, types, [f"{left} {right}" for left, right in _MERGES]


def make_tiny_llama_gguf(
    path: Path,
    *,
    n_layers: int = 2,
    n_embd: int = 64,
    seed: int = 0,
    n_head: int = 4,
    context_length: int = 2048,
    llama_cpp_layout: bool = False,
    tied_embeddings: bool | None = None,
    extra_special_tokens: Sequence[str] = (),
) -> Path:
    """Write a random-weight llama GGUF (v2, f32) at `path` and tokenizer.json beside it.

    Different `n_layers`/`n_embd` give models of different sizes; `seed` picks the weights.
    Greedy generation is deterministic and favours printable ASCII, so text assertions work.
    With `llama_cpp_layout` the file is written the way current llama.cpp converters write
    the default model (GGUF v3, GPT-2-spelled vocabulary, tied embeddings, no scores, no
    tokenizer.json): a fast stand-in for it in conversion tests. `tied_embeddings=False` keeps
    the output matrix in that layout too: what llama.cpp runs in tests (with the embeddings as
    output the greedy text is not printable). `extra_special_tokens` adds control tokens to
    the vocabulary (`<file_sep>`, as SmolLM2 has). Returns `path`.
    """
    import gguf

    if n_embd % n_head or (n_embd // n_head) % 2:
        raise ValueError(f"n_embd={n_embd} must split into {n_head} heads of even size")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tokens, types, merges = _vocabulary(extra_special_tokens)
    n_vocab, n_ff, head_dim = len(tokens), 2 * n_embd, n_embd // n_head
    rng = np.random.default_rng(seed)

    def weights(*shape: int, scale: float) -> npt.NDArray[np.float32]:
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    # A constant embedding feature that the small blocks leave dominant after the final norm;
    # the output matrix reads it to push printable tokens up and everything else down.
    embd = weights(n_vocab, n_embd, scale=0.5)
    embd[:, 0] = 4.0
    output = weights(n_vocab, n_embd, scale=0.3)
    normal = tokens[3:len(tokens) - len(extra_special_tokens)]  # never favour control tokens
    printable = [i for i, t in enumerate(normal, start=3) if _printable(t)]
    output[:, 0] = -1.0
    output[printable, 0] = 1.0

    tensors: dict[str, npt.NDArray[np.float32]] = {
        "token_embd.weight": embd,
        "output_norm.weight": np.ones(n_embd, dtype=np.float32),
    }
    if not (llama_cpp_layout if tied_embeddings is None else tied_embeddings):
        tensors["output.weight"] = output
    proj = 1.0 / np.sqrt(n_embd)
    for i in range(n_layers):
        # numpy shape is (out, in): GGUF stores the dimensions reversed.
        tensors |= {
            f"blk.{i}.attn_norm.weight": np.ones(n_embd, dtype=np.float32),
            f"blk.{i}.attn_q.weight": weights(n_embd, n_embd, scale=proj),
            f"blk.{i}.attn_k.weight": weights(n_embd, n_embd, scale=proj),
            f"blk.{i}.attn_v.weight": weights(n_embd, n_embd, scale=proj),
            f"blk.{i}.attn_output.weight": weights(n_embd, n_embd, scale=0.1 * proj),
            f"blk.{i}.ffn_norm.weight": np.ones(n_embd, dtype=np.float32),
            f"blk.{i}.ffn_gate.weight": weights(n_ff, n_embd, scale=proj),
            f"blk.{i}.ffn_up.weight": weights(n_ff, n_embd, scale=proj),
            f"blk.{i}.ffn_down.weight": weights(n_embd, n_ff, scale=0.1 * proj),
        }

    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        writer = gguf.GGUFWriter(tmp, arch="llama")
        writer.add_name(f"orion-tiny-llama-l{n_layers}-e{n_embd}-s{seed}")
        writer.add_context_length(context_length)
        writer.add_embedding_length(n_embd)
        writer.add_block_count(n_layers)
        writer.add_feed_forward_length(n_ff)
        writer.add_head_count(n_head)
        writer.add_head_count_kv(n_head)
        writer.add_rope_dimension_count(head_dim)
        writer.add_layer_norm_rms_eps(1e-5)
        writer.add_file_type(gguf.LlamaFileType.ALL_F32)
        writer.add_tokenizer_model("gpt2")
        # llama.cpp names GPT-2's pre-tokenizer "gpt-2" and refuses a name it does not know.
        writer.add_tokenizer_pre("gpt-2" if llama_cpp_layout else "gpt2")
        writer.add_token_types(types)
        if llama_cpp_layout:
            writer.add_token_list(tokens)
            writer.add_token_merges(merges)
        else:
            # ctransformers' llama.cpp reads raw bytes, not GPT-2 spelling (see _convert).
            writer.add_token_list([_raw(t, kind) for t, kind in zip(tokens, types, strict=True)])
            writer.add_token_merges(
                [
                    _raw(a, _NORMAL) + b" " + _raw(b, _NORMAL)
                    for a, b in (m.split(" ") for m in merges)
                ]
            )
            writer.add_token_scores([0.0] * n_vocab)
        writer.add_bos_token_id(1)
        writer.add_eos_token_id(2)
        for name, tensor in tensors.items():
            writer.add_tensor(name, tensor)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        if not llama_cpp_layout:
            with open(tmp, "r+b") as f:
                f.seek(4)  # the version follows the 4-byte magic; ctransformers needs 2
                f.write(struct.pack("<I", 2))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise

    if not llama_cpp_layout:
        # Same vocabulary for every tiny model, so several models can share one folder.
        tokenizer = Tokenizer.from_byte_level_bpe(tokens, types, merges, pre="gpt2")
        tokenizer.save(path.parent / "tokenizer.json")
    return path


def _raw(token: str, kind: int) -> bytes:
    if kind != _NORMAL:
        return token.encode()
    return bytes(UNICODE_TO_BYTE[c] for c in token)


def _printable(token: str) -> bool:
    raw = _raw(token, _NORMAL)
    return all(0x20 <= b < 0x7F for b in raw)
