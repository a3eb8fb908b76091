"""The text of one choice as its tokens arrive, cut before the first stop string.

Without stop strings this is the gRPC API's IncrementalDetokenizer. With them, each
new token is decoded in turn (so the cut and the token count are exact), and the last
`max(len(stop)) - 1` characters are held back while they could still begin a stop.
Each token's text comes from decoding a short window (the tokens since the last
confirmed boundary, as vLLM's incremental detokenizer does), not the whole output, so a
long choice costs time linear in its length on the gateway's loop:

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
        # decode(ids[:_read]) is _confirmed; the window decoded for each new token
        # starts at _prefix (an earlier boundary, so the first token's text is right).
        self._confirmed = ""
        self._prefix = 0
        self._read = 0

    def push(self, all_token_ids: list[int], is_final: bool = False) -> str:
        """New text once the output is all_token_ids (the tokens so far)."""
        if not self._stop:
            self.num_tokens = len(all_token_ids)
            return self._detokenizer.push(all_token_ids, is_final=is_final)
        if self.is_stopped:
            return ""
        for k in range(self.num_tokens, len(all_token_ids)):
            text = self._text_through(all_token_ids, k)
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

    def _text_through(self, token_ids: list[int], k: int) -> str:
        """decode(token_ids[: k + 1]), from a window: the confirmed text plus what the
        tokens since the last boundary add (held unconfirmed while it ends in U+FFFD)."""
        decode = self._tokenizer.decode
        prefix_text = decode(token_ids[self._prefix : self._read])
        new_text = decode(token_ids[self._prefix : k + 1])
        text = self._confirmed + new_text[len(prefix_text) :]
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            self._confirmed, self._prefix, self._read = text, self._read, k + 1
        return text


def _stable(text: str) -> str:
    """text without a trailing U+FFFD (an incomplete multi-byte character)."""
    return text.rstrip("\ufffd")
