"""Tokenizers: a byte-level one for the embedded tiny model, and HF tokenizer.json files.

Torch-free on purpose: the gateway tokenizes text prompts with the served model's
tokenizer and must not load torch or the engine for it. The engine's model loader uses
`load_tokenizer` too, so both ends read a checkpoint's tokenizer the same way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

TINY_MODEL = "tiny"  # the embedded tiny model (byte-level tokenizer)


class Tokenizer(Protocol):
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...

    def decode(self, token_ids: list[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes are ids 0..255; 256 is BOS (prepended by encode), 257 is EOS."""

    bos_token_id = 256
    eos_token_id = 257
    vocab_size = 258

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = list(text.encode("utf-8"))
        return [self.bos_token_id, *ids] if add_special_tokens else ids

    def decode(self, token_ids: list[int]) -> str:
        return bytes(t for t in token_ids if 0 <= t < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """A tokenizer.json read with the `tokenizers` library (special tokens as HF adds them)."""

    def __init__(self, path: str | Path) -> None:
        from tokenizers import Tokenizer as _Tokenizer

        self._tokenizer = _Tokenizer.from_file(str(path))
        self.vocab_size = self._tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        # False for text that already spells its special tokens (a rendered chat template).
        return self._tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, token_ids: list[int]) -> str:
        return self._tokenizer.decode(token_ids, skip_special_tokens=True)


def checkpoint_dir(model: str) -> Path:
    """`model` (anything but "tiny") as an HF checkpoint directory; ValueError if it is not one."""
    path = Path(model)
    if not path.is_dir():
        raise ValueError(f"model {model!r} is neither 'tiny' nor a checkpoint directory")
    return path


def load_tokenizer(model: str) -> Tokenizer:
    """The tokenizer of `model`: "tiny" or an HF checkpoint directory (its tokenizer.json)."""
    if model == TINY_MODEL:
        return ByteTokenizer()
    tokenizer_file = checkpoint_dir(model) / "tokenizer.json"
    if not tokenizer_file.is_file():
        raise ValueError(f"model {model!r}: no tokenizer.json in that directory")
    return HFTokenizer(tokenizer_file)
