"""The text of one choice as its tokens arrive, cut before the first stop string.

Without stop strings this is the gRPC API's IncrementalDetokenizer. With them, each
new token is decoded in turn (so the cut and the token count are exact), and the last
`max(len(stop)) - 1` characters are held back while they could still begin a stop:

    text:   "... the answer is 42.\\n\\nQ"     stop = ["\\n\\nQ"]
                               ^ cut here: "\\n\\nQ" is never sent, finish_reason "stop",
                                 completion tokens counted up to the one that completed it
"""

from __future__ import annotations

from gateway.tokenizer import IncrementalDetokenizer
from services.common.tokenizer import Tokenizer


class ChoiceText:
    def __init__(self, tokenizer: Tokenizer, stop: tuple[str, ...] = ()) -> None:
        self._tokenizer = tokenizer
        self._stop = stop
        self._detokenizer = IncrementalDetokenizer(tokenizer)
        self._hold = max((len(s) for s in stop), default=1) - 1
        self._text = ""  # decoded text of the tokens counted so far (cut at a stop)
        self._num_chars_sent = 0
        self.num_tokens = 0  # output tokens that count: all of them, or up to the stop
        self.is_stopped = False  # a stop string ended the choice

    def push(self, all_token_ids: list[int], is_final: bool = False) -> str:
        """New text once the output is all_token_ids (the tokens so far)."""
        if not self._stop:
            self.num_tokens = len(all_token_ids)
            return self._detokenizer.push(all_token_ids, is_final=is_final)
        if self.is_stopped:
            return ""
        for k in range(self.num_tokens, len(all_token_ids)):
            text = self._tokenizer.decode(all_token_ids[: k + 1])
            search_from = max(0, len(_stable(self._text)) - self._hold)
            hits = [i for i in (text.find(s, search_from) for s in self._stop) if i >= 0]
            self.num_tokens = k + 1
            self._text = text
            if hits:
                self._text = text[: min(hits)]
                self.is_stopped = True
                break
        end = len(self._text)
        if not (self.is_stopped or is_final):
            end = max(len(_stable(self._text)) - self._hold, 0)
        piece = self._text[self._num_chars_sent : end]
        self._num_chars_sent = max(self._num_chars_sent, end)
        return piece


def _stable(text: str) -> str:
    """text without a trailing U+FFFD (an incomplete multi-byte character)."""
    return text.rstrip("\ufffd")
