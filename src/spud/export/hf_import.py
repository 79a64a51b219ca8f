"""`spud import hf SRC --out RUN`: a local Hugging Face model directory of a supported
architecture (arch.py: llama, qwen3, arcee, apertus) → a Spud run directory.

The run holds config.yaml, tokenizer.json and one checkpoint (step 0) whose state.json says
`weights_only: true` and where it came from, so `spud sample/eval/serve/sft/export` use it like
any trained run, and `spud train RUN --resume` continues pretraining from these weights with a
fresh optimizer on the data in config.yaml.

Tokenizer. Spud's chat format and document boundaries use its own control tokens (<|bos|>,
<|eos|>, <|pad|>, <|system|>, <|user|>, <|assistant|>, <|end|>). A Spud export already has them
and is imported unchanged (so export → import → export is bit-identical). A foreign tokenizer
gets the missing ones appended as special tokens; when the model has no spare embedding rows
for them, the embedding (and an untied LM head) grows by that many rows initialised to the mean
of the existing rows, so logits over the original vocabulary are unchanged. Those tokens are
untrained: chat use needs `spud sft` first, which teaches them. The source's own chat template
is not carried over; Spud always renders chats with its own template.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from tokenizers import AddedToken
from tokenizers import Tokenizer as HFTokenizer

from spud.config import ModelConfig, validate_config
from spud.errors import SpudError
from spud.export.arch import ACTS, ARCHS, GATED_ACT, from_hf
from spud.export.source import staged_output, write_weights_run
from spud.model.registry import build_model
from spud.tokenizer import SPECIAL_TOKENS, Tokenizer

# Accepted spellings of Spud's tanh-approximated GELU.
GELU_TANH = {"gelu_pytorch_tanh", "gelu_new", "gelu_fast"}


def locate(src: str) -> Path:
    """A local directory; a hub name only when it is already in the local Hugging Face cache."""
    p = Path(src).expanduser()
    if p.is_dir():
        return p
    if p.exists():
        raise SpudError(f"{src} is a file; give the model's directory (with config.json and weights)")
    looks_like_hub = src.count("/") == 1 and not src.startswith((".", "/", "~"))
    if looks_like_hub:
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(src, local_files_only=True))
        except Exception:  # noqa: BLE001 - not installed, or not cached: same advice either way
            pass
        raise SpudError(
            f"{src!r} is not a local directory and is not in the local Hugging Face cache; spud "
            f"import reads local files only (no network). Download it first, e.g. "
            f"`huggingface-cli download {src} --local-dir ./{src.split('/')[-1]}`, then "
            f"`spud import hf ./{src.split('/')[-1]} --out RUN`")
    raise SpudError(f"model directory not found: {src}")


def _read_config(src: Path) -> dict:
    path = src / "config.json"
    if not path.is_file():
        raise SpudError(f"{path} is missing; a Hugging Face model directory has config.json")
    try:
        hf = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise SpudError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(hf, dict):
        raise SpudError(f"{path}: expected a JSON object")
    return hf


def model_config(hf: dict, where: str) -> ModelConfig:
    """ModelConfig for a Hugging Face config; SpudError naming each field Spud cannot represent."""
    mt = hf.get("model_type")
    if mt not in ARCHS:
        raise SpudError(f"{where}: model_type {mt!r} is not supported; supported: {', '.join(ARCHS)}")
    arch = ARCHS[mt]
    problems = []
    act = hf.get("hidden_act", GATED_ACT if arch.gated else "relu2")
    if arch.gated:
        mlp = "swiglu"
        if act != GATED_ACT:
            problems.append(f"hidden_act={act!r} (Spud's gated MLP is SwiGLU: 'silu')")
    elif act == ACTS["relu2"]:
        mlp = "relu2"
    elif act in GELU_TANH:
        mlp = "gelu"
    else:
        mlp = "relu2"
        problems.append(f"hidden_act={act!r} (supported: relu2, {', '.join(sorted(GELU_TANH))})")
    for key in ("attention_bias", "mlp_bias"):
        if hf.get(key):
            problems.append(f"{key}=true (Spud's projections have no bias)")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else "?"
    if rope_type != "default":
        problems.append(f"rope type {rope_type!r} (Spud implements plain RoPE: 'default')")
    theta = (rope.get("rope_theta") if isinstance(rope, dict) else None) or hf.get("rope_theta", 10000.0)
    if hf.get("use_sliding_window") or (mt != "qwen3" and hf.get("sliding_window")):
        problems.append("sliding-window attention (Spud attends to the full context)")
    if hf.get("pretraining_tp", 1) != 1:
        problems.append(f"pretraining_tp={hf['pretraining_tp']} (must be 1)")
    if problems:
        raise SpudError(f"{where}: this {arch.hf_class} uses features Spud cannot represent:\n  "
                        + "\n  ".join(problems))
    d, heads = int(hf["hidden_size"]), int(hf["num_attention_heads"])
    kv = int(hf.get("num_key_value_heads") or heads)
    head_dim = hf.get("head_dim") or d // heads
    tree = {
        "vocab_size": int(hf["vocab_size"]), "d_model": d, "n_layers": int(hf["num_hidden_layers"]),
        "n_heads": heads, "n_kv_heads": kv, "head_dim": int(head_dim), "mlp": mlp,
        "mlp_hidden": int(hf["intermediate_size"]), "norm_eps": float(hf.get("rms_norm_eps", 1e-6)),
        "rope_theta": float(theta), "qk_norm": arch.qk_norm,
        "tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
        "max_seq_len": int(hf.get("max_position_embeddings", 2048)),
        "init_std": float(hf.get("initializer_range", 0.02)),
    }
    try:
        return ModelConfig(**tree)
    except ValueError as e:
        raise SpudError(f"{where}: the config does not describe a valid Spud model: {e}") from None


def read_weights(src: Path) -> dict[str, torch.Tensor]:
    """model.safetensors or the shards an index names, as fp32 (Spud's master weights; exact
    for fp16/bf16 sources, so re-exporting at the source dtype is bit-identical)."""
    index = src / "model.safetensors.index.json"
    if index.is_file():
        try:
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, AttributeError) as e:
            raise SpudError(f"{index}: not a valid safetensors index ({e})") from None
    elif (src / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        bins = sorted(p.name for p in src.glob("*.bin"))
        hint = (f" ({', '.join(bins)} are PyTorch pickles, which spud never loads: convert them "
                "with transformers' save_pretrained(..., safe_serialization=True))") if bins else ""
        raise SpudError(f"{src} has no model.safetensors or model.safetensors.index.json{hint}")
    out = {}
    for name in files:
        path = src / name
        if not path.is_file():
            raise SpudError(f"{path} is missing (named by the safetensors index)")
        with safe_open(str(path), framework="pt") as f:
            for k in f.keys():
                out[k] = f.get_tensor(k).float()
    return out


def spud_tokenizer(src: Path) -> tuple[HFTokenizer, list[str]]:
    """The source's tokenizer.json with Spud's control tokens added where missing (→ which)."""
    path = src / "tokenizer.json"
    if not path.is_file():
        raise SpudError(f"{path} is missing; spud needs the fast tokenizer file (tokenizer.json). "
                        "Create it with transformers: AutoTokenizer.from_pretrained(SRC)."
                        "save_pretrained(SRC)")
    try:
        tok = HFTokenizer.from_file(str(path))
    except Exception as e:  # the Rust side raises plain Exception on malformed JSON
        raise SpudError(f"{path}: not a valid tokenizer.json ({e})") from None
    missing = [t for t in SPECIAL_TOKENS if tok.token_to_id(t) is None]
    if missing:
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in missing])
    return tok, missing


def grow_vocab(weights: dict[str, torch.Tensor], cfg: ModelConfig, n: int) -> ModelConfig:
    """Room for n more token rows: new rows = mean of the existing rows (embedding and head)."""
    for k in ("model.embed_tokens.weight", "lm_head.weight"):
        if k in weights:
            w = weights[k]
            weights[k] = torch.cat([w, w.mean(0, keepdim=True).expand(n, -1)])
    return cfg.model_copy(update={"vocab_size": cfg.vocab_size + n})


def import_hf(src: str, out: str | Path, force: bool = False) -> dict:
    """→ summary: out, model_type, params, added tokens, grown rows."""
    path = locate(src)
    hf = _read_config(path)
    mcfg = model_config(hf, str(path / "config.json"))
    tok, added = spud_tokenizer(path)  # before the (large) weights are read
    weights = read_weights(path)
    if mcfg.tie_embeddings and "lm_head.weight" in weights:
        weights.pop("lm_head.weight")
    grown = max(0, tok.get_vocab_size(with_added_tokens=True) - mcfg.vocab_size)
    if grown:
        mcfg = grow_vocab(weights, mcfg, grown)
    state = from_hf(weights, mcfg, hf["model_type"])
    cfg = validate_config({"model": mcfg.model_dump(mode="json"),
                           "train": {"seq_len": min(mcfg.max_seq_len, 2048)}}, f"spud import hf {src}")
    model = build_model(cfg.model)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise SpudError(f"{path}: weights do not fit the config: {e}") from None
    spud_tok = Tokenizer(tok)
    with staged_output(out, force) as tmp:
        write_weights_run(tmp, model, cfg, spud_tok, imported_from=str(path.resolve()),
                          model_type=hf["model_type"], added_tokens=added, grown_rows=grown)
    return {"out": str(out), "model_type": hf["model_type"], "params": model.num_params(),
            "added_tokens": added, "grown_rows": grown, "vocab_size": cfg.model.vocab_size}
