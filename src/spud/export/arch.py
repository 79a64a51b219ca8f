"""Which native Hugging Face architecture expresses a Spud model, and how the weights map.

One table decides everything, in both directions (export and import):

| Spud options                          | transformers class  | model_type |
|---------------------------------------|---------------------|------------|
| mlp=swiglu                            | LlamaForCausalLM    | llama      |
| mlp=swiglu, qk_norm                   | Qwen3ForCausalLM    | qwen3      |
| mlp=relu2 or gelu                     | ArceeForCausalLM    | arcee      |
| mlp=relu2 or gelu, qk_norm            | ApertusForCausalLM  | apertus    |

All four are pre-norm RMSNorm decoders with rotate_half RoPE (Spud's convention, so q/k rows
need no permutation), bias-free projections, GQA, tied or untied heads. Arcee and Apertus are the
native types with a two-matrix MLP up → act → down (Arcee's default act is ReLU²); Qwen3 and
Apertus normalise q and k per head with a learned gain *before* RoPE, exactly as Spud does.

Not expressible, refused with the nearest exportable setting: `block: parallel` (no native RMSNorm
parallel-residual type), `logit_softcap` (Gemma 2 / NanoChat have it, but with sandwich norms or
weightless norms, so Spud weights cannot be represented exactly). Every ModelConfig field not
listed in HANDLED must sit at its default: an option added to Spud later is refused until it is
mapped here, never silently dropped.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from spud.config import ModelConfig
from spud.errors import SpudError

# mlp → Hugging Face `hidden_act` for the two-matrix MLPs (Spud's gelu is the tanh approximation).
ACTS = {"relu2": "relu2", "gelu": "gelu_pytorch_tanh"}
GATED_ACT = "silu"


@dataclass(frozen=True)
class Arch:
    model_type: str
    hf_class: str
    gated: bool  # SwiGLU gate_proj/up_proj, else up_proj → act → down_proj
    qk_norm: bool
    attn_norm: str  # name of the pre-attention RMSNorm inside a decoder layer
    mlp_norm: str  # name of the pre-MLP RMSNorm


ARCHS = {
    a.model_type: a
    for a in (
        Arch("llama", "LlamaForCausalLM", True, False, "input_layernorm", "post_attention_layernorm"),
        Arch("qwen3", "Qwen3ForCausalLM", True, True, "input_layernorm", "post_attention_layernorm"),
        Arch("arcee", "ArceeForCausalLM", False, False, "input_layernorm", "post_attention_layernorm"),
        Arch("apertus", "ApertusForCausalLM", False, True, "attention_layernorm", "feedforward_layernorm"),
    )
}

# ModelConfig fields the mapping expresses (any value allowed, subject to the checks below).
# Some only act in training and leave the inference function unchanged: `dropout`, the init
# choices (`init_std`, `zero_init_residual`), loss weights, and `mtp_depth` (multi-token
# prediction heads feed a training loss only; the export leaves them out). `preset` is already
# folded into the other fields and `plugins` only register types (block/mlp are checked).
HANDLED = {
    "preset", "plugins", "block", "vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads",
    "head_dim", "mlp", "mlp_hidden", "norm_eps", "rope_theta", "qk_norm", "logit_softcap",
    "tie_embeddings", "dropout", "max_seq_len", "init_std", "zero_init_residual",
    "mtp_depth", "mtp_weight", "moe_aux_loss", "moe_top_k",
}
# field → the other field whose default makes it irrelevant (e.g. a window without local layers)
MOOT_UNLESS = {"attn_window": ("attn_pattern", lambda p: "L" not in str(p).upper())}


def pick_arch(cfg: ModelConfig) -> Arch:
    """The native architecture for `cfg`, or a SpudError naming each inexpressible option and the
    closest exportable setting."""
    problems = []
    fields = type(cfg).model_fields
    for name in fields:
        if name in HANDLED:
            continue
        if name in MOOT_UNLESS:
            other, moot = MOOT_UNLESS[name]
            if moot(getattr(cfg, other, None)):
                continue
        value, default = getattr(cfg, name), fields[name].get_default(call_default_factory=True)
        if value != default:
            problems.append(f"model.{name}={value!r} (no export mapping yet; closest exportable: "
                            f"model.{name}={default!r})")
    if cfg.block != "llama":
        problems.append(f"model.block={cfg.block!r} (no native Hugging Face type has an RMSNorm "
                        "parallel block; closest exportable: model.block='llama')")
    if cfg.logit_softcap is not None:
        problems.append(f"model.logit_softcap={cfg.logit_softcap} (the native soft-capping types, "
                        "Gemma 2 and NanoChat, differ in their norms; closest exportable: "
                        "model.logit_softcap=null)")
    if cfg.vocab_size is None:
        problems.append("model.vocab_size is not set")
    if problems:
        raise SpudError("this model cannot be exported exactly to a native Hugging Face "
                        "architecture:\n  " + "\n  ".join(problems))
    gated = cfg.mlp == "swiglu"
    if cfg.mlp not in ACTS and not gated:
        raise SpudError(f"model.mlp={cfg.mlp!r} has no export mapping; closest exportable: swiglu")
    for arch in ARCHS.values():
        if arch.gated == gated and arch.qk_norm == cfg.qk_norm:
            return arch
    raise AssertionError("ARCHS covers every (gated, qk_norm) pair")


def hf_config(cfg: ModelConfig, special: dict[str, Any]) -> dict[str, Any]:
    """config.json contents for `cfg`; `special` holds bos/eos/pad token ids."""
    arch = pick_arch(cfg)
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    return {
        "architectures": [arch.hf_class],
        "model_type": arch.model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.hidden,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.dim_head,
        "hidden_act": GATED_ACT if arch.gated else ACTS[cfg.mlp],
        "rms_norm_eps": cfg.norm_eps,
        # both spellings: transformers >= 5 reads rope_parameters, 4.x and vLLM read rope_theta
        "rope_parameters": rope,
        "rope_theta": cfg.rope_theta,
        "max_position_embeddings": cfg.max_seq_len,
        "tie_word_embeddings": cfg.tie_embeddings,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "initializer_range": cfg.init_std,
        "use_cache": True,
        **({"use_sliding_window": False, "sliding_window": None} if arch.model_type == "qwen3" else {}),
        **special,
    }


# ---------------------------------------------------------------------------------- weights
def to_hf(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Spud state dict → the native architecture's names, fused projections split back.

    Splits are contiguous copies (safetensors needs them); a tied head is stored once, as
    transformers does (it re-ties lm_head to embed_tokens on load)."""
    arch = pick_arch(cfg)
    h, hkv, hd, f = cfg.n_heads, cfg.kv_heads, cfg.dim_head, cfg.hidden
    out = {"model.embed_tokens.weight": state["embed.weight"]}
    for i in range(cfg.n_layers):
        s, p = f"blocks.{i}.", f"model.layers.{i}."
        q, k, v = state[s + "attn.qkv.weight"].split((h * hd, hkv * hd, hkv * hd))
        out |= {
            p + f"{arch.attn_norm}.weight": state[s + "attn_norm.weight"],
            p + "self_attn.q_proj.weight": q, p + "self_attn.k_proj.weight": k,
            p + "self_attn.v_proj.weight": v, p + "self_attn.o_proj.weight": state[s + "attn.proj.weight"],
            p + f"{arch.mlp_norm}.weight": state[s + "mlp_norm.weight"],
            p + "mlp.down_proj.weight": state[s + "mlp.down.weight"],
        }
        if arch.qk_norm:
            out[p + "self_attn.q_norm.weight"] = state[s + "attn.q_norm.weight"]
            out[p + "self_attn.k_norm.weight"] = state[s + "attn.k_norm.weight"]
        if arch.gated:
            gate, up = state[s + "mlp.gate_up.weight"].split((f, f))
            out[p + "mlp.gate_proj.weight"], out[p + "mlp.up_proj.weight"] = gate, up
        else:
            out[p + "mlp.up_proj.weight"] = state[s + "mlp.up.weight"]
    out["model.norm.weight"] = state["norm.weight"]
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = state["lm_head.weight"]
    return {k: v.detach().contiguous() for k, v in out.items()}


