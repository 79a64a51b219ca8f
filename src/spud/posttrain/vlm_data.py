"""Image chat data for `spud vlm`: the built-in pictures as conversations, user files (JSONL with
local image paths, or parquet with image bytes), and packed batches that carry their pixels.

A conversation with images renders through the tokenizer's chat template like any other
(`Tokenizer.render_chat(..., image_tokens=T)`: each image part becomes T <|image|> ids, mask 0),
so text and image conversations pack into the same windows, and the text SFT data is mixed in by
the SFT machinery unchanged (spud.posttrain.chat_data.epoch_conversations). A packed batch is
(x, y, pixels): pixels holds the images of x's placeholder runs in row-major order, which is the
order the model scatters them in.

Bad input follows spud.posttrain.chat_data: a record whose image cannot be read, is too large or
is missing is skipped and listed with file:line (a parquet row as file:row N); more bad records
than `max_bad_fraction` of a file is an error, since the file is then not what the user thinks.
"""

from __future__ import annotations

import base64
import binascii
import json
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import torch

from spud.data import images as builtin_images
from spud.errors import SpudError
from spud.posttrain.chat_data import BadLines, ChatSource, Conversation, is_val, parse_data_spec
from spud.posttrain.sft import PackedChatLoader, to_xy
from spud.tokenizer import Tokenizer

CAPTION_EVERY = 4  # SFT: one picture conversation in 4 also asks for its caption


@dataclass
class ImageConversation(Conversation):
    """A rendered conversation plus its images (anything spud.model.vision.load_image takes:
    a PIL image, bytes or a path), in prompt order."""

    images: list = field(default_factory=list)


def _images_of(conv: Conversation) -> list:
    return getattr(conv, "images", [])


def render(tok: Tokenizer, messages: list[dict], tokens_per_image: int, images: list, where: str) -> ImageConversation:
    ids, mask = tok.render_chat(messages, image_tokens=tokens_per_image)
    n = sum(1 for i in ids if i == tok.image_id)
    if n != tokens_per_image * len(images):  # the template and the image list must agree
        raise SpudError(f"{where}: {n // max(tokens_per_image, 1)} image parts but {len(images)} images")
    return ImageConversation(ids, mask, where, images)


