"""`spud vlm RUN` on a tiny run with a chat model: the stages, the checkpoint they leave, exact
resume, bad input, and `spud eval RUN --model vlm --tasks vqa`."""

import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from spud.errors import SpudError
from spud.posttrain.vlm import vlm_cmd
from spud.runs import choose_model, load_model
from spud.train.metrics import read_metrics
from vision_helpers import VLM_OVERRIDES


def run_cli(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "spud", *args], capture_output=True, text=True, timeout=timeout)


def weights(run, step):
    return load_file(run / "checkpoints" / f"step_{step:07d}" / "model.safetensors")


def losses(run):
    return [r["loss"] for r in read_metrics(run / "metrics.jsonl") if r["kind"] == "train"]


def test_spud_vlm_adds_a_vision_tower_and_leaves_a_servable_vlm(chat_run):
    r = run_cli("vlm", str(chat_run), *VLM_OVERRIDES)
    assert r.returncode == 0, r.stderr
    choice = choose_model(chat_run, "vlm")
    assert choice.run == chat_run / "vlm" and choice.step == 4
    model, tok, cfg, _ = load_model(chat_run, model="vlm", device="cpu")
    assert cfg.model.vision is not None and tok.image_id == cfg.model.vision.image_token_id
    assert model.embed.weight.shape[0] == cfg.model.vocab_size > tok.image_id
    assert json.loads((chat_run / "vlm" / "vlm_data.json").read_text())["sources"][1]["source"] == "builtin"

    chat = weights(chat_run / "chat", 5)
    align = weights(chat_run / "vlm" / "align", 3)
    final = weights(chat_run / "vlm", 4)
    lm_keys = [k for k in chat]
    assert lm_keys and all(not k.startswith("vision.") for k in lm_keys)
    for k in lm_keys:  # the align stage trained the vision tower only
        rows = chat[k].shape[0]
        assert torch.equal(align[k][:rows], chat[k]), k
    assert any(k.startswith("vision.encoder.") for k in align)
    assert any(not torch.equal(final[k][:chat[k].shape[0]], chat[k]) for k in lm_keys)  # SFT trains the LM too

    r = run_cli("eval", str(chat_run), "--model", "vlm", "--tasks", "vqa", "--limit", "2", "--decontam-tokens", "0")
    assert r.returncode == 0, r.stderr
    res = json.loads((chat_run / "eval" / "vlm-step_0000004" / "results.json").read_text())
    assert {"vqa/number", "vqa/count", "vqa/bar"} <= set(res["tasks"])
    number = res["tasks"]["vqa/number"]
    assert number["n"] == 2 and number["metric"] == "exact_match"
    assert number["image_overlap"]["checked"] and number["image_overlap"]["overlap"] == 0
    rows = [json.loads(line) for line in (chat_run / "eval" / "vlm-step_0000004" / "vqa_number.jsonl").open()]
    assert len(rows) == 2 and all(r["target"].isdigit() for r in rows)


def test_vqa_on_a_model_without_eyes_is_a_clear_error(chat_run):
    r = run_cli("eval", str(chat_run), "--model", "chat", "--tasks", "vqa", "--limit", "1", "--decontam-tokens", "0")
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "spud vlm" in r.stderr + r.stdout


