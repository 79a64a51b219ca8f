"""The vision path: config, image loading, the ViT tower, image embeddings in the sequence
(forward, KV cache, chunked prefill, slots), and turning a text model into a VLM."""

import io

import pytest
import torch
from PIL import Image

from spud.config import ModelConfig, VisionConfig, load_config
from spud.errors import SpudError
from spud.model.transformer import Transformer
from spud.model.vision import add_vision, load_image, pixel_shuffle

IMAGE_ID = 250
# 16×16 pixels, 4×4 patches (16 of them), 2×2 shuffle → 4 tokens per image
VISION = dict(image_size=16, patch_size=4, vit_dim=32, vit_layers=2, vit_heads=2, pixel_shuffle=2,
              image_token_id=IMAGE_ID)


@pytest.fixture
def vlm(tiny):
    def make(**kw):
        return Transformer(tiny(vision={**VISION, **kw})).eval()
    return make


def _prompt(n_images: int, tpi: int = 4, gap: int = 3) -> torch.Tensor:
    """Text ids with n_images runs of tpi placeholders, text between and after them."""
    ids = []
    for _ in range(n_images):
        ids += torch.randint(0, 200, (gap,)).tolist() + [IMAGE_ID] * tpi
    ids += torch.randint(0, 200, (gap,)).tolist()
    return torch.tensor([ids])


# ------------------------------------------------------------------------------ config
def test_config_defaults_and_tokens_per_image():
    v = VisionConfig()
    assert (v.encoder, v.image_size, v.patch_size, v.pixel_shuffle) == ("vit", 32, 4, 2)
    assert v.tokens_per_image == 16
    assert VisionConfig(pixel_shuffle=1).tokens_per_image == 64
    assert ModelConfig().vision is None


@pytest.mark.parametrize("bad, field", [
    (dict(image_size=30), "image_size=30"),
    (dict(pixel_shuffle=3), "pixel_shuffle=3"),
    (dict(vit_dim=30, vit_heads=4), "vit_dim=30"),
    (dict(encoder="hf"), "hf_path"),
    (dict(encoder="vitt"), "did you mean 'vit'"),
    (dict(image_std=[0.5, 0.0, 0.5]), "image_std"),
    (dict(image_mean=[0.5]), "image_mean"),
])
def test_config_errors_name_the_field(bad, field):
    with pytest.raises(ValueError, match=field):
        VisionConfig(**bad)


def test_image_token_id_must_be_in_the_vocabulary(tiny):
    with pytest.raises(ValueError, match="image_token_id=256 is outside the vocabulary"):
        tiny(vision={**VISION, "image_token_id": 256})


def test_config_from_yaml_overrides_names_the_key(tmp_path):
    cfg = load_config(None, ["model.vision.image_size=48", "model.vision.patch_size=8"])
    assert cfg.model.vision.tokens_per_image == 9
    with pytest.raises(SpudError, match="image_size"):
        load_config(None, ["model.vision.image_size=50"])
    with pytest.raises(SpudError, match="image_sise"):
        load_config(None, ["model.vision.image_sise=50"])


