"""Chat data: rendering and loss mask, packing, bad-input accounting, built-in data, mixing."""

import json

import numpy as np
import pytest

from spud.data.facts import derivable, extract_facts, fact_held_out
from spud.errors import SpudError
from spud.posttrain import builtin_chat
from spud.posttrain.chat_data import (
    epoch_conversations,
    join,
    load_chat_data,
    parse_data_spec,
    render_many,
)
from spud.posttrain.sft import PackedChatLoader, pack, to_xy
from spud.tokenizer import Tokenizer

CONV = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 plus 3?"},
        {"role": "assistant", "content": "2 + 3 = 5."}, {"role": "user", "content": "Thanks"},
        {"role": "assistant", "content": "You're welcome!"}]


@pytest.fixture(scope="module")
def tok(base_template):
    return Tokenizer.load(base_template / "tokenizer.json")


def write_jsonl(path, lines):
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return path


def load(tok, specs, limit=200, **kw):
    args = {"val_fraction": 0.0, "max_bad_fraction": 0.5, "builtin_count": 50, "seed": 0, **kw}
    return load_chat_data([str(s) for s in specs], tok, limit, **args)


def test_mask_covers_exactly_the_assistant_spans_with_end_markers(tok):
    ids, mask = join(tok, *render_many(tok, [CONV])[0])
    assert (ids, mask) == tuple(map(list, tok.render_chat(CONV)))  # the fast path is render_chat
    trained = [i for i, m in zip(ids, mask) if m]
    expected = []
    for m in CONV:
        if m["role"] == "assistant":
            expected += tok.encode(m["content"]) + [tok.end_id]
    assert trained == expected
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == "2 + 3 = 5.<|end|>You're welcome!<|end|>"
    # role markers, system and user text are never trained
    for i, m in zip(ids, mask):
        if i in tok.role_ids.values() or i == tok.bos_id:
            assert m == 0


def test_packing_whole_conversations_bos_first_targets_masked(tok, tmp_path):
    f = write_jsonl(tmp_path / "c.jsonl", [{"messages": CONV}] * 3 + [{"messages": CONV[1:3]}] * 5)
    (src,) = load(tok, [f])
    window = 2 * len(src.train[0].ids) + 3  # room for two long conversations, not three
    tokens, trained = pack(src.train, window, tok.pad_id)
    assert tokens.shape[1] == window
    for row, tr in zip(tokens, trained):
        assert row[0] == tok.bos_id  # every packed sequence starts with a conversation
        starts = np.flatnonzero(row == tok.bos_id)
        assert len(starts) >= 1
    assert sum(int((r == tok.bos_id).sum()) for r in tokens) == len(src.train)  # nothing dropped
    assert int(trained.sum()) == sum(sum(c.mask) for c in src.train)
    assert (tokens[:, :] == tok.pad_id).any()  # leftover room is padding ...
    x, y = to_xy(tokens, trained)
    assert x.shape == y.shape == (len(tokens), window - 1)
    assert not (y[x == tok.pad_id] >= 0).any()  # ... never a target
    assert torch_equal_targets(x, y, tokens, trained)


def torch_equal_targets(x, y, tokens, trained):
    yy = y.numpy()
    return bool(np.all(yy[trained[:, 1:]] == tokens[:, 1:][trained[:, 1:]])) and bool(
        np.all(yy[~trained[:, 1:]] == -1))


def test_every_bad_input_is_counted_with_file_and_line(tok, tmp_path):
    long_user = " ".join(["word"] * 120)
    lines = [
        {"messages": CONV},                                                              # 1 ok
        "{not json",                                                                     # 2
        {"messages": [{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "x"}]},  # 3
        {"messages": [{"role": "user", "content": "only a question"}]},                  # 4
        {"messages": [{"role": "user", "content": long_user}, {"role": "assistant", "content": "ok"}]},  # 5
        # 6: too long as a whole, fine without its first exchange -> truncated, system kept
        {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": long_user},
                      {"role": "assistant", "content": "a"}, {"role": "user", "content": "q"},
                      {"role": "assistant", "content": "b"}]},
        {"text": "no messages"},                                                         # 7
        {"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "x"}]},  # 8
        {"messages": CONV[1:3]},                                                         # 9 ok
    ]
    f = write_jsonl(tmp_path / "mixed.jsonl", lines)
    (src,) = load(tok, [f], limit=60, max_bad_fraction=0.9)
    s = src.summary
    bad = {b["where"]: b["reason"] for b in s["bad_lines"]}
    assert set(bad) == {f"{f}:{n}" for n in (2, 3, 4, 5, 7, 8)}
    assert "not JSON" in bad[f"{f}:2"]
    assert "unknown role 'robot'" in bad[f"{f}:3"]
    assert "no assistant turn" in bad[f"{f}:4"]
    assert "longer than the context" in bad[f"{f}:5"]
    assert s["bad"] == 6 and s["lines"] == 9
    assert s["truncated"] == 1 and s["truncated_lines"][0]["where"] == f"{f}:6"
    assert s["train_conversations"] == 3
    shortened = next(c for c in src.train if c.where.endswith(":6"))
    text = tok.decode(shortened.ids)
    assert text.startswith("<|bos|><|system|>S<|end|><|user|>q<|end|>")  # system kept, oldest dropped


