"""A pretrained SigLIP / CLIP vision encoder from a local Hugging Face directory: tiny randomly
initialised models saved with save_pretrained (no network), compared with transformers itself."""

import json
import sys

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from spud.config import ModelConfig, VisionConfig
from spud.errors import SpudError
from spud.model.flops import image_flops, param_counts
from spud.model.transformer import Transformer
from spud.model.vision import image_stats

transformers = pytest.importorskip("transformers")

SHAPE = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
             image_size=16, patch_size=4)


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """{'siglip', 'clip', 'siglip_full'}: (directory, the reference transformers model)."""
    root = tmp_path_factory.mktemp("hf_vision")
    torch.manual_seed(0)
    out = {}
    sig = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**SHAPE)).eval()
    clip = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**SHAPE)).eval()
    full = transformers.SiglipModel(transformers.SiglipConfig(
        vision_config=SHAPE, text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                              num_attention_heads=2, vocab_size=64))).eval()
    for name, model in (("siglip", sig), ("clip", clip), ("siglip_full", full)):
        model.save_pretrained(root / name)
        ref = getattr(model, "vision_model", model)
        out[name] = (root / name, ref)
    return out


def _cfg(path, **kw) -> ModelConfig:
    vision = dict(encoder="hf", hf_path=str(path), image_size=16, patch_size=4, image_token_id=250, **kw)
    return ModelConfig(d_model=64, n_layers=2, n_heads=4, vocab_size=256, max_seq_len=64, vision=vision)


def _reference(ref, pixels, family, layer):
    with torch.no_grad():
        out = ref(pixel_values=pixels, output_hidden_states=True)
    h = out.last_hidden_state if layer == -1 else out.hidden_states[layer]
    return h[:, 1:] if family == "clip" else h  # CLIP's CLS state is not a patch


@pytest.mark.parametrize("name", ["siglip", "clip", "siglip_full"])
@pytest.mark.parametrize("layer", [-1, -2])
def test_encoder_equals_transformers(hf_dirs, name, layer):
    path, ref = hf_dirs[name]
    model = Transformer(_cfg(path, hf_layer=layer)).eval()
    px = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        mine = model.vision.encoder(px)
    torch.testing.assert_close(mine, _reference(ref, px, name.removesuffix("_full"), layer))
    assert model.encode_images(px).shape == (2, 4, 64)  # 16 patches, 2×2 shuffle
    # layers after the one used are not kept (no memory, no FLOPs), nor SigLIP's pooling head
    kept = model.vision.encoder.core.encoder.layers
    assert len(kept) == (2 if layer == -1 else 1)
    assert not any(".head." in k for k in model.state_dict())


def test_checkpoint_roundtrip_and_counts(hf_dirs):
    cfg = _cfg(hf_dirs["siglip"][0])
    model = Transformer(cfg).eval()
    again = Transformer(cfg)
    again.load_state_dict(model.state_dict())
    idx = torch.tensor([[1, 2] + [250] * 4 + [3]])
    px = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(again.eval()(idx, images=px), model(idx, images=px))
    counts = param_counts(cfg)
    assert counts["total"] == model.num_params()
    assert counts["vision"] == sum(p.numel() for p in model.vision.parameters())
    # SigLIP's position table is an nn.Embedding but not a vocabulary table
    assert counts["non_embedding"] == model.num_params(non_embedding=True)
    assert counts["embedding"] == 2 * 256 * 64  # the token table and the (default) untied head


@pytest.mark.parametrize("name", ["siglip", "clip"])
def test_image_flops_match_flop_counter(hf_dirs, name):
    cfg = _cfg(hf_dirs[name][0])
    model = Transformer(cfg)
    px = torch.randn(3, 3, 16, 16)
    with sdpa_kernel(SDPBackend.MATH):
        with FlopCounterMode(display=False) as fwd, torch.no_grad():
            model.encode_images(px)
        with FlopCounterMode(display=False) as train:
            model.encode_images(px).sum().backward()
    expected = image_flops(cfg)
    assert fwd.get_total_flops() == pytest.approx(expected["forward"] * 3, rel=0.01)
    assert train.get_total_flops() == pytest.approx(expected["training"] * 3, rel=0.01)


def test_normalisation_from_the_directory(hf_dirs, tmp_path):
    path, _ = hf_dirs["clip"]
    mean, std = image_stats(VisionConfig(encoder="hf", hf_path=str(path), image_size=16))
    assert mean[0] == pytest.approx(0.4815, abs=1e-4) and std[2] == pytest.approx(0.2758, abs=1e-4)
    sig = tmp_path / "sig"
    sig.mkdir()
    (sig / "config.json").write_text((hf_dirs["siglip"][0] / "config.json").read_text())
    (sig / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.1, 0.2, 0.3],
                                                              "image_std": [0.4, 0.5, 0.6]}))
    assert image_stats(VisionConfig(encoder="hf", hf_path=str(sig))) == ([0.1, 0.2, 0.3], [0.4, 0.5, 0.6])
    # the config's own values win
    forced = VisionConfig(encoder="hf", hf_path=str(sig), image_mean=[0.0] * 3, image_std=[1.0] * 3)
    assert image_stats(forced) == ([0.0] * 3, [1.0] * 3)


def test_hub_names_are_an_offline_error():
    with pytest.raises(SpudError, match=r"offline.*huggingface-cli download google/siglip-base"):
        Transformer(_cfg("google/siglip-base-patch16-224"))


def test_directory_errors(hf_dirs, tmp_path):
    with pytest.raises(SpudError, match="directory not found"):
        Transformer(_cfg(tmp_path / "nowhere"))
    llama = tmp_path / "llama"
    llama.mkdir()
    (llama / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(SpudError, match="'llama' is not a SigLIP or CLIP"):
        Transformer(_cfg(llama))
    path = hf_dirs["siglip"][0]
    with pytest.raises(SpudError, match=r"model.vision.image_size=32 .* set model.vision.image_size=16"):
        Transformer(ModelConfig(vocab_size=256, vision=dict(encoder="hf", hf_path=str(path), image_size=32)))
    with pytest.raises(SpudError, match="hf_layer=-3"):
        Transformer(_cfg(path, hf_layer=-3))


def test_missing_transformers_is_a_clear_error(hf_dirs, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(SpudError, match="pip install"):
        Transformer(_cfg(hf_dirs["siglip"][0]))