# ---------------------------------------------------------------------------- load_image
def _png(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def test_load_image_from_bytes_path_and_pil_agree(tmp_path):
    cfg = VisionConfig(image_size=16)
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    data = _png(img)
    (tmp_path / "a.png").write_bytes(data)
    x = load_image(data, cfg)
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32
    torch.testing.assert_close(load_image(tmp_path / "a.png", cfg), x)
    torch.testing.assert_close(load_image(str(tmp_path / "a.png"), cfg), x)
    torch.testing.assert_close(load_image(img, cfg), x)
    # red → (1 - 0.5) / 0.5 = 1, green and blue → -1
    torch.testing.assert_close(x[:, 8, 8], torch.tensor([1.0, -1.0, -1.0]))


def test_load_image_transparency_on_white_grey_and_palette():
    cfg = VisionConfig(image_size=8)
    clear = load_image(_png(Image.new("RGBA", (8, 8), (0, 0, 0, 0))), cfg)
    torch.testing.assert_close(clear, torch.ones(3, 8, 8))  # white
    grey = load_image(_png(Image.new("L", (8, 8), 0)), cfg)
    torch.testing.assert_close(grey, -torch.ones(3, 8, 8))
    pal = Image.new("P", (8, 8), 0)
    pal.putpalette([0, 0, 255] * 256)
    torch.testing.assert_close(load_image(_png(pal), cfg)[2], torch.ones(8, 8))
    jpeg = load_image(_png(Image.new("RGB", (8, 8), (0, 255, 0)), "JPEG"), cfg)
    assert jpeg[1].mean() > 0.9


def test_load_image_applies_exif_orientation():
    """A phone photo stored sideways with an orientation tag is seen upright."""
    cfg = VisionConfig(image_size=8, pixel_shuffle=1)
    img = Image.new("RGB", (16, 8), (0, 0, 0))
    img.paste((255, 255, 255), (0, 0, 8, 8))  # left half white
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    x = load_image(_jpeg_with_exif(img, exif), cfg)
    # upright, the white half is on top
    assert x[:, :3].mean() > 0.8 and x[:, -3:].mean() < -0.8


def _jpeg_with_exif(img: Image.Image, exif) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif.tobytes())
    return buf.getvalue()


def test_load_image_custom_normalisation():
    cfg = VisionConfig(image_size=8, image_mean=[0.0, 0.0, 0.0], image_std=[1.0, 1.0, 1.0])
    x = load_image(Image.new("RGB", (4, 4), (255, 0, 255)), cfg)
    torch.testing.assert_close(x[:, 0, 0], torch.tensor([1.0, 0.0, 1.0]))


def test_load_image_errors_name_the_source(tmp_path):
    cfg = VisionConfig(image_size=8)
    with pytest.raises(SpudError, match="not a readable image"):
        load_image(b"this is not an image", cfg)
    bad = tmp_path / "broken.png"
    bad.write_bytes(_png(Image.new("RGB", (64, 64)))[:60])
    with pytest.raises(SpudError, match="broken.png"):
        load_image(bad, cfg)
    with pytest.raises(SpudError, match="missing.png: image file not found"):
        load_image(tmp_path / "missing.png", cfg)
    with pytest.raises(SpudError, match="offline"):
        load_image("https://example.com/cat.png", cfg)
    big = _png(Image.new("RGB", (300, 300)))
    with pytest.raises(SpudError, match="pixels"):
        load_image(big, cfg, max_pixels=10_000)
    with pytest.raises(SpudError, match="byte image limit"):
        load_image(big, cfg, max_bytes=100)
    with pytest.raises(SpudError, match="format TIFF is not supported"):
        load_image(_png(Image.new("RGB", (8, 8)), "TIFF"), cfg)
    with pytest.raises(SpudError, match="expected bytes"):
        load_image(123, cfg)
    with pytest.raises(SpudError) as err:  # a data URL passed as a path: a short message
        load_image("data:image/png;base64," + "A" * 100_000, cfg)
    assert len(str(err.value)) < 300


def _png_claiming(width: int, height: int) -> bytes:
    """A 1×1 PNG whose header claims width × height (a decompression bomb's shape)."""
    import struct
    import zlib

    data = _png(Image.new("RGB", (1, 1)))
    ihdr = b"IHDR" + struct.pack(">II", width, height) + data[24:29]
    return data[:12] + ihdr + struct.pack(">I", zlib.crc32(ihdr)) + data[33:]


@pytest.mark.parametrize("side", [8000, 20000])  # over spud's 40 Mpx; over PIL's own bomb limit
def test_load_image_refuses_huge_headers_before_decoding(side):
    with pytest.raises(SpudError, match="pixel"):
        load_image(_png_claiming(side, side), VisionConfig(image_size=8))


