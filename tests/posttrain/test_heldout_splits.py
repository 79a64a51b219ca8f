"""Held out by construction: the wording partition, the held-out facts, the chat eval's splits
(sizes, digits, wordings, facts) and the column-step answers the splits are scored against."""

import re

import pytest

from spud.data import templates
from spud.data.facts import derivable, extract_facts, fact_held_out, number_words, words_to_digits
from spud.posttrain import builtin_chat
from spud.posttrain.chat_eval import MAX_TOKENS, SPLITS, eval_items, final_number


def test_wording_partition_is_disjoint_with_exact_sizes():
    sizes = {}
    for op in "+-*/":
        train, held = templates.ask_templates(op, False), templates.ask_templates(op, True)
        assert {i for i, _ in train}.isdisjoint(i for i, _ in held)
        assert len(train) + len(held) == len(templates.ASK[op])
        assert len({t for _, t in templates.ASK[op]}) == len(templates.ASK[op])  # no duplicate wording
        sizes[op] = (len(train), len(held))
    assert sizes == {"+": (21, 7), "-": (19, 5), "*": (12, 4), "/": (13, 1)}
    assert [i for i, _ in templates.ask_templates("+", True)] == ["p02", "p04", "p05", "p14", "p15", "p23", "p24"]
    assert (len(templates.distractors(False)), len(templates.distractors(True))) == (15, 5)
    assert (len(templates.story_distractors(False)), len(templates.story_distractors(True))) == (7, 5)
    held_stories = templates.story_templates(True)
    assert [(i, k) for i, k, _ in held_stories] == [
        ("h4", "groups_minus"), ("k1", "plus_minus"), ("k3", "plus_minus"), ("s1", "sum3")]
    assert len(templates.story_templates(False)) == len(templates.STORIES) - 4


def test_held_out_facts_are_derivable_only_and_commutative():
    assert sum(fact_held_out("+", a, b) for a in range(100) for b in range(a, 100)) == 340
    assert sum(fact_held_out("-", a, b) for a in range(100) for b in range(a + 1)) == 310
    # table facts are never held out: every column step stays trainable
    assert not any(fact_held_out("+", a, b) for a in range(10) for b in range(10))
    assert not any(fact_held_out("-", a, b) for a in range(20) for b in range(10))
    assert not any(fact_held_out("*", a, b) for a in range(13) for b in range(13))
    assert all(fact_held_out("+", a, b) == fact_held_out("+", b, a) for a in range(100) for b in range(20))
    assert derivable("-", 20, 3) and not derivable("-", 19, 9) and derivable("/", 169, 13)


def test_number_words_round_trip():
    for n in (0, 7, 13, 40, 88, 119, 600, 1000, 40001, 999999):
        assert words_to_digits(number_words(n)) == str(n)
    assert number_words(31) == "thirty-one" and number_words(119) == "one hundred nineteen"
    assert words_to_digits("One hundred and five plus twenty") == "105 plus 20"


def _pattern(template: str) -> re.Pattern:
    parts = re.split(r"\{[ab]\}", template)
    return re.compile("(?:^|[.!] )" + r"(.+?)".join(re.escape(p) for p in parts) + "$")


def test_training_chats_never_use_an_eval_only_wording():
    """Read back from the text itself: no user turn of the SFT data ends in an eval-only wording
    (a distractor may come before it), while every training wording does occur."""
    held = [_pattern(t) for op in "+-*/" for _, t in templates.ask_templates(op, True)]
    asks = [m["content"] for c in builtin_chat.conversations(6000, 0) for m in c if m["role"] == "user"]
    assert not [q for q in asks if any(p.search(q) for p in held)]
    train = [_pattern(t) for op in "+-*/" for _, t in templates.ask_templates(op, False)]
    assert all(any(p.search(q) for q in asks) for p in train)
    held_d = [d.split("{")[0] for _, d in templates.distractors(True)]
    assert not [q for q in asks if any(q.startswith(d) and d for d in held_d)]


@pytest.mark.parametrize("split", list(SPLITS))
def test_eval_splits_have_their_sizes_and_properties(split):
    items = eval_items(split, 100)
    assert len(items) == 100 and len({it.question for it in items}) == 100
    assert items == eval_items(split, 100) and items != eval_items(split, 100, seed=1)
    assert all(it.split == split for it in items)
    for it in items:
        # the facts each question asks are stated in its worked answer, and one is held out
        assert set(it.facts) <= extract_facts(it.reference)
        assert any(fact_held_out(*f) for f in it.facts)
        assert final_number(it.reference) == it.answer
    wording = {it.template.split("+")[0] for it in items}
    if split == "multi_step":
        assert wording <= {i for i, _, _ in templates.story_templates(True)}
        assert all(len(it.facts) == 2 for it in items)
        return
    digits = {"operands": 2, "templates": 2, "three_digit": 3, "out_of_range": 5}[split]
    for it in items:
        (op, a, b), = it.facts
        assert op in "+-" and len(str(max(a, b))) == digits and len(str(min(a, b))) == digits
    held = split == "templates"
    ids = {i for op in "+-" for i, _ in templates.ask_templates(op, held)}
    assert wording <= ids and len(wording) >= (8 if held else 20)
    if held:  # some questions come after an (eval-only) distractor sentence, some in words
        assert sum("+x" in it.template for it in items) >= 15
        assert any(re.search(r"[a-z]+-[a-z]+", it.question) for it in items)
    assert MAX_TOKENS[split] >= 48


def test_column_step_answers():
    assert builtin_chat.answer(31, "+", 88, 119) == "Ones: 1 + 8 = 9. Tens: 3 + 8 = 11. So 31 + 88 = 119."
    assert builtin_chat.answer(502, "-", 78, 424) == (
        "Ones: 12 - 8 = 4, borrow 1. Tens: 9 - 7 = 2, borrow 1. Hundreds: 5 - 1 - 0 = 4. So 502 - 78 = 424.")
    assert builtin_chat.answer(7, "*", 8, 56) == "7 * 8 = 56."
    assert final_number("Ones: 1 + 8 = 9. So 31 + 88 = 119.") == 119
    assert final_number("48 + 7 = 55. The answer is 55.") == 55
    assert final_number("I think 12") == 12 and final_number("no idea") is None
