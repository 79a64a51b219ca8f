"""User image chat data for spud vlm: JSONL with local image files or data URLs, parquet with image
bytes; bad records skipped and listed with file:line; packed batches carry their pixels."""

import base64
import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from spud.config import VisionConfig
from spud.data import images
from spud.errors import SpudError
from spud.posttrain import vlm_data
from spud.posttrain.chat_data import ChatSource, Conversation
from spud.tokenizer import Tokenizer

VISION = VisionConfig(image_size=16, patch_size=4, vit_dim=16, vit_layers=1, vit_heads=2)  # 4 tokens


@pytest.fixture(scope="module")
def tok(chat_template_run) -> Tokenizer:
    return Tokenizer.load(chat_template_run / "tokenizer.json").with_image_token()


def png(color=(200, 30, 30), size=(20, 12)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def chat(image_part, question="What colour is it?", answer="red") -> dict:
    return {"messages": [{"role": "user", "content": [image_part, {"type": "text", "text": question}]},
                         {"role": "assistant", "content": answer}]}


def write_jsonl(path, records) -> None:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))


def test_jsonl_reads_local_files_and_data_urls_and_lists_bad_records(tmp_path, tok):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "red.png").write_bytes(png())
    (tmp_path / "img" / "broken.png").write_bytes(b"not an image at all")
    Image.new("L", (7000, 6000)).save(tmp_path / "img" / "huge.png")  # 42 Mpx: over the pixel limit
    url = "data:image/png;base64," + base64.b64encode(png((0, 0, 255))).decode()
    good = [chat({"type": "image", "path": "img/red.png"}) for _ in range(37)]
    good.append(chat({"type": "image_url", "image_url": {"url": url}}, answer="blue"))
    bad = [chat({"type": "image", "path": "img/missing.png"}),      # line 39
           chat({"type": "image", "path": "img/broken.png"}),       # 40
           chat({"type": "image", "path": "img/huge.png"}),         # 41
           "{not json",                                              # 42
           chat({"type": "image_url", "image_url": {"url": "https://example.com/a.png"}})]  # 43
    write_jsonl(tmp_path / "data.jsonl", good + bad)
    src = vlm_data.load_image_source(str(tmp_path / "data.jsonl"), tok, VISION, 160, 0.0, 0.2)
    assert len(src.train) == 38 and src.summary["bad"] == 5
    where = {b["where"]: b["reason"] for b in src.summary["bad_lines"]}
    assert set(where) == {f"{tmp_path / 'data.jsonl'}:{n}" for n in range(39, 44)}
    assert "not found" in where[f"{tmp_path / 'data.jsonl'}:39"]
    assert "not a readable image" in where[f"{tmp_path / 'data.jsonl'}:40"]
    assert "pixels" in where[f"{tmp_path / 'data.jsonl'}:41"]
    assert "not JSON" in where[f"{tmp_path / 'data.jsonl'}:42"]
    assert "no network" in where[f"{tmp_path / 'data.jsonl'}:43"]
    conv = src.train[0]
    assert conv.ids.count(tok.image_id) == VISION.tokens_per_image and len(conv.images) == 1
    # the answer is trained on, the image placeholders and the question are not
    assert all(m == 0 for i, m in zip(conv.ids, conv.mask) if i == tok.image_id)
    assert tok.decode([i for i, m in zip(conv.ids, conv.mask) if m]).startswith("red")


def test_a_file_of_bad_records_is_an_error_naming_lines(tmp_path, tok):
    write_jsonl(tmp_path / "bad.jsonl", [chat({"type": "image", "path": "nope.png"})] * 3)
    with pytest.raises(SpudError, match=r"(?s)bad\.jsonl: 3 of 3 records are bad.*bad\.jsonl:1: .*not found"):
        vlm_data.load_image_source(str(tmp_path / "bad.jsonl"), tok, VISION, 160, 0.0, 0.05)
    with pytest.raises(SpudError, match="not found"):
        vlm_data.load_image_source(str(tmp_path / "absent.jsonl"), tok, VISION, 160, 0.0, 0.05)


def test_parquet_with_image_bytes(tmp_path, tok):
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Colour?"}]},
            {"role": "assistant", "content": "green"}]
    rows = {"messages": [json.dumps(msgs)] * 20 + [json.dumps(msgs)],
            "images": [[{"bytes": png((0, 200, 0)), "path": None}]] * 20 + [[{"bytes": b"junk", "path": None}]]}
    pq.write_table(pa.table(rows), tmp_path / "data.parquet")
    src = vlm_data.load_image_source(f"{tmp_path / 'data.parquet'}:2", tok, VISION, 160, 0.0, 0.1)
    assert src.weight == 2.0 and len(src.train) == 20 and src.summary["bad"] == 1
    assert src.summary["bad_lines"][0]["where"] == f"{tmp_path / 'data.parquet'}:row 20"
    assert isinstance(src.train[0].images[0], bytes)


def test_packed_batches_carry_one_picture_per_placeholder_run(tok):
    pics = vlm_data.builtin_source(tok, "sft", 12, 0, 16, VISION.tokens_per_image, fonts=("default",))
    text_ids, text_mask = tok.render_chat([{"role": "user", "content": "hi"},
                                           {"role": "assistant", "content": "hello"}])
    text = ChatSource("text", 1.0, [Conversation(text_ids, text_mask, "t:1")] * 6)
    loader = vlm_data.ImageChatLoader([pics, text], None, batch_size=3, seq_len=127, seed=0, pad_id=tok.pad_id,
                                      vision_cfg=VISION)
    seen_images = 0
    for _ in range(6):
        x, y, pixels = loader.next_batch()
        placeholders = int((x == tok.image_id).sum())
        assert pixels.shape == (placeholders // VISION.tokens_per_image, 3, 16, 16)
        assert placeholders % VISION.tokens_per_image == 0
        assert not bool((y == tok.image_id).any())  # a placeholder is never a target
        seen_images += len(pixels)
    assert seen_images > 0
    # the pictures come in the order of the placeholders: the first row's first picture is the
    # first conversation packed into it
    loader = vlm_data.ImageChatLoader(None, pics.train, batch_size=1, seq_len=127, seed=0, pad_id=tok.pad_id,
                                      vision_cfg=VISION)
    _, _, pixels = loader.next_batch()
    from spud.model.vision import load_image

    assert torch.equal(pixels[0], load_image(pics.train[0].images[0], VISION))


def test_builtin_conversations_ask_every_question_of_a_picture():
    sample = images.generate(3, 0, size=16, fonts=("default",))[2]  # a counting picture
    answers = [a for _, _, a in sample.qa]
    firsts = set()
    for index in range(1, 40, 2):  # odd: no caption
        msgs = vlm_data.builtin_messages(sample, "sft", index)
        assert [m["role"] for m in msgs] == ["user", "assistant"] * len(sample.qa)
        assert msgs[0]["content"][0] == {"type": "image"}
        got = [m["content"] for m in msgs[1::2]]
        k = answers.index(got[0])  # every question once, in turn from the first one asked
        assert got == answers[k:] + answers[:k]
        firsts.add(got[0])
    # each question is sometimes the first: the eval asks every type as a first question
    assert firsts == set(answers)
    # SFT: every CAPTION_EVERY-th conversation ends with a request for the caption
    index = vlm_data.CAPTION_EVERY
    with_caption = vlm_data.builtin_messages(sample, "sft", index)
    assert with_caption[:-2] == vlm_data.builtin_messages(sample, "align", index)
    assert with_caption[-1]["content"] == sample.caption