"""The built-in pictures (spud.data.images): deterministic, split by construction and by image
hash, readable with PIL's own font alone, and labelled with what is actually drawn."""

import numpy as np
import pytest
from scipy import ndimage

from spud.data import images
from spud.eval.vqa import QUESTION_TYPES, vqa_items

FONTS = ("default",)


def hashes(samples):
    return [images.image_hash(s.image) for s in samples]


def test_generation_is_deterministic_in_the_seed():
    a = images.generate(36, 3, size=32, fonts=FONTS)
    b = images.generate(36, 3, size=32, fonts=FONTS)
    c = images.generate(36, 4, size=32, fonts=FONTS)
    assert hashes(a) == hashes(b)
    assert [s.qa for s in a] == [s.qa for s in b]
    assert hashes(a) != hashes(c)


def test_train_and_held_out_are_disjoint_by_fact_and_by_image_hash():
    train = images.generate(600, 0, size=32, fonts=FONTS)
    held = images.generate(300, 0, held_out=True, size=32, fonts=FONTS)
    assert all(not images.fact_held_out(s.kind, s.fact) for s in train)
    assert all(images.fact_held_out(s.kind, s.fact) for s in held)
    assert not {(s.kind, s.fact) for s in train} & {(s.kind, s.fact) for s in held}
    assert images.check_disjoint(train, held) == 0
    assert images.check_disjoint(train, train[:5]) == 5  # the check itself sees a shared picture


@pytest.mark.parametrize("size", [16, 32, 48])
def test_every_kind_draws_at_each_size_with_only_the_default_font(size):
    samples = images.generate(2 * len(images.KINDS), 1, size=size, fonts=FONTS)
    assert {s.kind for s in samples} == set(images.KINDS)
    for s in samples:
        assert s.image.size == (size, size) and s.image.mode == "RGB"
        assert np.asarray(s.image).std() > 0, f"{s.kind}: blank picture"  # something is drawn
        assert s.caption and s.qa and all(q and a for _, q, a in s.qa)
        assert s.png().startswith(b"\x89PNG")
    with pytest.raises(ValueError, match=">= 16 pixels"):
        images.generate(1, 0, size=8, fonts=FONTS)


def test_count_answers_match_the_shapes_drawn():
    """The label of a counting picture is the number of separate blobs of non-background pixels."""
    samples = [s for s in images.generate(120, 2, size=32, fonts=FONTS) if s.kind == "count"]
    assert len(samples) == 20
    for s in samples:
        px = np.asarray(s.image).astype(int)
        corner = px[0, 0]  # backgrounds are jittered per picture but uniform within one
        bg = np.median(px.reshape(-1, 3), axis=0)
        shapes = np.abs(px - bg).sum(-1) > 60
        _, blobs = ndimage.label(shapes)
        answer = dict((qt, a) for qt, _, a in s.qa)["count"]
        assert blobs == int(answer), (s.caption, blobs, corner)


def test_question_wordings_split_into_training_and_eval_only():
    for qtype in QUESTION_TYPES:
        assert images.wordings(qtype, False), f"{qtype}: no training wording"
        assert images.wordings(qtype, True), f"{qtype}: no eval-only wording"
    eval_only = {tpl for q in QUESTION_TYPES for _, tpl in images.wordings(q, True)}
    train_asked = {q for s in images.generate(300, 0, size=32, fonts=FONTS) for _, q, _ in s.qa}
    templates_seen = {tpl for tpl in eval_only if any(_matches(tpl, q) for q in train_asked)}
    assert not templates_seen, f"training data asks in eval-only wordings: {templates_seen}"
    new = vqa_items(32, 3, 0, new_wordings=True, fonts=FONTS)
    assert all(any(_matches(tpl, it.question) for tpl in eval_only) for it in new)


def _matches(template: str, question: str) -> bool:
    import re

    values = {"shape": list(images.SHAPES), "shapes": list(images.SHAPES.values()),
              "colour": list(images.COLOURS), "most": ["tallest", "shortest"]}
    pattern = re.escape(template)
    for name, words in values.items():
        pattern = pattern.replace(re.escape("{" + name + "}"), "(?:" + "|".join(words) + ")")
    return re.fullmatch(pattern, question) is not None


def test_vqa_items_cover_every_question_type_on_held_out_pictures_only():
    items = vqa_items(32, 4, 0, fonts=FONTS)
    assert [it.qtype for it in items] == [t for t in QUESTION_TYPES for _ in range(4)]
    assert all(images.fact_held_out(it.kind, it.fact) for it in items)


def test_dev_vqa_items_show_training_facts_never_the_evals_pictures():
    # benchmarks/vlm_dev.py tunes on these: training-split facts, so the held-out eval stays unseen
    dev = vqa_items(32, 4, 7919, fonts=FONTS, held_out=False)
    assert [it.qtype for it in dev] == [t for t in QUESTION_TYPES for _ in range(4)]
    assert not any(images.fact_held_out(it.kind, it.fact) for it in dev)
    held = vqa_items(32, 4, 7919, fonts=FONTS)
    assert not {images.image_hash(it.image) for it in dev} & {images.image_hash(it.image) for it in held}
