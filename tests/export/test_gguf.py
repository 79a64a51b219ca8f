"""`spud export gguf`: the file reads back with gguf's own reader with llama.cpp's tensor names,
shapes, types, tokenizer and chat template; q/k rows are permuted for the llama arch only."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from spud.errors import SpudError
from spud.export.gguf import export_gguf, permute_rope_rows
from spud.export.source import load_source
from spud.tokenizer import CHAT_TEMPLATE

gguf = pytest.importorskip("gguf")


def read(path):
    r = gguf.GGUFReader(str(path))
    fields = {}
    for name, f in r.fields.items():
        try:
            fields[name] = f.contents()
        except Exception:  # noqa: BLE001 - raw fields without a Python value
            pass
    return r, fields, {t.name: t for t in r.tensors}


def as_torch(t) -> torch.Tensor:
    """A reader tensor in PyTorch orientation (GGUF stores dims innermost-first)."""
    return torch.from_numpy(np.array(t.data, dtype=np.float32)).reshape([int(d) for d in reversed(t.shape)])


@pytest.mark.parametrize("kw,arch", [({"n_kv_heads": 2, "tie_embeddings": False, "qk_norm": False}, "llama"),
                                     ({"qk_norm": True, "head_dim": 32}, "qwen3")])
def test_f32_file_has_llama_cpp_names_shapes_and_metadata(run_factory, tmp_path, kw, arch):
    run = run_factory(**kw)
    out = tmp_path / "model.gguf"
    s = export_gguf(run, out, outtype="f32")
    assert s["arch"] == arch and out.stat().st_size == s["bytes"]
    r, f, tensors = read(out)
    src = load_source(run)
    cfg, tok = src.cfg.model, src.tokenizer
    assert f["general.architecture"] == arch
    assert f[f"{arch}.block_count"] == cfg.n_layers
    assert f[f"{arch}.embedding_length"] == cfg.d_model
    assert f[f"{arch}.feed_forward_length"] == cfg.hidden
    assert f[f"{arch}.attention.head_count"] == cfg.n_heads
    assert f[f"{arch}.attention.head_count_kv"] == cfg.kv_heads
    assert f[f"{arch}.attention.key_length"] == cfg.dim_head
    assert f[f"{arch}.rope.freq_base"] == pytest.approx(cfg.rope_theta)
    assert f[f"{arch}.attention.layer_norm_rms_epsilon"] == pytest.approx(cfg.norm_eps)
    assert f[f"{arch}.context_length"] == cfg.max_seq_len
    assert f["tokenizer.ggml.model"] == "gpt2" and f["tokenizer.ggml.pre"] == "qwen2"
    tokens = f["tokenizer.ggml.tokens"]
    assert len(tokens) == cfg.vocab_size
    assert tokens[: tok.vocab_size] == [tok.id_to_token(i) for i in range(tok.vocab_size)]
    types = f["tokenizer.ggml.token_type"]
    assert types[tok.bos_id] == gguf.TokenType.CONTROL and types[tok.vocab_size] == gguf.TokenType.UNUSED
    assert types[tok.vocab_size - 1] == gguf.TokenType.NORMAL
    assert len(f["tokenizer.ggml.merges"]) > 0 and " " in f["tokenizer.ggml.merges"][0]
    assert f["tokenizer.ggml.bos_token_id"] == tok.bos_id and f["tokenizer.ggml.eos_token_id"] == tok.eos_id
    assert f["tokenizer.chat_template"] == CHAT_TEMPLATE

    expected = {"token_embd.weight": (cfg.vocab_size, cfg.d_model), "output_norm.weight": (cfg.d_model,)}
    if not cfg.tie_embeddings:
        expected["output.weight"] = (cfg.vocab_size, cfg.d_model)
    h, hkv, hd, ff, d = cfg.n_heads, cfg.kv_heads, cfg.dim_head, cfg.hidden, cfg.d_model
    for i in range(cfg.n_layers):
        expected |= {f"blk.{i}.attn_norm.weight": (d,), f"blk.{i}.attn_q.weight": (h * hd, d),
                     f"blk.{i}.attn_k.weight": (hkv * hd, d), f"blk.{i}.attn_v.weight": (hkv * hd, d),
                     f"blk.{i}.attn_output.weight": (d, h * hd), f"blk.{i}.ffn_norm.weight": (d,),
                     f"blk.{i}.ffn_gate.weight": (ff, d), f"blk.{i}.ffn_up.weight": (ff, d),
                     f"blk.{i}.ffn_down.weight": (d, ff)}
        if arch == "qwen3":
            expected |= {f"blk.{i}.attn_q_norm.weight": (hd,), f"blk.{i}.attn_k_norm.weight": (hd,)}
    assert {n: tuple(int(x) for x in reversed(t.shape)) for n, t in tensors.items()} == expected

    # values: exact in f32; q/k permuted to pair order for llama, untouched for qwen3
    blk = src.model.blocks[0]
    qkv = blk.attn.qkv.weight.detach()
    q, k = qkv[: h * hd], qkv[h * hd : (h + hkv) * hd]
    if arch == "llama":
        q, k = permute_rope_rows(q, h), permute_rope_rows(k, hkv)
    assert torch.equal(as_torch(tensors["blk.0.attn_q.weight"]), q)
    assert torch.equal(as_torch(tensors["blk.0.attn_k.weight"]), k)
    assert torch.equal(as_torch(tensors["token_embd.weight"]), src.model.embed.weight.detach())


def test_rope_permutation_turns_half_rotation_into_pair_rotation():
    """llama.cpp's llama arch rotates pairs (2i, 2i+1); Spud rotates (i, i + hd/2). Rotating the
    permuted projection pairwise must equal permuting the half-rotated projection."""
    from spud.model.layers import Rotary

    hd, heads, d = 8, 2, 6
    w = torch.randn(heads * hd, d)
    x = torch.randn(1, 5, d)
    rot = Rotary(hd, 16, 10000.0)
    half = rot((x @ w.T).view(1, 5, heads, hd))  # Spud
    y = (x @ permute_rope_rows(w, heads).T).view(1, 5, heads, hd)
    pos = torch.arange(5, dtype=torch.float64)[:, None]
    ang = pos * (1.0 / 10000.0 ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    cos, sin = ang.cos().float()[None, :, None], ang.sin().float()[None, :, None]
    a, b = y[..., 0::2], y[..., 1::2]
    pair = torch.stack((a * cos - b * sin, a * sin + b * cos), -1).flatten(-2)
    order = permute_rope_rows(torch.arange(heads * hd)[:, None], heads)[:, 0]  # the row permutation
    torch.testing.assert_close(pair, half.reshape(1, 5, heads * hd)[..., order].reshape(1, 5, heads, hd),
                               atol=1e-5, rtol=0)


@pytest.mark.parametrize("outtype,qtype", [("f16", "F16"), ("q8_0", "Q8_0")])
def test_f16_and_q8_0(run_factory, tmp_path, outtype, qtype):
    run = run_factory(chat=True)
    out = tmp_path / "m.gguf"
    s = export_gguf(run, out, outtype=outtype)
    assert s["model"] == "chat"
    _, f, tensors = read(out)
    assert tensors["blk.0.attn_q.weight"].tensor_type.name == qtype
    assert tensors["blk.0.attn_norm.weight"].tensor_type.name == "F32"
    tok = load_source(run, "chat").tokenizer
    assert f["tokenizer.ggml.eos_token_id"] == tok.end_id  # a chat model's turn ends at <|end|>


def test_gguf_refusals(run_factory, tmp_path):
    with pytest.raises(SpudError, match="Closest GGUF-exportable config: model.mlp=swiglu"):
        export_gguf(run_factory(mlp="relu2"), tmp_path / "a.gguf")
    with pytest.raises(SpudError, match="logit_softcap"):
        export_gguf(run_factory(logit_softcap=10.0), tmp_path / "b.gguf")
    run = run_factory()
    (tmp_path / "c.gguf").write_text("precious")
    with pytest.raises(SpudError, match="pass --force"):
        export_gguf(run, tmp_path / "c.gguf")
    assert (tmp_path / "c.gguf").read_text() == "precious"
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".gguf" or p.name.startswith(".")) == ["c.gguf"]


def test_cli_export_gguf(run_factory, tmp_path, capsys):
    from spud.cli import main

    run = run_factory(qk_norm=True)
    out = tmp_path / "x.gguf"
    assert main(["export", "gguf", str(run), str(out), "--outtype", "q8_0"]) == 0
    assert "GGUF arch qwen3, q8_0" in capsys.readouterr().out
    assert main(["export", "gguf", str(run), str(out)]) == 2  # exists: needs --force
    assert "pass --force" in capsys.readouterr().err
    assert main(["export", "gguf", str(run), str(out), "--force", "--outtype", "f32"]) == 0
    assert read(out)[2]["blk.0.attn_q.weight"].tensor_type.name == "F32"


@pytest.mark.parametrize("kw", [{"n_kv_heads": 2, "tie_embeddings": False, "rope_theta": 500.0},
                                {"qk_norm": True, "n_kv_heads": 1, "head_dim": 32}])
def test_reference_forward_from_the_file_matches_spud(run_factory, tmp_path, kw):
    """llama.cpp's conventions applied to nothing but the file's contents give Spud's logits:
    ≤ 1e-4 from an f32 file; f16 and q8_0 keep the top-1 token on most positions."""
    from gguf_reference import forward, load

    run = run_factory(**kw)
    src = load_source(run)
    ids = src.tokenizer.encode("What is 12 plus 7? The quick brown fox.", add_bos=True)
    with torch.no_grad():
        mine = src.model(torch.tensor([ids]))[0].double().numpy()
    for outtype, tol in (("f32", 1e-4), ("f16", None), ("q8_0", None)):
        path = tmp_path / f"{outtype}.gguf"
        export_gguf(run, path, outtype=outtype)
        theirs = forward(*load(path), ids)
        if tol is not None:
            assert np.abs(theirs - mine).max() <= tol
        else:
            assert (theirs.argmax(-1) == mine.argmax(-1)).mean() >= 0.9
