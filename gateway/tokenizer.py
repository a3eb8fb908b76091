"""Text of a growing token list, for streaming `detokenize` requests.

The tokenizer itself (`services.common.tokenizer.load_tokenizer`) is the served model's,
loaded without torch, the engine or the weights.
"""

from __future__ import annotations

from services.common.tokenizer import Tokenizer


class IncrementalDetokenizer:
    """Text of a growing token list, emitted piece by piece.

    Decodes the whole output each time and emits the new suffix; a trailing U+FFFD
    (an incomplete multi-byte character) is held back until the next token completes it.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self._num_chars_sent = 0

    def push(self, all_token_ids: list[int], is_final: bool = False) -> str:
        text = self._tokenizer.decode(all_token_ids)
        end = len(text)
        if not is_final:
            while end > self._num_chars_sent and text[end - 1] == "\ufffd":
                end -= 1
        piece = text[self._num_chars_sent : end]
        self._num_chars_sent = max(self._num_chars_sent, end)
        return piece
