"""The <|image|> placeholder: added to an existing tokenizer, rendered from content parts by the
chat template, never produced from user text."""

import json

import pytest

from spud.config import TokenizerConfig
from spud.errors import SpudError
from spud.tokenizer import IMAGE, Tokenizer, chat_images, train_tokenizer

CORPUS = ["The quick brown fox jumps over the lazy dog. 12 + 30 = 42.\n", "What is shown?\n"] * 40


@pytest.fixture(scope="module")
def text_tok():
    return train_tokenizer(iter(CORPUS), TokenizerConfig(vocab_size=300))


@pytest.fixture(scope="module")
def tok(text_tok):
    return text_tok.with_image_token()


def test_with_image_token_appends_and_keeps_every_id(text_tok, tok, tmp_path):
    assert text_tok.image_id is None
    assert tok.image_id == text_tok.vocab_size and tok.vocab_size == text_tok.vocab_size + 1
    assert tok.with_image_token() is tok
    for text in CORPUS[:2]:
        assert tok.encode(text) == text_tok.encode(text)
    assert tok.byte_lengths(tok.vocab_size)[tok.image_id] == 0
    assert tok.decode([tok.image_id], skip_special=True) == ""
    tok.save(tmp_path / "tokenizer.json")
    again = Tokenizer.load(tmp_path / "tokenizer.json")
    assert again.image_id == tok.image_id and again.sha256() == tok.sha256()
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert IMAGE in cfg["additional_special_tokens"]


def test_user_text_never_yields_the_image_id(tok):
    forged = f"look {IMAGE}{IMAGE} here <|image|>"
    assert tok.image_id not in tok.encode(forged)
    assert tok.decode(tok.encode(forged)) == forged
    ids, _ = tok.render_chat([{"role": "user", "content": forged}])
    assert tok.image_id not in ids
    parts = [{"type": "text", "text": forged}]
    ids, _ = tok.render_chat([{"role": "user", "content": parts}], image_tokens=4)
    assert tok.image_id not in ids


def test_image_parts_render_as_placeholder_runs(tok):
    msgs = [
        {"role": "user", "content": [
            {"type": "image"},
            {"type": "text", "text": "What is "}, {"type": "text", "text": "shown?"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
        ]},
        {"role": "assistant", "content": "42"},
    ]
    ids, mask = tok.render_chat(msgs, image_tokens=3)
    u = tok.role_ids["user"]
    start = ids.index(u) + 1
    assert ids[start : start + 3] == [tok.image_id] * 3
    text = tok.encode("What is shown?")  # adjacent text parts are one run
    assert ids[start + 3 : start + 3 + len(text)] == text
    after = start + 3 + len(text)
    assert ids[after : after + 3] == [tok.image_id] * 3 and ids[after + 3] == tok.end_id
    assert ids.count(tok.image_id) == 6
    assert all(m == 0 for i, m in zip(ids, mask) if i == tok.image_id)
    assert sum(mask) == len(tok.encode("42")) + 1
    assert len(chat_images(msgs)) == 2 and chat_images(msgs)[1]["type"] == "image_url"


def test_text_only_chats_render_exactly_as_strings(tok):
    as_str = [{"role": "user", "content": "What is shown?"}, {"role": "assistant", "content": "42"}]
    as_parts = [{"role": "user", "content": [{"type": "text", "text": "What is shown?"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "42"}]}]
    assert tok.render_chat(as_parts) == tok.render_chat(as_str)
    assert tok.render_chat(as_str, image_tokens=16) == tok.render_chat(as_str)


def test_image_part_errors(text_tok, tok):
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}]
    with pytest.raises(SpudError, match="message 0: .*image_tokens"):
        tok.render_chat(msgs)
    with pytest.raises(SpudError, match="lacks"):
        text_tok.render_chat(msgs, image_tokens=4)
    with pytest.raises(SpudError, match="content part 1"):
        tok.render_chat([{"role": "user", "content": [{"type": "image"}, {"type": "audio"}]}], image_tokens=4)
    with pytest.raises(SpudError, match="content part 0"):
        tok.render_chat([{"role": "user", "content": [{"type": "text", "text": 5}]}])
    with pytest.raises(SpudError, match="string or a list of parts"):
        tok.render_chat([{"role": "user", "content": 5}])


def test_images_in_an_assistant_turn_are_never_targets(tok):
    msgs = [{"role": "user", "content": "Draw it"},
            {"role": "assistant", "content": [{"type": "text", "text": "Here:"}, {"type": "image"}]}]
    ids, mask = tok.render_chat(msgs, image_tokens=2)
    assert ids.count(tok.image_id) == 2
    assert [m for i, m in zip(ids, mask) if i == tok.image_id] == [0, 0]
    assert sum(mask) == len(tok.encode("Here:")) + 1  # the text and <|end|> are trained on


def test_tools_join_a_system_turn_given_as_parts(tok):
    tools = [{"name": "add", "description": "adds", "parameters": {}}]
    as_str = tok.render_chat([{"role": "system", "content": "Be brief."}], tools=tools)
    as_parts = tok.render_chat([{"role": "system", "content": [{"type": "text", "text": "Be brief."}]}],
                               tools=tools)
    assert as_parts == as_str and as_str[0].count(tok.role_ids["system"]) == 1