# ------------------------------------------------------------------------------ the tower
def test_text_only_model_is_unchanged(tiny):
    """No vision config → no vision module, and exactly the weight names of a text model."""
    model = Transformer(tiny())
    assert not hasattr(model, "vision")
    keys = set(model.state_dict())
    assert not any(k.startswith("vision") for k in keys)
    expected = {"embed.weight", "norm.weight", "lm_head.weight"} | {
        f"blocks.{i}.{k}" for i, block in enumerate(model.blocks) for k in block.state_dict()}
    assert keys == expected
    with pytest.raises(SpudError, match="no vision tower"):
        model.encode_images(torch.zeros(1, 3, 16, 16))
    with pytest.raises(SpudError, match="image_token_id is not set"):
        model(torch.zeros(1, 4, dtype=torch.long), image_embeds=torch.zeros(0, 64))
    # the tower is built after the language model's init: same seed, same language weights
    torch.manual_seed(3)
    text = Transformer(tiny()).state_dict()
    torch.manual_seed(3)
    vlm = Transformer(tiny(vision=VISION)).state_dict()
    for k, v in text.items():
        assert torch.equal(vlm[k], v), k


def test_encode_images_shape_and_weights_under_vision_prefix(vlm):
    model = vlm()
    out = model.encode_images(torch.randn(3, 3, 16, 16))
    assert out.shape == (3, 4, 64)
    vision_keys = [k for k in model.state_dict() if k.startswith("vision.")]
    assert "vision.encoder.pos_embed" in vision_keys and "vision.projector.fc1.weight" in vision_keys
    n_vision = sum(p.numel() for p in model.vision.parameters())
    text = Transformer(model.cfg.model_copy(update={"vision": None}))
    assert model.num_params() == text.num_params() + n_vision
    with pytest.raises(SpudError, match=r"\(N, 3, 16, 16\)"):
        model.encode_images(torch.randn(3, 3, 32, 32))


def test_pixel_shuffle_merges_neighbouring_patches():
    # a 4×4 grid whose channel is the patch index: token 0 holds patches 0, 1, 4, 5 (row-major)
    x = torch.arange(16.0).view(1, 16, 1)
    out = pixel_shuffle(x, 2)
    assert out.shape == (1, 4, 4)
    assert out[0, 0].tolist() == [0, 1, 4, 5] and out[0, 3].tolist() == [10, 11, 14, 15]
    assert pixel_shuffle(x, 1) is x


def test_images_land_only_on_placeholders(vlm):
    """Image rows replace placeholder embeddings in order; text positions before the first
    image are untouched, and a different image changes the positions after it."""
    model = vlm()
    idx = _prompt(2)
    px = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        a = model(idx, images=px)
        emb = model.encode_images(px)
        torch.testing.assert_close(model(idx, image_embeds=emb), a)
        torch.testing.assert_close(model(idx, image_embeds=emb.reshape(-1, 64)), a)
        swapped = model(idx, images=px.flip(0))
        plain = model(idx)
    first = (idx[0] == IMAGE_ID).nonzero()[0].item()
    torch.testing.assert_close(a[:, :first], plain[:, :first])
    assert not torch.allclose(a[:, first:], plain[:, first:])
    assert not torch.allclose(a[:, -1], swapped[:, -1])


def test_placeholder_count_mismatch_is_an_error(vlm):
    model = vlm()
    idx = _prompt(2)
    with pytest.raises(SpudError, match="7 rows but the token ids hold 8"):
        model(idx, image_embeds=torch.zeros(7, 64))
    with pytest.raises(SpudError, match="width 32"):
        model(idx, image_embeds=torch.zeros(8, 32))
    with pytest.raises(SpudError, match="not both"):
        model(idx, images=torch.zeros(2, 3, 16, 16), image_embeds=torch.zeros(8, 64))


def test_gradients_reach_the_tower_and_skip_unused_rows(tiny):
    model = Transformer(tiny(vision=VISION, tie_embeddings=False)).train()
    idx = _prompt(1)
    tgt = idx.roll(-1, 1)
    tgt[idx == IMAGE_ID] = -1
    model(idx, tgt, images=torch.randn(1, 3, 16, 16)).backward()
    for name, p in model.vision.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    # the placeholder's embedding row was replaced at every use, so it gets no gradient
    assert model.embed.weight.grad[IMAGE_ID].abs().sum() == 0
    assert model.embed.weight.grad[idx[0, 0]].abs().sum() > 0