def from_hf(hf: dict[str, torch.Tensor], cfg: ModelConfig, model_type: str) -> dict[str, torch.Tensor]:
    """Native state dict → Spud names (the exact inverse of `to_hf`: concatenation only, so an
    export → import → export round trip is bit-identical). Missing or left-over tensors are
    SpudErrors naming them."""
    arch = ARCHS[model_type]
    hf = dict(hf)

    def take(name: str) -> torch.Tensor:
        if name not in hf:
            raise SpudError(f"weights lack tensor {name!r} that a {arch.hf_class} with this config has")
        return hf.pop(name)

    out = {"embed.weight": take("model.embed_tokens.weight")}
    for i in range(cfg.n_layers):
        s, p = f"blocks.{i}.", f"model.layers.{i}."
        out[s + "attn_norm.weight"] = take(p + f"{arch.attn_norm}.weight")
        out[s + "attn.qkv.weight"] = torch.cat([take(p + f"self_attn.{n}_proj.weight") for n in "qkv"])
        out[s + "attn.proj.weight"] = take(p + "self_attn.o_proj.weight")
        if arch.qk_norm:
            out[s + "attn.q_norm.weight"] = take(p + "self_attn.q_norm.weight")
            out[s + "attn.k_norm.weight"] = take(p + "self_attn.k_norm.weight")
        out[s + "mlp_norm.weight"] = take(p + f"{arch.mlp_norm}.weight")
        if arch.gated:
            out[s + "mlp.gate_up.weight"] = torch.cat(
                [take(p + "mlp.gate_proj.weight"), take(p + "mlp.up_proj.weight")])
        else:
            out[s + "mlp.up.weight"] = take(p + "mlp.up_proj.weight")
        out[s + "mlp.down.weight"] = take(p + "mlp.down_proj.weight")
    out["norm.weight"] = take("model.norm.weight")
    head = hf.pop("lm_head.weight", None)
    if not cfg.tie_embeddings:
        if head is None:
            raise SpudError("weights lack 'lm_head.weight' but the config has tie_word_embeddings=false")
        out["lm_head.weight"] = head
    else:  # one tensor under both names, as the tied Spud module's state dict has it
        out["lm_head.weight"] = out["embed.weight"]
    leftover = sorted(k for k in hf if "rotary_emb" not in k)
    if leftover:
        raise SpudError(f"weights hold tensors a {arch.hf_class} of this config does not have: "
                        f"{leftover[:5]}{' ...' if len(leftover) > 5 else ''}")
    return out
