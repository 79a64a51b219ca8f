"""`spud export hf RUN OUT`: a Hugging Face model directory that transformers, vLLM and the Hub
load natively, without trust_remote_code.

Layout (the standard one every tool reads):
  config.json                 native architecture (see arch.py for the option → type table)
  model.safetensors           or model-0000i-of-0000n.safetensors + model.safetensors.index.json
  generation_config.json      bos/eos/pad ids, stop ids as `spud serve` uses them, default sampling
  tokenizer.json              the run's tokenizer, byte-identical
  tokenizer_config.json       special tokens + the chat template (Spud's own, in Jinja)
  special_tokens_map.json
  README.md                   model card (model_card.py)
Everything is written into a temp directory beside OUT and renamed into place at the end.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import save_file

from spud.errors import SpudError
from spud.export.arch import hf_config, pick_arch, to_hf
from spud.export.model_card import write_model_card
from spud.export.source import Which, load_source, staged_output
from spud.tokenizer import BOS, CHAT_TEMPLATE, END, EOS, PAD, SPECIAL_TOKENS, Tokenizer

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
DEFAULT_SHARD_BYTES = 5 * 2**30  # transformers' own default max_shard_size ("5GB")
INDEX_FILE = "model.safetensors.index.json"


def tokenizer_files(tok: Tokenizer, tok_path: Path, out: Path, chat: bool, max_len: int) -> None:
    """tokenizer.json (copied byte for byte), tokenizer_config.json, special_tokens_map.json.

    A chat model's eos_token is <|end|> (the end of an assistant turn), so chat front ends that
    stop at the tokenizer's eos (vLLM's chat completions, transformers pipelines) end the turn
    where `spud serve` does; a base model's is <|eos|>."""
    shutil.copyfile(tok_path, out / "tokenizer.json")
    eos = END if chat else EOS
    specials = {"bos_token": BOS, "eos_token": eos, "pad_token": PAD,
                "additional_special_tokens": [t for t in SPECIAL_TOKENS if t not in (BOS, eos, PAD)]}
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **specials,
        "chat_template": CHAT_TEMPLATE,
        # the template writes <|bos|> itself; the tokenizer must not add another
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": max_len,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n")


def special_ids(tok: Tokenizer, chat: bool) -> dict[str, object]:
    return {"bos_token_id": tok.bos_id, "eos_token_id": tok.end_id if chat else tok.eos_id,
            "pad_token_id": tok.pad_id}


def generation_config(tok: Tokenizer, chat: bool) -> dict:
    # Stop where Spud's engine stops: end of turn, end of text, or the start of a new document.
    stops = [tok.end_id, tok.eos_id, tok.bos_id] if chat else [tok.eos_id, tok.end_id, tok.bos_id]
    return {"bos_token_id": tok.bos_id, "eos_token_id": stops, "pad_token_id": tok.pad_id,
            "do_sample": True, "temperature": 0.8, "top_k": 50, "top_p": 1.0,
            "_from_model_config": False}


def save_weights(tensors: dict[str, torch.Tensor], out: Path, max_shard_bytes: int,
                 metadata: dict[str, str]) -> list[str]:
    """model.safetensors, or shards + index when the weights exceed max_shard_bytes. → file names."""
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    meta = {"format": "pt", **metadata}
    if total <= max_shard_bytes:
        save_file(tensors, str(out / "model.safetensors"), metadata=meta)
        return ["model.safetensors"]
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():  # insertion order: layer by layer, as transformers shards
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += n
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for fname, shard in zip(names, shards):
        save_file(shard, str(out / fname), metadata=meta)
        weight_map |= {k: fname for k in shard}
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return names


def export_hf(run: str | Path, out: str | Path, which: Which = "auto", checkpoint: str | int | None = None,
              dtype: Literal["fp32", "bf16"] = "fp32", force: bool = False,
              max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> dict:
    """Write the Hugging Face directory; → a summary (out, architecture, checkpoint, files, params)."""
    if dtype not in DTYPES:
        raise SpudError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if max_shard_bytes <= 0:
        raise SpudError(f"max shard size must be positive, got {max_shard_bytes}")
    src = load_source(run, which, checkpoint)
    cfg = src.cfg.model
    arch = pick_arch(cfg)  # refuse before anything is written
    chat = src.kind == "chat"
    tensors = {k: v.to(DTYPES[dtype]) for k, v in to_hf(src.model.state_dict(), cfg).items()}
    with staged_output(out, force) as tmp:
        config = hf_config(cfg, special_ids(src.tokenizer, chat))
        config["dtype"] = config["torch_dtype"] = {"fp32": "float32", "bf16": "bfloat16"}[dtype]
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        (tmp / "generation_config.json").write_text(
            json.dumps(generation_config(src.tokenizer, chat), indent=2) + "\n")
        # No run-specific metadata in the weight files (the model card names the checkpoint):
        # the same weights always make the same bytes, so export → import → export is identical.
        files = save_weights(tensors, tmp, max_shard_bytes, {})
        tokenizer_files(src.tokenizer, src.tokenizer_path, tmp, chat, cfg.max_seq_len)
        params = sum(t.numel() for t in tensors.values())  # what the export holds (a tie counts once)
        write_model_card(tmp, src, arch, params)
    return {"out": str(out), "architecture": arch.hf_class, "model_type": arch.model_type,
            "model": src.kind, "checkpoint": str(src.checkpoint), "dtype": dtype,
            "weight_files": files, "params": params,
            # training-only modules left out of the export (their loss never affects inference)
            "dropped": ["mtp"] if getattr(cfg, "mtp_depth", 0) else []}
