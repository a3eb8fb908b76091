"""A choice's text as its tokens arrive: cut before the first stop string, the stop
never sent, the tokens counted up to the one that completed it."""

from __future__ import annotations

import pytest

from gateway.http_api.text import ChoiceText
from services.common.tokenizer import ByteTokenizer, load_tokenizer
from tests.unit.common.test_tokenizer import build_tokenizer_json


def feed(text: ChoiceText, token_ids: list[int], batches: list[int]) -> list[str]:
    """Push the tokens in batches of the given sizes; returns the pieces sent."""
    pieces, end = [], 0
    for i, size in enumerate(batches):
        end += size
        pieces.append(text.push(token_ids[:end], is_final=i == len(batches) - 1))
    return pieces


def ids(s: str) -> list[int]:
    return list(s.encode())


def test_without_stop_strings_it_is_the_incremental_detokenizer():
    text = ChoiceText(ByteTokenizer())
    assert feed(text, ids("héllo"), [1, 1, 1, 3]) == ["h", "", "é", "llo"]
    assert (text.num_tokens, text.is_stopped) == (6, False)


def test_stop_string_cuts_the_text_and_counts_tokens_up_to_it():
    text = ChoiceText(ByteTokenizer(), stop=("\n\nQ",))
    tokens = ids("the answer.\n\nQ: next")
    pieces = feed(text, tokens, [4, 4, 4, 4, 4])
    assert "".join(pieces) == "the answer."
    # The last len(stop) - 1 = 2 characters wait while they could still begin the stop.
    assert pieces == ["th", "e an", "swer", ".", ""]
    assert (text.num_tokens, text.is_stopped) == (len(ids("the answer.\n\nQ")), True)
    assert text.push(tokens, is_final=True) == ""  # nothing after the stop


def test_first_of_several_stops_wins_and_a_stop_across_batches_is_found():
    text = ChoiceText(ByteTokenizer(), stop=("zz", "b"))
    assert feed(text, ids("aaz" + "zb"), [3, 2]) == ["aa", ""]
    assert (text.num_tokens, text.is_stopped) == (4, True)


def test_held_back_text_is_sent_at_the_end_when_no_stop_came():
    text = ChoiceText(ByteTokenizer(), stop=("xyz",))
    pieces = feed(text, ids("abcxy"), [5, 0])
    assert pieces == ["abc", "xy"]
    assert (text.num_tokens, text.is_stopped) == (5, False)


def test_stop_inside_a_multibyte_character_stream():
    text = ChoiceText(ByteTokenizer(), stop=("é!",))
    assert feed(text, ids("aé!b"), [2, 1, 1, 1]) == ["", "a", "", ""]
    assert (text.num_tokens, text.is_stopped) == (4, True)


def _metaspace_tokenizer(path):
    """A sentencepiece-style (Metaspace: "▁" marks a word start) BPE tokenizer.json,
    whose decode of a slice drops the slice's leading space: what the window handles."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=120, special_tokens=["<unk>"])
    tokenizer.train_from_iterator(["the answer is near, the end is here"] * 20, trainer)
    tokenizer.save(str(path / "tokenizer.json"))


@pytest.mark.parametrize("kind", ["bytes", "byte-level BPE", "metaspace BPE"])
def test_each_tokens_text_is_the_whole_decode_from_a_short_window(kind, tmp_path):
    if kind == "bytes":
        tokenizer = ByteTokenizer()
        token_ids = ids("héllo wörld, the end\n\nQ")
    else:
        (build_tokenizer_json if kind == "byte-level BPE" else _metaspace_tokenizer)(tmp_path)
        tokenizer = load_tokenizer(str(tmp_path))
        token_ids = tokenizer.encode("hello mesh the answer is here, the end")
    text = ChoiceText(tokenizer, stop=("never",))
    for k in range(len(token_ids)):
        assert text._text_through(token_ids, k) == tokenizer.decode(token_ids[: k + 1]), k
