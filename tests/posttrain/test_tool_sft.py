"""A tiny SFT on tool-only built-in data (sft.tool_share=1) makes a model that calls the
calculator: with the tool offered, the chat eval's tool split (generation through the serving
engine, the server's tool-call parser) reads well-formed calls from it, where the untrained model
writes none."""

import json

from spud.config import TokenizerConfig, validate_config
from spud.model.registry import build_model
from spud.posttrain import builtin_tools, chat_eval
from spud.posttrain.sft import sft_cmd
from spud.runs import load_model
from spud.runtime import seed_everything
from spud.tokenizer import TOOLS_PREAMBLE, train_tokenizer
from spud.train import checkpoint as ckpt_io

VOCAB = 512


def tool_base_run(run):
    """A random-init base run whose tokenizer has seen the tool text (so a conversation with the
    tool listing fits a 256-token context)."""
    run.mkdir(parents=True)
    recs = builtin_tools.tool_records(300, 0)
    texts = [builtin_tools.record_text(r["messages"]) for r in recs]
    texts += [TOOLS_PREAMBLE + json.dumps(builtin_tools.CALCULATOR)] * 50
    tok = train_tokenizer(iter(texts), TokenizerConfig(vocab_size=VOCAB))
    tok.save(run / "tokenizer.json")
    cfg = validate_config({"model": {"d_model": 64, "n_layers": 1, "n_heads": 2, "max_seq_len": 256,
                                     "vocab_size": VOCAB + 64}, "train": {"lr": 0.002}})
    seed_everything(5)
    state = {"tokens_seen": 0, "loader": {}, "config": cfg.model_dump(mode="json"),
             "tokenizer_sha256": tok.sha256(), "val": None}
    ckpt_io.save_checkpoint(run, 1, build_model(cfg.model), None, state, None, keep=1)
    (run / "config.yaml").write_text(cfg.to_yaml())
    return run


def test_tiny_sft_on_tool_data_makes_the_model_call_the_calculator(tmp_path):
    run = tool_base_run(tmp_path / "base")
    items, direct = chat_eval.tool_items(8), chat_eval.direct_prompts(4)
    model, tok, _, _ = load_model(run, device="cpu")
    before = chat_eval.tool_accuracy(model, tok, items, direct)
    assert before["called"] == 0
    summary = sft_cmd(str(run), ["builtin"], None, [
        "sft.max_steps=30", "sft.micro_batch_size=8", "sft.builtin_conversations=300", "sft.tool_share=1.0",
        "sft.lr=0.01", "sft.warmup_steps=5", "sft.eval_every=1000", "sft.checkpoint_every=1000",
        "sft.val_fraction=0", "train.sample_tokens=4", "train.threads=1"], resume=False)
    assert summary["data"]["tool_conversations"] == 300
    model, tok, _, _ = load_model(run, device="cpu", model="chat")
    after = chat_eval.tool_accuracy(model, tok, items, direct)
    # 30 steps teach the call's form (its arguments are mostly wrong: that needs a real base model)
    assert after["called"] >= 0.5, after["examples"]
    assert after["direct"]["n"] == 4