# ---------------------------------------------------------------------------------- built in
def builtin_messages(sample: builtin_images.Sample, stage: str, rng_index: int) -> list[dict]:
    """The picture with one of the sample's questions, then its other questions as follow-up turns
    (one encoder pass supervises several short answers). Which question comes first turns with
    `rng_index`: asked always second, "What colour is it?" was never the first question a
    picture got, and the model answered it as it did the first ("cat" for the colour of a red
    number: 41 % colour, 16.5 % shape on held-out pictures whose tower read 98 % and 99 %). In the SFT stage every CAPTION_EVERY-th
    conversation also asks for a description (the caption), so "Describe the image." works.

    The align stage asks the same short questions, not for captions as LLaVA does: a frozen
    language model of demo size has never written sentences like the captions, so their template
    words dominate the loss (measured: align loss stuck near 6 nats over 150 steps) and the
    tower learns a generic soft prompt instead of what is in the picture."""
    msgs: list[dict] = []
    # A hash, not rng_index itself: kinds are drawn round-robin, so rng_index % 2 is the same for
    # every picture of a kind (locate pictures were always asked their shape first: 37 % locate).
    start = zlib.crc32(f"first-question/{rng_index}".encode()) % max(len(sample.qa), 1)
    for i, (_, q, a) in enumerate(sample.qa[start:] + sample.qa[:start]):
        content = [{"type": "image"}, {"type": "text", "text": q}] if i == 0 else q
        msgs += [{"role": "user", "content": content}, {"role": "assistant", "content": a}]
    if stage == "sft" and rng_index % CAPTION_EVERY == 0:
        wording = builtin_images.wordings("caption", False)
        msgs += [{"role": "user", "content": wording[rng_index // CAPTION_EVERY % len(wording)][1]},
                 {"role": "assistant", "content": sample.caption}]
    return msgs


def builtin_source(tok: Tokenizer, stage: str, n: int, seed: int, size: int, tokens_per_image: int,
                   weight: float = 1.0, fonts: tuple[str, ...] | None = None, limit: int | None = None,
                   kinds: tuple[str, ...] = builtin_images.KINDS) -> ChatSource:
    """The generated pictures of the training split (spud.data.images) as one chat source. No
    val part of its own: the held-out pictures are the eval's (spud.eval.vqa). A conversation
    longer than `limit` tokens keeps fewer follow-up questions."""
    samples = builtin_images.generate(n, seed, held_out=False, size=size, fonts=fonts, kinds=tuple(kinds))
    src = ChatSource("builtin-images", weight)
    truncated = 0
    for i, s in enumerate(samples):
        msgs, where = builtin_messages(s, stage, i), f"builtin-images:{i + 1}"
        conv = render(tok, msgs, tokens_per_image, [s.image], where)
        while limit is not None and len(conv.ids) > limit:
            if len(msgs) <= 2:
                raise SpudError(f"{where}: a picture and one question take {len(conv.ids)} tokens, more than "
                                f"the {limit}-token window; raise model.max_seq_len or lower "
                                "model.vision.tokens_per_image (pixel_shuffle, patch_size)")
            msgs, truncated = msgs[:-2], truncated + 1
            conv = render(tok, msgs, tokens_per_image, [s.image], where)
        src.train.append(conv)
    src.summary = {"source": "builtin-images", "weight": weight, "stage": stage, "images": n,
                   "image_size": size, "fonts": list(fonts or builtin_images.available_fonts()),
                   "train_conversations": len(src.train), "val_conversations": 0,
                   "train_tokens": sum(len(c.ids) for c in src.train),
                   "assistant_tokens": sum(sum(c.mask) for c in src.train), "bad": 0,
                   "truncated": truncated}
    return src


# -------------------------------------------------------------------------------- user files
def _check_image(source, vision_cfg, where: str):
    from spud.model.vision import load_image

    try:
        load_image(source, vision_cfg)
    except SpudError as e:
        raise _Bad(f"{where}: {e}") from None
    return source


class _Bad(Exception):
    pass


def _parts(content, where: str) -> list[dict]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list):
        raise _Bad(f"{where}: content is neither a string nor a list of parts")
    return content


def _record(obj, base: Path, row_images: list | None, vision_cfg, where: str) -> tuple[list[dict], list]:
    """A JSON record → (messages for the template, image sources). Image parts: {"type": "image",
    "path": "img/1.png"} (relative to the data file), {"type": "image_url", "image_url": {"url":
    "data:image/png;base64,..."}}, or {"type": "image"} taking the next of the row's `images`
    (parquet)."""
    if not isinstance(obj, dict) or not isinstance(obj.get("messages"), list):
        raise _Bad('not an object with a "messages" list')
    msgs, imgs, next_row = [], [], 0
    for i, m in enumerate(obj["messages"]):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
            raise _Bad(f"message {i}: not a message with role system, user or assistant")
        parts = []
        for j, p in enumerate(_parts(m.get("content"), f"message {i}")):
            kind = p.get("type") if isinstance(p, dict) else None
            if kind == "text" and isinstance(p.get("text"), str):
                parts.append({"type": "text", "text": p["text"]})
                continue
            if kind not in ("image", "image_url") or m["role"] == "assistant":
                raise _Bad(f"message {i} part {j}: expected a text part or (in a user turn) an image part")
            if kind == "image_url":
                url = str((p.get("image_url") or {}).get("url", ""))
                if not url.startswith("data:image/") or ";base64," not in url:
                    raise _Bad(f"message {i} part {j}: only data:image/...;base64 URLs are read (no network)")
                try:
                    src = base64.b64decode(url.split(",", 1)[1], validate=True)
                except (binascii.Error, ValueError):
                    raise _Bad(f"message {i} part {j}: the data URL is not valid base64") from None
            elif p.get("path"):
                src = (base / str(p["path"])).resolve()
                if not src.is_file():
                    raise _Bad(f"message {i} part {j}: image file not found: {src}")
            elif row_images is not None and next_row < len(row_images):
                src, next_row = row_images[next_row], next_row + 1
            else:
                raise _Bad(f"message {i} part {j}: an image part needs a 'path' (or the row's images column)")
            imgs.append(_check_image(src, vision_cfg, f"message {i} part {j}"))
            parts.append({"type": "image"})
        if m["role"] == "assistant":
            msgs.append({"role": "assistant", "content": "".join(p["text"] for p in parts)})
        else:
            msgs.append({"role": m["role"], "content": parts if any(p["type"] == "image" for p in parts)
                         else "".join(p["text"] for p in parts)})
    if not any(m["role"] == "assistant" for m in msgs):
        raise _Bad("no assistant turn")
    return msgs, imgs


def _jsonl_records(path: Path, bad: BadLines):
    with open(path, encoding="utf-8", errors="replace") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line), None
            except json.JSONDecodeError as e:
                bad.add(lineno, f"not JSON ({e.msg})")
                yield lineno, None, None


def _parquet_records(path: Path, bad: BadLines):
    """Rows with `messages` (a JSON string or a list of message structs) and optionally
    `images`: a list of image bytes or of {bytes, path} structs (the Hugging Face Image shape)."""
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for a damaged file
        raise SpudError(f"{path}: not a readable parquet file ({e})") from None
    if "messages" not in table.column_names:
        raise SpudError(f"{path}: no 'messages' column (columns: {', '.join(table.column_names)})")
    has_images = "images" in table.column_names
    for row, rec in enumerate(table.to_pylist()):
        msgs = rec["messages"]
        if isinstance(msgs, str):
            try:
                msgs = json.loads(msgs)
            except json.JSONDecodeError as e:
                bad.add(row, f"messages is not JSON ({e.msg})")
                yield row, None, None
                continue
        imgs = None
        if has_images:
            imgs = [i.get("bytes") if isinstance(i, dict) else i for i in rec["images"] or []]
        yield row, {"messages": msgs}, imgs


