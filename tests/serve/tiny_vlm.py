"""A tiny vision-language model for the serving tests: the tiny trained run's language model with
the <|image|> token and a randomly initialised vision tower (spud.model.vision.add_vision) — the
mechanics (placeholders, encoder, prefill, cache, usage) do not need a trained one."""

from __future__ import annotations

import base64
import io

import torch
from PIL import Image, ImageDraw

# 16x16 pixels in 4x4 patches, 2x2 pixel shuffle: 4 tokens per image (the run's context is 64)
VISION = dict(image_size=16, patch_size=4, vit_dim=32, vit_layers=2, vit_heads=2, pixel_shuffle=2)
TOKENS_PER_IMAGE = 4


def make_vlm(run):
    """→ (model, tokenizer) of a VLM on RUN's tokenizer and model config (fixed seed). Every
    weight matrix is redrawn at unit gain: the 3-step run (and a fresh init) answer every prompt
    with the same token, and a test of "the answer follows the image" needs one that does not."""
    from spud.config import VisionConfig
    from spud.model.vision import add_vision
    from spud.runs import choose_model, load_choice

    model, tok, _cfg = load_choice(choose_model(run, "base", None), "cpu")
    tok = tok.with_image_token()
    torch.manual_seed(0)
    vlm = add_vision(model, VisionConfig(**VISION), tok.image_id).eval()
    assert vlm.cfg.vision.tokens_per_image == TOKENS_PER_IMAGE
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in vlm.parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
    return vlm, tok


def vlm_engine(run, **limits):
    from spud.serve.engine import Engine

    model, tok = make_vlm(run)
    engine = Engine(model, tok, model_name="tiny-vlm", **limits)
    engine.start()
    return engine


def picture(kind: str, size: int = 24) -> bytes:
    """Distinct little PNGs: "circle" (red on white), "square" (blue on black), "noise"."""
    if kind == "noise":
        g = torch.Generator().manual_seed(1)
        arr = torch.randint(0, 256, (size, size, 3), generator=g, dtype=torch.uint8).numpy()
        img = Image.fromarray(arr, "RGB")
    else:
        img = Image.new("RGB", (size, size), "white" if kind == "circle" else "black")
        draw = ImageDraw.Draw(img)
        box = (4, 4, size - 4, size - 4)
        draw.ellipse(box, fill="red") if kind == "circle" else draw.rectangle(box, fill="blue")
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def data_url(data: bytes, media: str = "image/png") -> str:
    return f"data:{media};base64," + base64.b64encode(data).decode()


def image_message(text: str, *pngs: bytes) -> dict:
    """A user message with the images first, then the text (the order the vision stages train on)."""
    parts = [{"type": "image_url", "image_url": {"url": data_url(p)}} for p in pngs]
    return {"role": "user", "content": parts + [{"type": "text", "text": text}]}


def save_vlm_run(run, model, tok):
    """Write model + tokenizer as RUN/vlm, the directory `spud vlm RUN` leaves (a checkpoint whose
    config has the vision tower and names the checkpoint it started from)."""
    from spud.config import validate_config
    from spud.train import checkpoint as ckpt_io

    base = ckpt_io.latest_checkpoint(run)
    tree = validate_config(ckpt_io.read_state(base)["config"]).model_dump(mode="json")
    tree["model"] = model.cfg.model_dump(mode="json")
    tree["vlm"].update(base_run=str(run), base_checkpoint=str(base))
    cfg = validate_config(tree)
    out = run / "vlm"
    out.mkdir(exist_ok=True)
    tok.save(out / "tokenizer.json")
    state = {"tokens_seen": 0, "loader": {}, "config": cfg.model_dump(mode="json"),
             "tokenizer_sha256": tok.sha256(), "val": None}
    ckpt_io.save_checkpoint(out, 2, model, None, state, None, keep=1)
    (out / "config.yaml").write_text(cfg.to_yaml())
    return out
