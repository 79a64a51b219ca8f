"""The visual QA eval's pieces: answer normalisation, task specs, and batched greedy decoding with
pictures equal to decoding one question at a time without a KV cache."""

import torch

from spud.config import VisionConfig, validate_config
from spud.eval import vqa
from spud.model.registry import build_model
from spud.model.vision import add_vision, load_image
from spud.tokenizer import Tokenizer
from vision_helpers import FONTS, MODEL


def test_normalise_keeps_the_answer_and_drops_only_decoration():
    assert vqa.normalise(" 47.\nmore") == "47"
    assert vqa.normalise('"Top Left".') == "top left"
    assert vqa.normalise("The number is 47") == "the number is 47"  # not an exact answer


def test_vqa_specs_are_split_from_the_text_tasks():
    assert vqa.split_specs("vqa,arithmetic, vqa_new_wordings") == (["vqa", "vqa_new_wordings"], "arithmetic")
    assert vqa.split_specs("arithmetic") == ([], "arithmetic")


@torch.no_grad()
def test_batched_greedy_answers_equal_one_by_one_full_forward(chat_template_run):
    tok = Tokenizer.load(chat_template_run / "tokenizer.json").with_image_token()
    cfg = validate_config({"model": {**MODEL, "vocab_size": 448}})
    torch.manual_seed(0)
    model = add_vision(build_model(cfg.model), VisionConfig(image_size=16, patch_size=4, vit_dim=16,
                                                            vit_layers=1, vit_heads=2), tok.image_id).eval()
    for name, p in model.named_parameters():  # larger weights: answers that depend on the input
        if ".stem." not in name:  # (x8 through each of the conv stem's 5 layers only adds rounding ties)
            p.mul_(8)
    items = vqa.vqa_items(16, 2, 0, fonts=FONTS)[:10]
    questions, pictures = [it.question for it in items], [it.image for it in items]
    batched = vqa.greedy_answers(model, tok, questions, pictures, max_new_tokens=5, batch=4)
    vcfg = model.cfg.vision
    for q, pic, got in zip(questions, pictures, batched):
        ids = vqa.prompt_ids(tok, q, vcfg.tokens_per_image)
        px = load_image(pic, vcfg)[None]
        new = []
        for _ in range(5):
            nxt = int(model(torch.tensor([ids + new]), images=px)[0, -1].argmax())
            if nxt in (tok.end_id, tok.eos_id, tok.bos_id):  # the engine's end tokens
                break
            new.append(nxt)
        assert tok.decode(new, skip_special=True) == got  # the engine never shows control tokens
    assert len(set(batched)) > 1  # a random model still answers different pictures differently