@pytest.mark.parametrize("kw", [{}, dict(pixel_shuffle=1), dict(value_embeds=1)])
def test_kv_cache_decoding_with_images_equals_full_forward(tiny, kw):
    vision = {**VISION, **{k: v for k, v in kw.items() if k == "pixel_shuffle"}}
    extra = {k: v for k, v in kw.items() if k != "pixel_shuffle"}
    model = Transformer(tiny(vision=vision, **extra)).eval()
    tpi = model.cfg.vision.tokens_per_image
    prompt = _prompt(2, tpi)
    idx = torch.cat([prompt, torch.randint(0, 200, (1, 6))], 1)
    px = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        emb = model.encode_images(px)
        full = model(idx, image_embeds=emb)
        cache = model.new_kv_cache(1)
        p = prompt.shape[1]
        steps = [model(idx[:, :p], kv_cache=cache, image_embeds=emb)]
        steps += [model(idx[:, t : t + 1], kv_cache=cache) for t in range(p, idx.shape[1])]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=0)


def test_chunked_prefill_with_image_slices_equals_full_forward(vlm):
    """Chunks cut through an image: each passes only its own placeholders' rows."""
    model = vlm()
    idx = _prompt(2)  # positions 3-6 and 10-13 are images
    with torch.no_grad():
        emb = model.encode_images(torch.randn(2, 3, 16, 16)).reshape(-1, 64)
        full = model(idx, image_embeds=emb)
        cache, used, parts = model.new_kv_cache(1), 0, []
        for a, b in ((0, 5), (5, 12), (12, idx.shape[1])):
            m = int((idx[:, a:b] == IMAGE_ID).sum())
            parts.append(model(idx[:, a:b], kv_cache=cache, image_embeds=emb[used : used + m]))
            used += m
        assert used == emb.shape[0]
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=0)


