"""Streaming detokenizer: the concatenated pieces equal the full decode (the oracle), and no
piece ever holds a broken character, for text whose characters are split across tokens."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from _bundles import make_tiny_tokenizer, smollm2_tokenizer  # noqa: F401  (fixture)

from tqedge.runtime.detokenize import REPLACEMENT, StreamingDetokenizer

TEXTS = [
    "Hello, world! How are you today?",
    "Emoji: 😀 🎉 👋 🚀 are fun. 👨‍👩‍👧 family 🇫🇷 flag",
    "東京は日本の首都です。北京是中国的首都。한국어도 있어요.",
    "Ünïcödé àccents: café, naïve, résumé — “quotes” …",
    "  leading spaces\n\nnew lines\tand tabs  ",
]


def _stream(tok, ids):
    d = StreamingDetokenizer(tok)
    pieces = [d.add_token(i) for i in ids]
    pieces.append(d.finalize())
    return pieces, d


def _check(tok, text):
    ids = tok.encode(text, add_special_tokens=False).ids
    pieces, d = _stream(tok, ids)
    full = tok.decode(ids)
    assert "".join(pieces) == full == d.text
    for p in pieces:
        assert REPLACEMENT not in p  # valid text never streams a replacement character
    return ids, pieces


@pytest.mark.parametrize("text", TEXTS)
def test_tiny_bpe_stream_equals_full_decode(text):
    tok = make_tiny_tokenizer()
    ids, pieces = _check(tok, text)
    if any(ord(c) > 0x7FF for c in text):  # characters really were split over tokens
        assert sum(1 for p in pieces if p == "") > 0


@pytest.mark.parametrize("text", TEXTS)
def test_smollm2_stream_equals_full_decode(smollm2_tokenizer, text):
    tok, _ = smollm2_tokenizer
    _check(tok, text)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(list("ab .\néü東京😀🎉👋\u200d한") + ["<|im_end|>"]), max_size=40).map("".join))
def test_any_text_streams_to_its_full_decode(text):
    _check(make_tiny_tokenizer(), text)


def test_held_back_until_character_complete():
    tok = make_tiny_tokenizer()
    ids = tok.encode("东", add_special_tokens=False).ids  # not in the training corpus: byte tokens
    assert len(ids) == 3
    d = StreamingDetokenizer(tok)
    assert [d.add_token(i) for i in ids] == ["", "", "东"]


def test_special_tokens_skipped_and_invalid_bytes_flushed():
    tok = make_tiny_tokenizer()
    end = tok.token_to_id("<|im_end|>")
    lead = tok.encode("东", add_special_tokens=False).ids[0]  # a lone UTF-8 lead byte
    ids = tok.encode("ok", add_special_tokens=False).ids + [end, lead]
    pieces, d = _stream(tok, ids)
    assert "".join(pieces) == tok.decode(ids) == "ok" + REPLACEMENT
    assert "<|im_end|>" not in d.text


def test_reset():
    tok = make_tiny_tokenizer()
    d = StreamingDetokenizer(tok)
    for i in tok.encode("abc", add_special_tokens=False).ids:
        d.add_token(i)
    d.reset()
    assert d.tokens == [] and d.text == "" and d.finalize() == ""
