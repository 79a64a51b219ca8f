"""The tower stage of `spud vlm` (spud.posttrain.vlm_tower) on the tiny run: it learns, it hands
its tower to the next stage, it is reused only while its settings are unchanged, and a tower that
does not fit is a clear error."""

import json

import pytest
import torch
from safetensors.torch import load_file

from spud.errors import SpudError
from spud.model.registry import build_model
from spud.posttrain.vlm import vlm_cmd, vlm_config
from spud.posttrain.vlm_tower import load_tower, train_tower
from spud.ui import make_console
from test_vlm_cli import run_cli, weights
from vision_helpers import VLM_OVERRIDES

# 40 steps of 16 pictures: enough for the tiny tower's answer loss to fall well below its start
TOWER = ["vlm.tower_steps=40", "vlm.tower_batch_size=16", "vlm.tower_lr=3e-3"]


def overrides(*extra):
    return [o for o in VLM_OVERRIDES if not o.startswith("vlm.tower_steps")] + TOWER + list(extra)


def test_the_tower_stage_learns_and_its_tower_is_what_sft_starts_from(chat_run):
    """--tower-steps N: RUN/vlm/tower/ holds the trained tower and its summary, and the SFT stage
    (no align stage here) starts from that tower: with a vanishing vision LR the final VLM's
    tower is still the tower stage's."""
    r = run_cli("vlm", str(chat_run), *overrides("vlm.align_steps=0", "vlm.vision_lr=1e-12",
                                                 "vlm.checkpoint_every=4"), "--tower-steps", "40")
    assert r.returncode == 0, r.stderr
    tower_dir = chat_run / "vlm" / "tower"
    summary = json.loads((tower_dir / "tower.json").read_text())
    assert summary["steps"] == 40 and summary["train_pictures"] == 60
    assert summary["metrics"][-1]["loss"] < 0.7 * summary["first_loss"], summary
    assert set(summary["val_exact"]) >= {"number", "count"}
    assert all(0 <= a <= 1 for a in summary["val_exact"].values())

    tower = load_file(tower_dir / "tower.safetensors")
    final = weights(chat_run / "vlm", 4)
    assert tower and set(f"vision.{k}" for k in tower) <= set(final)
    for k, t in tower.items():
        assert torch.allclose(final[f"vision.{k}"], t, atol=1e-6), k


def test_a_finished_tower_is_reused_only_with_the_same_settings(chat_run, tmp_path):
    console = make_console()
    console.quiet = True
    cfg = vlm_config(str(chat_run), None, tmp_path / "vlm", overrides(), False)
    first = train_tower(cfg, tmp_path / "tower", console)
    assert "reused" not in first and first["weights"].endswith("tower.safetensors")
    again = train_tower(cfg, tmp_path / "tower", console)
    assert again["reused"] and again["fingerprint"] == first["fingerprint"]

    changed = vlm_config(str(chat_run), None, tmp_path / "vlm", overrides("vlm.tower_lr=1e-3"), False)
    redone = train_tower(changed, tmp_path / "tower", console)
    assert "reused" not in redone and redone["fingerprint"] != first["fingerprint"]
    assert json.loads((tmp_path / "tower" / "tower.json").read_text())["lr"] == 1e-3


def test_a_tower_that_does_not_fit_the_model_is_a_clear_error(chat_run, tmp_path):
    cfg = vlm_config(str(chat_run), None, tmp_path / "vlm", overrides(), False)
    model = build_model(cfg.model)
    wrong = {k: torch.zeros(1) for k in model.vision.state_dict()}
    with pytest.raises(SpudError, match="tower.safetensors"):
        load_tower(model, wrong)


def test_the_tower_stage_is_recorded_in_the_vlm_summary(chat_run, tmp_path):
    summary = vlm_cmd(str(chat_run), out=str(tmp_path / "vlm"), overrides=overrides())
    assert list(summary["stages"]) == ["tower", "align", "sft"]
    assert summary["stages"]["tower"]["steps"] == 40


def test_a_frozen_encoder_in_sft_is_exactly_the_tower_stages(chat_run, tmp_path):
    """vlm.sft_encoder=false: the SFT stage trains the projector and the language model only; the
    encoder the tower stage made comes out bit for bit."""
    out = tmp_path / "vlm"
    r = run_cli("vlm", str(chat_run), "--out", str(out),
                *overrides("vlm.align_steps=0", "vlm.sft_encoder=false", "vlm.checkpoint_every=4"))
    assert r.returncode == 0, r.stderr
    tower = load_file(out / "tower" / "tower.safetensors")
    final = weights(out, 4)
    encoder = [k for k in tower if k.startswith("encoder.")]
    assert encoder and all(torch.equal(final[f"vision.{k}"], tower[k]) for k in encoder)
    moved = [k for k in tower if not k.startswith("encoder.") and not torch.equal(final[f"vision.{k}"], tower[k])]
    assert moved, "the projector should still learn"


def test_the_pictures_converted_once_train_the_same_tower(chat_run, tmp_path, monkeypatch):
    """The stage keeps its training pictures as tensors when they fit (PIXEL_CACHE_BYTES); above
    that it converts each step's pictures: the same tower either way."""
    import spud.posttrain.vlm_tower as stage

    console = make_console()
    console.quiet = True
    cfg = vlm_config(str(chat_run), None, tmp_path / "vlm", overrides("vlm.tower_steps=6"), False)
    cached = train_tower(cfg, tmp_path / "cached", console)["state"]
    monkeypatch.setattr(stage, "PIXEL_CACHE_BYTES", 0)
    converted = train_tower(cfg, tmp_path / "converted", console)["state"]
    assert cached.keys() == converted.keys()
    for k in cached:
        assert torch.equal(cached[k], converted[k]), k