def test_slot_cache_prefill_with_images_equals_full_forward(vlm):
    """The serving path: two prompts with images in different slots, chunked, then a decode."""
    model = vlm()
    prompts = [_prompt(1), _prompt(2)]
    embs = [model.encode_images(torch.randn(k, 3, 16, 16)).reshape(-1, 64).detach() for k in (1, 2)]
    with torch.no_grad():
        fulls = [model.hidden_states(p, image_embeds=e) for p, e in zip(prompts, embs)]
        cache = model.new_slot_cache(3)
        # slot 2 gets prompt 0 whole; slot 0 gets prompt 1 in two chunks split mid-image
        h0 = model.forward_slots(prompts[0], cache, [2], [0], image_embeds=embs[0])
        cut = 5
        m = int((prompts[1][:, :cut] == IMAGE_ID).sum())
        h1a = model.forward_slots(prompts[1][:, :cut], cache, [0], [0], image_embeds=embs[1][:m])
        h1b = model.forward_slots(prompts[1][:, cut:], cache, [0], [cut], image_embeds=embs[1][m:])
    torch.testing.assert_close(h0, fulls[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.cat([h1a, h1b], 1), fulls[1], atol=1e-5, rtol=0)


# --------------------------------------------------------------------------- add_vision
@pytest.mark.parametrize("kw", [{}, dict(tie_embeddings=False, value_embeds=1)])
def test_add_vision_keeps_text_behaviour_and_grows_the_vocab(tiny, kw):
    text = Transformer(tiny(**kw)).eval()  # vocab 256
    vision = VisionConfig(**{**VISION, "image_token_id": None})
    vlm = add_vision(text, vision, image_id=256).eval()
    assert vlm.cfg.vocab_size == 320 and vlm.cfg.vision.image_token_id == 256
    idx = torch.randint(0, 256, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(vlm(idx)[..., :256], text(idx))
        new_rows = vlm.embed.weight[256:]
    torch.testing.assert_close(new_rows, text.embed.weight.mean(0).expand_as(new_rows))
    same = add_vision(text, vision, image_id=200)  # inside the vocabulary: no growth
    assert same.cfg.vocab_size == 256
    # the config round-trips through JSON (checkpoints store it) and rebuilds the same model
    again = Transformer(ModelConfig.model_validate_json(vlm.cfg.model_dump_json()))
    again.load_state_dict(vlm.state_dict())


def test_vlm_checkpoint_roundtrip_in_the_one_format(vlm, tiny, tmp_path):
    """VLM weights live in the same model.safetensors under `vision.`; a text model built from a
    config without model.vision refuses them with a clear error."""
    from spud.train.checkpoint import load_weights, save_checkpoint

    model = vlm()
    ckpt = save_checkpoint(tmp_path, 5, model, None, {}, None, keep=1)
    again = Transformer(model.cfg)
    load_weights(ckpt, again)
    idx, px = _prompt(1), torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(again.eval()(idx, images=px), model(idx, images=px))
    with pytest.raises(SpudError, match="unexpected.*vision"):
        load_weights(ckpt, Transformer(tiny()))


def test_bf16_model_takes_fp32_pixels(vlm):
    model = vlm().to(torch.bfloat16)
    out = model.encode_images(load_image(Image.new("RGB", (20, 20), (9, 99, 199)), model.cfg.vision)[None])
    assert out.dtype == torch.bfloat16 and out.shape == (1, 4, 64)


def test_bf16_autocast_forward_and_backward(vlm):
    model = vlm().train()
    idx = _prompt(2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(idx, idx.roll(-1, 1), images=torch.randn(2, 3, 16, 16))
    loss.backward()
    enc = model.vision.encoder  # the first layer: the conv stem's (the default) or the patch embedding
    first = enc.stem.net[0] if hasattr(enc, "stem") else enc.patch_embed
    assert torch.isfinite(loss) and first.weight.grad is not None


def test_slot_batch_of_rows_takes_image_rows_in_row_major_order(vlm):
    """One forward_slots call over two rows with images in both: E holds row 0's image rows,
    then row 1's (row-major), and each row equals its own full forward."""
    model = vlm()
    a, b = _prompt(1), _prompt(1)  # same length: 3 + 4 + 3
    ea, eb = (model.encode_images(torch.randn(1, 3, 16, 16)).reshape(-1, 64).detach() for _ in range(2))
    with torch.no_grad():
        full_a, full_b = model.hidden_states(a, image_embeds=ea), model.hidden_states(b, image_embeds=eb)
        cache = model.new_slot_cache(2)
        h = model.forward_slots(torch.cat([a, b]), cache, [1, 0], [0, 0], image_embeds=torch.cat([ea, eb]))
    torch.testing.assert_close(h[0:1], full_a, atol=1e-5, rtol=0)
    torch.testing.assert_close(h[1:2], full_b, atol=1e-5, rtol=0)


def test_ddp_wrap_of_a_vlm_survives_text_only_batches(vlm):
    """spud vlm mixes text-only batches in: the tower then gets no gradient, which plain DDP
    rejects at the next step; the wrap lets DDP find the unused parameters (one process, gloo)."""
    import gc
    import os
    import socket

    import torch.distributed as dist

    from spud.train.distributed import DistEnv, wrap

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=0, world_size=1)
    model = None
    try:
        model = wrap(vlm().train(), DistEnv(parallel="ddp"), torch.device("cpu"), False)
        idx = _prompt(1)
        model(idx, idx, images=torch.randn(1, 3, 16, 16)).backward()
        for _ in range(2):  # text only, twice: the second step is where DDP would raise
            text = torch.randint(0, 200, (2, 12))
            model(text, text).backward()
    finally:
        # The DDP reducer holds the process group: free it while the group is alive. Freed after
        # destroy_process_group (when the test returned), the group's destructor once hung for
        # good joining its gloo threads in a full-suite run (2026-12-05, py-spy: ~ProcessGroupGloo).
        del model
        gc.collect()
        dist.destroy_process_group()