def load_image_source(spec: str, tok: Tokenizer, vision_cfg, limit: int, val_fraction: float,
                      max_bad_fraction: float) -> ChatSource:
    """One `--data PATH[:weight]` entry of image chats (.jsonl or .parquet)."""
    path_s, weight = parse_data_spec(spec)
    path = Path(path_s)
    if not path.is_file():
        raise SpudError(f"image chat data file not found: {path}")
    bad, total = BadLines(str(path)), 0
    reader = _parquet_records if path.suffix == ".parquet" else _jsonl_records
    src = ChatSource(str(path), weight)
    where_of = (lambda n: f"{path}:row {n}") if reader is _parquet_records else (lambda n: f"{path}:{n}")
    for n, obj, row_images in reader(path, bad):
        total += 1
        if obj is None:
            continue
        try:
            msgs, imgs = _record(obj, path.parent, row_images, vision_cfg, where_of(n))
            conv = render(tok, msgs, vision_cfg.tokens_per_image, imgs, where_of(n))
        except (_Bad, SpudError) as e:
            bad.add(n, str(e).removeprefix(where_of(n) + ": "))
            continue
        if len(conv.ids) > limit:
            bad.add(n, f"longer than the context ({len(conv.ids)} > {limit} tokens)")
            continue
        key = [{"role": m["role"], "content": m["content"]} for m in msgs]
        (src.val if is_val(key, val_fraction) else src.train).append(conv)
    if reader is _parquet_records:  # BadLines says "file:N"; parquet rows read better as "row N"
        for b in bad.listed:
            b["where"] = b["where"].replace(f"{path}:", f"{path}:row ", 1)
    if total == 0:
        raise SpudError(f"{path}: no records (empty file?)")
    if bad.count / total > max_bad_fraction:
        first = "\n  ".join(f"{b['where']}: {b['reason']}" for b in bad.listed[:5])
        raise SpudError(f"{path}: {bad.count} of {total} records are bad ({bad.count / total:.1%} > "
                        f"vlm.max_bad_fraction={max_bad_fraction}); first bad records:\n  {first}")
    if not src.train:
        raise SpudError(f"{path}: no training conversations left after the held-out split")
    src.summary = {"source": str(path), "weight": weight, "records": total,
                   "train_conversations": len(src.train), "val_conversations": len(src.val),
                   "images": sum(len(c.images) for c in src.train + src.val),
                   "train_tokens": sum(len(c.ids) for c in src.train),
                   "assistant_tokens": sum(sum(c.mask) for c in src.train),
                   "bad": bad.count, "bad_lines": bad.listed, "truncated": 0}
    return src


# ---------------------------------------------------------------------------------- batches
def pack_rows(convs: list[Conversation], window: int) -> list[list[int]]:
    """Which conversations share each window: the greedy order of spud.posttrain.sft.pack."""
    rows, cur, used = [], [], 0
    for i, c in enumerate(convs):
        if cur and used + len(c.ids) > window:
            rows.append(cur)
            cur, used = [], 0
        cur.append(i)
        used += len(c.ids)
    if cur:
        rows.append(cur)
    return rows


class ImageChatLoader(PackedChatLoader):
    """PackedChatLoader whose batches also carry the pixels of their images: (x, y, pixels),
    pixels (M, 3, H, W) for the M images of x in row-major order (M may be 0)."""

    def __init__(self, *args, vision_cfg=None, **kwargs):
        self.vision_cfg = vision_cfg
        super().__init__(*args, **kwargs)

    def _epoch(self, epoch: int):
        if self._cached is None or self._cached[0] != epoch:
            from spud.posttrain.sft import pack

            convs = self.val if self.val is not None else self._epoch_convs(epoch)
            tokens, trained = pack(convs, self.window, self.pad_id)
            row_images = [[img for i in row for img in _images_of(convs[i])]
                          for row in pack_rows(convs, self.window)]
            self._cached = (epoch, tokens, trained, row_images)
        return self._cached[1], self._cached[2]

    def _epoch_convs(self, epoch: int) -> list[Conversation]:
        from spud.posttrain.chat_data import epoch_conversations

        return epoch_conversations(self.sources, self.seed, epoch)

    def next_batch(self):
        from spud.model.vision import load_image

        tokens, trained, idx = self._next_rows()
        row_images = self._cached[3]  # the epoch _next_rows just read
        x, y = to_xy(tokens[idx], trained[idx])
        imgs = [img for i in idx for img in row_images[i]]
        side = self.vision_cfg.image_size
        pixels = (torch.stack([load_image(im, self.vision_cfg) for im in imgs]) if imgs
                  else torch.zeros((0, 3, side, side)))
        return x, y, pixels