def test_resumed_vlm_reproduces_the_uninterrupted_run_exactly(chat_run, tmp_path):
    straight = vlm_cmd(str(chat_run), out=str(tmp_path / "straight"), overrides=VLM_OVERRIDES)
    broken = tmp_path / "broken"
    vlm_cmd(str(chat_run), out=str(broken), overrides=VLM_OVERRIDES)
    shutil.rmtree(broken / "checkpoints" / "step_0000004")  # as if it died right after step 2's save
    align_metrics = (broken / "align" / "metrics.jsonl").read_text()
    with pytest.raises(SpudError, match="--resume"):
        vlm_cmd(str(chat_run), out=str(broken), overrides=VLM_OVERRIDES)
    summary = vlm_cmd(str(chat_run), out=str(broken), resume=True)  # settings come from the saved config
    assert "align" not in summary["stages"]  # finished: not run again
    assert (broken / "align" / "metrics.jsonl").read_text() == align_metrics
    assert summary["stages"]["sft"]["step"] == straight["stages"]["sft"]["step"] == 4
    assert losses(broken) == losses(tmp_path / "straight")
    a, b = weights(tmp_path / "straight", 4), weights(broken, 4)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_bad_image_data_fails_before_training_with_file_and_line(chat_run, tmp_path):
    data = tmp_path / "pics.jsonl"
    data.write_text(json.dumps({"messages": [
        {"role": "user", "content": [{"type": "image", "path": "missing.png"}, {"type": "text", "text": "What?"}]},
        {"role": "assistant", "content": "A cat."}]}) + "\n")
    r = run_cli("vlm", str(chat_run), "--data", str(data), *VLM_OVERRIDES)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert f"{data}:1" in r.stderr and "not found" in r.stderr
    assert not (chat_run / "vlm" / "align" / "checkpoints").exists()  # nothing trained on bad input


def test_vlm_needs_a_chat_model(chat_run):
    shutil.rmtree(chat_run / "chat")
    r = run_cli("vlm", str(chat_run), *VLM_OVERRIDES)
    assert r.returncode != 0 and "spud sft" in r.stderr


def test_vlm_without_align_stage_starts_sft_from_the_chat_model(chat_run, tmp_path):
    """vlm.align_steps=0: no align stage or directory; the SFT stage grows the chat model a fresh
    tower itself (as align would) and trains both."""
    out = tmp_path / "noalign"
    overrides = [o for o in VLM_OVERRIDES if not o.startswith("vlm.align_steps")] + [
        "vlm.align_steps=0", "vlm.checkpoint_every=4"]
    summary = vlm_cmd(str(chat_run), out=str(out), overrides=overrides)
    assert list(summary["stages"]) == ["sft"] and not (out / "align").exists()
    final = weights(out, 4)
    chat = weights(chat_run / "chat", 5)
    assert any(k.startswith("vision.encoder.stem.") for k in final)  # the conv stem, trained
    changed = [k for k in chat if not torch.equal(final[k][:chat[k].shape[0]], chat[k])]
    assert changed  # the language model trains in SFT
    assert summary["base_checkpoint"] == str(chat_run / "chat" / "checkpoints" / "step_0000005")


def test_a_stale_vlm_section_in_the_source_config_does_not_override_the_defaults(chat_run, tmp_path):
    """Every saved config holds a full `vlm:` section (the defaults when the chat model was
    made); spud vlm takes today's defaults plus its own overrides, not those."""
    from spud.config import VLMConfig
    from spud.posttrain.vlm import vlm_config

    run = chat_run  # a fresh copy per test
    state_file = run / "chat" / "checkpoints" / "step_0000005" / "state.json"
    state = json.loads(state_file.read_text())
    state["config"]["vlm"] = {**state["config"].get("vlm", {}), "steps": 999, "align_steps": 77}
    state_file.write_text(json.dumps(state))
    cfg = vlm_config(str(run), None, run / "vlm", ["vlm.lr=1e-4"], False)
    assert cfg.vlm.steps == VLMConfig().steps and cfg.vlm.align_steps == VLMConfig().align_steps
    assert cfg.vlm.lr == 1e-4


def test_every_optimizer_group_moves_by_the_vlm_share_of_its_lr(chat_run):
    """The SFT stage's LRs: vlm.lr / the source's train.lr times each of the source's LRs —
    Muon's and an untied embedding's and head's too (at their own pretraining values they would
    undo the chat model)."""
    from spud.posttrain.vlm import stage_config, vlm_config

    cfg = vlm_config(str(chat_run), None, chat_run / "vlm", ["vlm.lr=1e-4"], False)
    src = cfg.train
    assert src.embed_lr is not None and src.head_lr is not None  # the default recipe: untied
    stage = stage_config(cfg, "sft").train
    ratio = 1e-4 / src.lr
    assert stage.lr == pytest.approx(1e-4)
    for key in ("muon_lr", "embed_lr", "head_lr"):
        assert getattr(stage, key) == pytest.approx(ratio * getattr(src, key)), key
