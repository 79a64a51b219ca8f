"""Detokenizer: streaming text never shows half a character or the start of a stop string."""

from __future__ import annotations

import pytest

from spud.config import TokenizerConfig
from spud.serve.detok import Detokenizer
from spud.tokenizer import train_tokenizer


@pytest.fixture(scope="module")
def tok():
    texts = ["plain ascii words here and there", "stop STOP st op"] * 10
    return train_tokenizer(iter(texts), TokenizerConfig(vocab_size=300, min_frequency=1))


def stream(tok, text, stop=()):
    d = Detokenizer(lambda i: tok.decode(i, skip_special=True), stop)
    pieces = [d.push(t) for t in tok.encode(text)]
    return pieces, d.flush(), d


def test_multibyte_characters_are_held_until_complete(tok):
    text = "日本語 ok é"  # never seen in training: byte tokens, split mid-character
    pieces, tail, _ = stream(tok, text)
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) + tail == text


def test_stop_string_is_cut_and_never_partially_streamed(tok):
    text = "plain words STOP and more"
    pieces, tail, d = stream(tok, text, ["STOP", "zzz"])
    assert d.stopped and tail == ""
    out = "".join(pieces)
    assert out == "plain words "
    sent = ""
    for p in pieces:
        sent += p
        assert out.startswith(sent)
    # the token(s) spelling "STOP" produced no text at all
    stop_at = len(tok.encode("plain words "))
    assert "".join(pieces[stop_at:]) == ""


def test_held_prefix_is_released_when_it_cannot_match(tok):
    pieces, tail, d = stream(tok, "and there STO", ["STOP"])
    assert not d.stopped and "".join(pieces) == "and there " and tail == "STO"
    pieces, tail, d = stream(tok, "st op STOX here", ["STOP"])
    assert "".join(pieces) + tail == "st op STOX here" and not d.stopped


@pytest.mark.parametrize("text", ["日本語 ok é", "plain words STOP and more"])
def test_non_incremental_gives_the_same_text_once_at_the_end(tok, text):
    """Offline batch generation (incremental=False) decodes once at flush: no text per token, and
    the same whole text as streaming; with stop strings it stays incremental (they end generation)."""
    decode = lambda i: tok.decode(i, skip_special=True)  # noqa: E731
    d = Detokenizer(decode, (), incremental=False)
    calls = []
    d._decode = lambda ids: calls.append(1) or decode(ids)
    pieces = [d.push(t) for t in tok.encode(text)]
    assert pieces == [""] * len(pieces) and not calls
    assert d.flush() == text and len(calls) <= 2
    stopping = Detokenizer(decode, ["STOP"], incremental=False)
    out = "".join(stopping.push(t) for t in tok.encode("plain words STOP and more"))
    assert stopping.stopped and out == "plain words "
