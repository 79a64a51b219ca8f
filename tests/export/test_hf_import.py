"""`spud import hf`: Spud exports come back bit-identical; foreign Llama/Qwen3 directories become
runs that serve, evaluate and fine-tune; unsupported inputs are clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from spud.errors import SpudError
from spud.export.hf import export_hf
from spud.export.hf_import import import_hf
from spud.export.source import load_source
from spud.tokenizer import SPECIAL_TOKENS

transformers = pytest.importorskip("transformers")


def files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.name != "README.md"}


@pytest.mark.parametrize("kw,dtype,shard", [
    ({}, "fp32", None),
    ({"qk_norm": True, "n_kv_heads": 2, "tie_embeddings": False}, "bf16", 50_000),
    ({"mlp": "relu2", "qk_norm": True, "head_dim": 8}, "fp32", None),
])
def test_export_import_export_is_bit_identical(run_factory, tmp_path, kw, dtype, shard):
    run = run_factory(**kw)
    first, second = tmp_path / "a", tmp_path / "b"
    export_hf(run, first, dtype=dtype, **({"max_shard_bytes": shard} if shard else {}))
    summary = import_hf(str(first), tmp_path / "imported")
    assert summary["added_tokens"] == [] and summary["grown_rows"] == 0
    export_hf(tmp_path / "imported", second, dtype=dtype, **({"max_shard_bytes": shard} if shard else {}))
    a, b = files(first), files(second)
    assert list(a) == list(b)
    for name in a:
        assert a[name] == b[name], name
    if dtype == "fp32":  # fp32 weights also load back into exactly the original Spud tensors
        src, back = load_source(run), load_source(tmp_path / "imported")
        for k, v in src.model.state_dict().items():
            assert torch.equal(v, back.model.state_dict()[k]), k


def foreign_llama(tmp_path: Path, model_type: str = "llama", vocab: int = 300) -> Path:
    """A tiny transformers model whose tokenizer has none of Spud's control tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    texts = ["the cat sat on the mat", "a dog ran in the park", "1 + 2 = 3"] * 50
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<s>", "</s>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    n = tok.get_vocab_size()
    common = dict(vocab_size=n, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  tie_word_embeddings=False, rms_norm_eps=1e-6)
    if model_type == "llama":
        cfg = transformers.LlamaConfig(**common)
    else:
        cfg = transformers.Qwen3Config(**common, head_dim=16)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    out = tmp_path / f"hf-{model_type}"
    model.save_pretrained(out)
    fast.save_pretrained(out)
    return out


@pytest.mark.parametrize("model_type", ["llama", "qwen3"])
def test_foreign_model_imports_with_spud_control_tokens(tmp_path, model_type):
    src = foreign_llama(tmp_path, model_type)
    peer = transformers.AutoModelForCausalLM.from_pretrained(src).eval()
    n = peer.config.vocab_size
    summary = import_hf(str(src), tmp_path / "run")
    assert summary["added_tokens"] == SPECIAL_TOKENS
    assert summary["grown_rows"] == len(SPECIAL_TOKENS) and summary["vocab_size"] == n + 7
    run = load_source(tmp_path / "run")
    state = json.loads((run.checkpoint / "state.json").read_text())
    assert state["weights_only"] and state["imported_from"] == str(src.resolve())
    x = torch.randint(0, n, (2, 30))
    with torch.no_grad():
        mine = run.model(x)
        # the original vocabulary's logits are unchanged; the new rows are extra columns
        assert (mine[..., :n] - peer(input_ids=x).logits).abs().max().item() <= 1e-4
    emb = run.model.embed.weight.detach()  # new rows start at the mean of the trained ones
    torch.testing.assert_close(emb[n:], emb[:n].mean(0, keepdim=True).expand(len(SPECIAL_TOKENS), -1))
    assert run.tokenizer.encode("the cat") == transformers.AutoTokenizer.from_pretrained(src).encode(
        "the cat", add_special_tokens=False)


