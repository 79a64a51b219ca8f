import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spud.config import TokenizerConfig
from spud.errors import SpudError
from spud.tokenizer import SPECIAL_TOKENS, Tokenizer, train_tokenizer

CORPUS = [
    "The quick brown fox jumps over the lazy dog. 12 + 30 = 42.\n",
    "def add(a, b):\n    return a + b\n",
    "Ünïcødé, 日本語, emoji 😀 and tabs\tand\r\nnewlines.",
] * 40


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    t = train_tokenizer(iter(CORPUS), TokenizerConfig(vocab_size=400))
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    t.save(path)
    return Tokenizer.load(path)


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_roundtrip_any_unicode(tok, s):
    assert tok.decode(tok.encode(s)) == s


def test_special_tokens_and_vocab(tok):
    assert 256 + len(SPECIAL_TOKENS) < tok.vocab_size <= 400
    ids = [tok.backend.token_to_id(t) for t in SPECIAL_TOKENS]
    assert ids == list(range(len(SPECIAL_TOKENS)))
    assert tok.encode("hi", add_bos=True)[0] == tok.bos_id


def test_digits_are_single_tokens(tok):
    pieces = [tok.decode([i]) for i in tok.encode("12345")]
    assert pieces == list("12345")


def test_loads_with_tokenizers_and_transformers(tok, tmp_path):
    tok.save(tmp_path / "tokenizer.json")
    from tokenizers import Tokenizer as Raw

    raw = Raw.from_file(str(tmp_path / "tokenizer.json"))
    text = "The fox 😀 def add(a, b):"
    assert raw.encode(text, add_special_tokens=False).ids == tok.encode(text)
    transformers = pytest.importorskip("transformers")
    hf = transformers.PreTrainedTokenizerFast.from_pretrained(str(tmp_path))
    assert hf.encode(text) == tok.encode(text)
    assert hf.decode(tok.encode(text)) == text
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]
    hf_ids = hf.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
    hf_ids = hf_ids["input_ids"] if isinstance(hf_ids, dict) or hasattr(hf_ids, "keys") else hf_ids
    assert list(hf_ids) == tok.render_chat(msgs, add_generation_prompt=True)[0]


def test_chat_template_masks_assistant_spans(tok):
    msgs = [
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 3+3?"},
        {"role": "assistant", "content": "6"},
    ]
    ids, mask = tok.render_chat(msgs)
    assert len(ids) == len(mask)
    spans = tok.decode([i for i, m in zip(ids, mask) if m])
    assert spans == "4<|end|>6<|end|>"
    assert tok.decode(ids) == "<|bos|><|user|>What is 2+2?<|end|><|assistant|>4<|end|><|user|>And 3+3?<|end|><|assistant|>6<|end|>"
    with pytest.raises(SpudError, match="unknown role 'robot'"):
        tok.render_chat([{"role": "robot", "content": "x"}])


def test_hash_is_stable_and_content_based(tok, tmp_path):
    tok.save(tmp_path / "tokenizer.json")
    assert Tokenizer.load(tmp_path / "tokenizer.json").sha256() == tok.sha256()
    other = train_tokenizer(iter(CORPUS[:3]), TokenizerConfig(vocab_size=300))
    assert other.sha256() != tok.sha256()
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert cfg["bos_token"] == "<|bos|>" and "chat_template" in cfg


def test_bad_tokenizer_file(tmp_path):
    with pytest.raises(SpudError, match="not found"):
        Tokenizer.load(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(SpudError, match="not a valid tokenizer.json"):
        Tokenizer.load(tmp_path / "bad.json")