def test_too_many_bad_lines_is_an_error_naming_file_and_lines(tok, tmp_path):
    f = write_jsonl(tmp_path / "bad.jsonl", [{"messages": CONV}, "oops", "{", {"messages": CONV}])
    with pytest.raises(SpudError) as e:
        load(tok, [f], max_bad_fraction=0.2)
    msg = str(e.value)
    assert "bad.jsonl" in msg and f"{f}:2" in msg and f"{f}:3" in msg and "max_bad_fraction" in msg


def test_builtin_data_is_deterministic_and_keeps_eval_facts_out():
    a, b = builtin_chat.conversations(300, 1), builtin_chat.conversations(300, 1)
    assert a == b and a != builtin_chat.conversations(300, 2)
    roles = {m["role"] for c in a for m in c}
    assert roles == {"system", "user", "assistant"}
    text = json.dumps(a)
    assert "I am Spud" in text and "First " in text  # identity turns and worked steps
    # no conversation states an eval-only fact, though plenty of derivable facts are stated
    facts = [f for c in builtin_chat.conversations(3000, 0) for m in c for f in extract_facts(m["content"])]
    assert sum(derivable(*f) for f in facts) > 2000
    assert not any(fact_held_out(*f) for f in facts)


def test_data_specs_and_weighted_mix(tok, tmp_path):
    assert parse_data_spec("a.jsonl:2") == ("a.jsonl", 2.0)
    assert parse_data_spec("a.jsonl") == ("a.jsonl", 1.0)
    assert parse_data_spec("builtin:0.5") == ("builtin", 0.5)
    with pytest.raises(SpudError):
        parse_data_spec("a.jsonl:0")
    f = write_jsonl(tmp_path / "small.jsonl", [{"messages": CONV}] * 10)
    srcs = load(tok, [f"{f}:3", "builtin:1"], builtin_count=90)
    epoch = epoch_conversations(srcs, 0, 0)
    from_small = sum(c.where.startswith(str(f)) for c in epoch)
    assert len(epoch) == 100 and from_small == 75  # 3:1 of 100, the small file cycled
    assert [c.where for c in epoch] == [c.where for c in epoch_conversations(srcs, 0, 0)]
    assert [c.where for c in epoch] != [c.where for c in epoch_conversations(srcs, 0, 1)]


def test_val_split_is_a_deterministic_hash_split(tok):
    (src,) = load(tok, ["builtin"], builtin_count=400, val_fraction=0.2)
    (again,) = load(tok, ["builtin"], builtin_count=400, val_fraction=0.2)
    assert 30 < len(src.val) < 130
    assert [c.where for c in src.val] == [c.where for c in again.val]


def test_loader_position_is_exact(tok):
    (src,) = load(tok, ["builtin"], limit=64, builtin_count=60)
    a = PackedChatLoader([src], None, 3, 63, seed=0, pad_id=tok.pad_id)
    for _ in range(7):  # crosses epoch boundaries: a small data set has few windows
        a.next_batch()
    b = PackedChatLoader([src], None, 3, 63, seed=0, pad_id=tok.pad_id)
    b.load_state_dict(a.state_dict())
    for _ in range(5):
        (xa, ya), (xb, yb) = a.next_batch(), b.next_batch()
        assert (xa == xb).all() and (ya == yb).all()
        assert xa.dtype == ya.dtype == __import__("torch").int64 and xa.shape == (3, 63)


def test_data_parallel_ranks_split_the_global_batch(tok):
    (src,) = load(tok, ["builtin"], limit=64, builtin_count=120)
    one = PackedChatLoader([src], None, 4, 63, seed=0, pad_id=tok.pad_id)
    r0 = PackedChatLoader([src], None, 2, 63, seed=0, pad_id=tok.pad_id, rank=0, world_size=2)
    r1 = PackedChatLoader([src], None, 2, 63, seed=0, pad_id=tok.pad_id, rank=1, world_size=2)
    for _ in range(3):
        x, _ = one.next_batch()
        assert (x[:2] == r0.next_batch()[0]).all() and (x[2:] == r1.next_batch()[0]).all()


def test_blank_lines_are_counted_apart_from_records(tok, tmp_path):
    f = tmp_path / "blanks.jsonl"
    f.write_text("\n" + json.dumps({"messages": CONV}) + "\n\n   \n" + json.dumps({"messages": CONV[1:3]}) + "\n\n")
    (src,) = load(tok, [f], limit=60, max_bad_fraction=0.0)
    assert (src.summary["lines"], src.summary["blank_lines"], src.summary["bad"]) == (2, 4, 0)