def test_imported_run_samples_evaluates_serves_and_fine_tunes(tmp_path):
    """The imported run is a normal run: sample, eval, the serving engine and a short `spud sft`."""
    from spud.cli import main

    src = foreign_llama(tmp_path)
    run = tmp_path / "run"
    assert main(["import", "hf", str(src), "--out", str(run)]) == 0
    assert main(["sample", str(run), "--prompt", "the cat", "--max-tokens", "5"]) == 0
    assert main(["eval", str(run), "--tasks", "mc_arithmetic", "--limit", "2"]) == 0
    assert list((run / "eval").glob("**/results.json"))
    from spud.serve.engine import Engine
    from spud.serve.engine_types import SamplingParams

    engine = Engine.from_run(run, device="cpu")  # what `spud serve` runs
    engine.start()
    try:
        events = list(engine.submit([0, 1, 2], SamplingParams(max_tokens=4, temperature=0.0)))
    finally:
        engine.shutdown()
    assert events
    assert main(["sft", str(run), "sft.max_steps=2", "sft.micro_batch_size=2", "sft.eval_every=2",
                 "sft.builtin_conversations=50", "sft.checkpoint_every=2", "sft.max_bad_fraction=0.5",
                 "train.seq_len=255"]) == 0
    assert (run / "chat" / "checkpoints").is_dir()


@pytest.mark.parametrize("mutate,match", [
    (lambda d: _patch_config(d, model_type="gpt2"), r"model_type 'gpt2' is not supported; supported: llama, qwen3, arcee, apertus"),
    (lambda d: (d / "tokenizer.json").unlink(), r"tokenizer.json is missing"),
    (lambda d: (d / "config.json").unlink(), r"config.json is missing"),
    (lambda d: (d / "model.safetensors").unlink(), r"has no model.safetensors"),
    (lambda d: _patch_config(d, attention_bias=True), r"attention_bias=true"),
    (lambda d: _patch_config(d, rope_parameters={"rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0}),
     r"rope type 'llama3'"),
])
def test_bad_sources_are_clear_errors_and_write_nothing(tmp_path, mutate, match):
    src = foreign_llama(tmp_path)
    mutate(src)
    with pytest.raises(SpudError, match=match):
        import_hf(str(src), tmp_path / "run")
    assert not (tmp_path / "run").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def _patch_config(d: Path, **kw) -> None:
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(kw)
    (d / "config.json").write_text(json.dumps(cfg))


def test_hub_name_without_network_is_an_offline_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SpudError, match=r"not in the local Hugging Face cache.*no network.*huggingface-cli download"):
        import_hf("someorg/some-model", tmp_path / "run")


def test_continued_pretraining_starts_from_the_imported_weights(tmp_path):
    """`spud train CONFIG --out NEW train.init_from=IMPORTED`: a fresh run on new data whose step 0
    weights are the imported ones and whose data is tokenized with the imported tokenizer."""
    import yaml

    from spud.cli import main
    from spud.tokenizer import Tokenizer

    src = foreign_llama(tmp_path)
    imported = tmp_path / "imported"
    assert main(["import", "hf", str(src), "--out", str(imported)]) == 0
    recipe = yaml.safe_load((imported / "config.yaml").read_text())
    recipe["data"] = {"total_tokens": 20000, "val_fraction": 0.05, "sources": [
        {"name": "arith", "type": "builtin", "builtin": "arithmetic"}]}
    recipe["train"] = {"max_steps": 1, "lr": 1e-12, "muon_lr": 1e-12, "warmup_steps": 0, "micro_batch_size": 2,
                       "seq_len": 32, "eval_every": 1, "eval_batches": 1, "checkpoint_every": 1,
                       "sample_prompts": [], "init_from": str(imported)}
    cfg_path = tmp_path / "continue.yaml"
    cfg_path.write_text(yaml.safe_dump(recipe))
    new = tmp_path / "continued"
    assert main(["train", str(cfg_path), "--out", str(new)]) == 0
    assert Tokenizer.load(new / "tokenizer.json").sha256() == Tokenizer.load(imported / "tokenizer.json").sha256()
    a = load_source(imported).model.state_dict()
    b = load_source(new).model.state_dict()
    for k in a:  # one step at lr 1e-12: still the imported weights
        torch.testing.assert_close(b[k], a[k], atol=1e-6, rtol=0)
    recipe["model"]["n_layers"] = 1
    cfg_path.write_text(yaml.safe_dump(recipe))
    with pytest.raises(SpudError, match="(?s)model config differs.*n_layers: checkpoint has 2, requested 1"):
        from spud.config import load_config
        from spud.train.trainer import Trainer

        Trainer(load_config(cfg_path), tmp_path / "other")
