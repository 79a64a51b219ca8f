"""SFT as a user runs it: starts from the base checkpoint, exact resume, the chat run directory,
and which model (base or chat) each consumer loads and serves."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file
from sft_helpers import SFT_OVERRIDES

from spud.errors import SpudError
from spud.posttrain.sft import SFTTrainer, sft_cmd, sft_config
from spud.runs import load_model
from spud.train.metrics import read_metrics


def losses(run):
    return [(r["step"], r["loss"]) for r in read_metrics(run / "metrics.jsonl") if r["kind"] == "train"]


def test_sft_starts_from_the_base_checkpoint_not_random_init(base_run):
    out = base_run / "chat"
    cfg = sft_config(base_run, ["builtin"], out, SFT_OVERRIDES, resume=False)
    assert cfg.sft.base_checkpoint.endswith("step_0000007")
    assert cfg.train.lr == pytest.approx(0.3 * 0.002)  # default: 0.3 × the base run's LR
    base_train = json.loads((base_run / "checkpoints" / "step_0000007" / "state.json").read_text())[
        "config"]["train"]
    # Muon's matrices, the untied embedding and the head too (each its own pretraining LR)
    assert base_train["embed_lr"] == pytest.approx(5 * 0.002) and base_train["head_lr"] == pytest.approx(0.001)
    for key in ("muon_lr", "embed_lr", "head_lr"):
        assert getattr(cfg.train, key) == pytest.approx(0.3 * base_train[key]), key
    explicit = sft_config(base_run, ["builtin"], out, [*SFT_OVERRIDES, "sft.lr=0.001"], resume=False)
    for key in ("muon_lr", "embed_lr", "head_lr"):  # sft.lr / base lr = 0.5
        assert getattr(explicit.train, key) == pytest.approx(0.5 * base_train[key]), key
    assert cfg.train.max_steps == 8 and cfg.train.warmup_steps == 10 and cfg.train.schedule == "cosine"
    trainer = SFTTrainer(cfg, out)
    base = load_file(base_run / "checkpoints" / "step_0000007" / "model.safetensors")
    state = trainer.model.state_dict()
    assert all(torch.equal(base[k], state[k]) for k in base)


def test_sft_cmd_run_directory_and_default_chat_checkpoint(base_run):
    summary = sft_cmd(str(base_run), ["builtin"], None, SFT_OVERRIDES, resume=False)
    out = base_run / "chat"
    assert summary["out"] == str(out) and summary["step"] == 8
    for name in ("config.yaml", "tokenizer.json", "metrics.jsonl", "sft_data.json"):
        assert (out / name).is_file(), name
    assert (out / "checkpoints" / "step_0000008").is_dir()
    data = json.loads((out / "sft_data.json").read_text())
    assert data["train_conversations"] > 0 and data["val_conversations"] > 0 and data["bad"] == 0
    assert summary["val"] and summary["val"][0]["step"] == 0  # val loss on held-out conversations
    assert [s["prompt"] for s in summary["samples"]] == ["What is 12 plus 7?", "Who are you?"]
    # the model is always named: base (the default) is the pretrained run's own checkpoint,
    # chat the SFT one, and a checkpoint number names one of the chosen model's checkpoints
    _, _, _, ckpt = load_model(base_run, device="cpu")
    assert ckpt == base_run / "checkpoints" / "step_0000007"
    _, _, _, ckpt = load_model(base_run, device="cpu", model="chat")
    assert ckpt == out / "checkpoints" / "step_0000008"
    _, _, _, ckpt = load_model(base_run, checkpoint=4, device="cpu", model="chat")
    assert ckpt == out / "checkpoints" / "step_0000004"
    _, _, _, ckpt = load_model(out, device="cpu", model="chat")  # the chat run directory itself
    assert ckpt == out / "checkpoints" / "step_0000008"
    with pytest.raises(SpudError, match="holds a chat model.*--model chat"):
        load_model(out, device="cpu", model="base")
    with pytest.raises(SpudError, match="chat: no checkpoint '?7'?; available: step_0000004, step_0000008"):
        load_model(base_run, checkpoint=7, device="cpu", model="chat")
    # serving: the chat model when there is one, and it is the SFT weights that are served
    from spud.serve.engine import Engine

    chat_weights = load_file(out / "checkpoints" / "step_0000008" / "model.safetensors")
    base_weights = load_file(base_run / "checkpoints" / "step_0000007" / "model.safetensors")
    served = {"default": Engine.from_run(base_run, device="cpu"),
              "base": Engine.from_run(base_run, device="cpu", model="base")}
    assert served["default"].model_kind == "chat" and served["base"].model_kind == "base"
    assert served["default"].checkpoint == str(out / "checkpoints" / "step_0000008")
    assert served["base"].checkpoint == str(base_run / "checkpoints" / "step_0000007")
    assert served["default"].model_name == "base-chat" and served["base"].model_name == "base-base"
    for engine, weights in ((served["default"], chat_weights), (served["base"], base_weights)):
        state = engine.model.state_dict()
        assert all(torch.equal(weights[k], state[k]) for k in weights)
    prompt = torch.tensor([load_model(base_run, device="cpu")[1].render_chat(
        [{"role": "user", "content": "What is 12 plus 7?"}], add_generation_prompt=True)[0]])
    with torch.no_grad():
        chat_logits = served["default"].model(prompt)
        base_logits = served["base"].model(prompt)
    assert (chat_logits - base_logits).abs().max() > 1e-3
    # a second fresh SFT into the same directory is refused rather than overwriting it
    with pytest.raises(SpudError, match="--resume"):
        sft_cmd(str(base_run), ["builtin"], None, SFT_OVERRIDES, resume=False)


def test_resumed_sft_reproduces_the_uninterrupted_losses_exactly(base_run, tmp_path):
    # resume must restore the dropout RNG too, and the run's own seed (its data and their order)
    over = [*SFT_OVERRIDES, "model.dropout=0.1", "seed=5"]
    straight = sft_cmd(str(base_run), ["builtin"], str(tmp_path / "straight"), over, resume=False)
    broken = tmp_path / "broken"
    sft_cmd(str(base_run), ["builtin"], str(broken), over, resume=False)
    shutil.rmtree(broken / "checkpoints" / "step_0000008")  # as if it died right after step 4's save
    # resuming needs neither --data nor the overrides again: they are in the chat run's config
    summary = sft_cmd(str(base_run), None, str(broken), [], resume=True)
    assert summary["step"] == 8 and straight["step"] == 8
    assert losses(broken) == losses(tmp_path / "straight")  # exactly equal floats, steps 1..8
    a = load_file(tmp_path / "straight" / "checkpoints" / "step_0000008" / "model.safetensors")
    b = load_file(broken / "checkpoints" / "step_0000008" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_sft_learns_on_assistant_tokens(base_run, tmp_path):
    """A few dozen steps on one repeated conversation: the loss, which counts assistant tokens
    only, falls a lot (a check that targets and mask line up, not of model quality)."""
    f = tmp_path / "one.jsonl"
    conv = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! I am Spud."}]}
    f.write_text((json.dumps(conv) + "\n") * 20)
    over = ["sft.max_steps=30", "sft.micro_batch_size=2", "sft.val_fraction=0", "sft.lr=0.02",
            "sft.warmup_steps=2", "train.threads=1", "train.sample_tokens=4"]
    summary = sft_cmd(str(base_run), [str(f)], str(tmp_path / "c"), over, resume=False)
    ls = [v for _, v in losses(tmp_path / "c")]
    assert summary["step"] == 30 and ls[-1] < 0.3 * ls[0]
