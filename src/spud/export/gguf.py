"""`spud export gguf RUN OUT.gguf`: one GGUF file for llama.cpp (and Ollama, LM Studio, ...),
written with `gguf`, the format library maintained by llama.cpp.

Architectures: `llama` (Spud's Llama block with SwiGLU) and `qwen3` (the same with QK-norm); the
other exportable Spud configs (ReLU²/GELU MLPs) map to Hugging Face types whose llama.cpp support
is not assumed here, so they are refused with the closest GGUF-exportable setting.

Two details matter for llama.cpp to compute what Spud computes:
- RoPE layout. llama.cpp's `llama` arch rotates adjacent pairs (x0,x1),(x2,x3)... ("normal"
  RoPE); Spud and Hugging Face rotate halves (x_i, x_{i+hd/2}). The q and k projection rows of
  every head are therefore permuted from half order to pair order, as llama.cpp's own converter
  does. `qwen3` is a NeoX-style (half-rotation) arch in llama.cpp: no permutation.
- Tokenizer. Spud's tokenizer is byte-level BPE (GPT-2 byte alphabet), i.e. GGUF's "gpt2"
  tokenizer model; its pre-tokenizer regex (GPT-4 style with one digit per token) is the one
  llama.cpp knows as "qwen2". Token types: control for Spud's special tokens, unused for the
  padding rows the model's vocabulary adds beyond the tokenizer's.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from spud.errors import SpudError
from spud.export.arch import pick_arch, to_hf
from spud.export.source import Which, load_source, staged_output
from spud.tokenizer import CHAT_TEMPLATE

OUTTYPES = ("f32", "f16", "q8_0")
PRE_TOKENIZER = "qwen2"  # llama.cpp's name for Spud's split regex (see module docstring)


def _gguf():
    try:
        import gguf
    except ImportError:
        raise SpudError("GGUF export needs the `gguf` package: pip install 'spud[export]'") from None
    return gguf


def permute_rope_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of a q/k projection from half-rotation order to adjacent-pair order, per head:
    head rows [a0..a(h/2-1), b0..b(h/2-1)] → [a0, b0, a1, b1, ...]."""
    out_dim = w.shape[0]
    hd = out_dim // n_heads
    return w.reshape(n_heads, 2, hd // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def tensor_map(cfg, arch: str, hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Hugging Face names (arch.to_hf) → GGUF names, with the llama q/k permutation."""
    out = {"token_embd.weight": hf["model.embed_tokens.weight"],
           "output_norm.weight": hf["model.norm.weight"]}
    if "lm_head.weight" in hf:  # tied heads are stored once; llama.cpp reuses token_embd
        out["output.weight"] = hf["lm_head.weight"]
    names = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
             "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm"}
    for i in range(cfg.n_layers):
        for hf_name, g_name in names.items():
            t = hf.get(f"model.layers.{i}.{hf_name}.weight")
            if t is None:
                continue
            if arch == "llama" and g_name == "attn_q":
                t = permute_rope_rows(t, cfg.n_heads)
            elif arch == "llama" and g_name == "attn_k":
                t = permute_rope_rows(t, cfg.kv_heads)
            out[f"blk.{i}.{g_name}.weight"] = t
    return out


def _merges(tok_json: dict) -> list[str]:
    merges = tok_json.get("model", {}).get("merges", [])
    return [m if isinstance(m, str) else " ".join(m) for m in merges]


def add_tokenizer(w, gguf, src, vocab_size: int, chat: bool) -> None:
    tok = src.tokenizer
    tok_json = json.loads(Path(src.tokenizer_path).read_text(encoding="utf-8"))
    n = tok.vocab_size
    tokens, types = [], []
    for i in range(vocab_size):
        if i < n:
            tokens.append(tok.id_to_token(i))
            types.append(gguf.TokenType.CONTROL if i in tok.special_ids else gguf.TokenType.NORMAL)
        else:  # rows the model's vocabulary rounds up beyond the tokenizer: never produced
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(PRE_TOKENIZER)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(_merges(tok_json))
    w.add_bos_token_id(tok.bos_id)
    w.add_eos_token_id(tok.end_id if chat else tok.eos_id)
    w.add_eot_token_id(tok.end_id)
    w.add_pad_token_id(tok.pad_id)
    # Spud prompts start with <|bos|> (documents did in training); the chat template writes it itself.
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    w.add_chat_template(CHAT_TEMPLATE)


def add_tensor(w, gguf, name: str, t: torch.Tensor, outtype: str) -> None:
    data = t.detach().float().numpy()
    if t.dim() == 1 or outtype == "f32":  # norms stay f32, as llama.cpp's converter keeps them
        w.add_tensor(name, data.astype(np.float32))
    elif outtype == "f16" or data.shape[-1] % 32:  # q8_0 blocks are 32 wide along a row
        w.add_tensor(name, data.astype(np.float16))
    else:
        q = gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0)
        w.add_tensor(name, q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)


def export_gguf(run: str | Path, out: str | Path, which: Which = "auto", checkpoint: str | int | None = None,
                outtype: Literal["f32", "f16", "q8_0"] = "f16", force: bool = False) -> dict:
    """→ summary: out, arch, outtype, tensors, bytes, model, checkpoint."""
    gguf = _gguf()
    if outtype not in OUTTYPES:
        raise SpudError(f"--outtype must be one of {', '.join(OUTTYPES)}, got {outtype!r}")
    out = Path(out)
    src = load_source(run, which, checkpoint)
    cfg = src.cfg.model
    hf_arch = pick_arch(cfg)
    if hf_arch.model_type not in ("llama", "qwen3"):
        raise SpudError(f"GGUF export covers llama.cpp's llama and qwen3 architectures (SwiGLU MLP); "
                        f"model.mlp={cfg.mlp!r} exports to Hugging Face as {hf_arch.hf_class} only. "
                        f"Closest GGUF-exportable config: model.mlp=swiglu")
    arch = hf_arch.model_type
    chat = src.kind == "chat"
    tensors = tensor_map(cfg, arch, to_hf(src.model.state_dict(), cfg))
    with staged_output(out, force, is_dir=False) as tmp:
        w = gguf.GGUFWriter(str(tmp), arch)
        w.add_name(f"{src.run.name} ({src.kind})")
        w.add_context_length(cfg.max_seq_len)
        w.add_embedding_length(cfg.d_model)
        w.add_block_count(cfg.n_layers)
        w.add_feed_forward_length(cfg.hidden)
        w.add_head_count(cfg.n_heads)
        w.add_head_count_kv(cfg.kv_heads)
        w.add_key_length(cfg.dim_head)
        w.add_value_length(cfg.dim_head)
        w.add_rope_dimension_count(cfg.dim_head)
        w.add_rope_freq_base(cfg.rope_theta)
        w.add_layer_norm_rms_eps(cfg.norm_eps)
        w.add_vocab_size(cfg.vocab_size)
        w.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                         "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[outtype])
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        add_tokenizer(w, gguf, src, cfg.vocab_size, chat)
        for name, t in tensors.items():
            add_tensor(w, gguf, name, t, outtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return {"out": str(out), "arch": arch, "outtype": outtype, "tensors": len(tensors),
            "bytes": out.stat().st_size, "model": src.kind, "checkpoint": str(src.checkpoint)}
