"""README.md model card of an exported model, in the Hugging Face format (YAML front matter with a
`model-index` of measured results, then Markdown).

Every figure comes from the run's own files, never typed in: parameter count from the module,
data mix from RUN/data/manifest.json, training FLOPs from the one FLOP count (model/flops.py) ×
tokens seen (the checkpoint's state.json, plus the base run's for a chat model), and eval results
from any RUN/eval/**/results.json (the layout under eval/ may name the checkpoint or the model,
so it is searched recursively and each result says which checkpoint it measured).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from spud.config import validate_config
from spud.errors import SpudError
from spud.model.flops import flops_per_token
from spud.train import checkpoint as ckpt_io

if TYPE_CHECKING:
    from spud.export.arch import Arch
    from spud.export.source import Source


def _read_json(path: Path) -> dict | None:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


def data_mix(run: Path) -> list[dict]:
    """Per-source rows of the run's manifest: name, origin, weight, train/val tokens."""
    m = _read_json(run / "data" / "manifest.json") or {}
    return [{"name": s.get("name"), "origin": s.get("origin"), "weight": s.get("weight"),
             "train_tokens": s.get("train_tokens"), "val_tokens": s.get("val_tokens")}
            for s in m.get("sources", []) if isinstance(s, dict)]


def training_flops(src: Source) -> dict:
    """{'pretrain': (tokens, flops), 'sft': (tokens, flops) for a chat model}; tokens as counted
    by the trainer (every position of every step's batches)."""
    out = {}
    cfg = src.cfg
    stages = []
    if src.kind == "chat" and cfg.sft.base_checkpoint:
        base = Path(cfg.sft.base_checkpoint)
        if (base / "state.json").is_file():
            stages.append(("pretrain", ckpt_io.read_state(base)))
        stages.append(("sft", src.state))
    else:
        stages.append(("pretrain", src.state))
    for name, state in stages:
        tokens = int(state.get("tokens_seen") or 0)
        try:
            c = validate_config(state["config"], "state.json")
            per_token = flops_per_token(c.model, c.seq_len)["training"]
        except (SpudError, KeyError):
            continue
        out[name] = (tokens, tokens * per_token)
    return out


def eval_results(src: Source) -> list[dict]:
    """Every results.json under RUN/eval and RUN/chat/eval, newest layout or old, as
    {'where', 'checkpoint', 'tasks', 'exported'}; results of the exported checkpoint first."""
    seen, rows = set(), []
    for root in dict.fromkeys([src.run / "eval", src.model_dir / "eval"]):  # ordered, unique
        for p in sorted(root.glob("**/results.json")):
            r = _read_json(p)
            if r is None or not isinstance(r.get("tasks"), dict) or p.resolve() in seen:
                continue
            seen.add(p.resolve())
            ck = Path(str(r.get("checkpoint") or p.parent.name)).name  # a name or (newer) a path
            model = r.get("model")  # newer results name the model (base/chat); older do not
            mine = ck == src.checkpoint.name and (not isinstance(model, str) or model == src.kind)
            rows.append({"where": str(p.relative_to(src.run)), "checkpoint": ck, "tasks": r["tasks"],
                         "exported": mine, "chat": bool(r.get("chat"))})
    rows.sort(key=lambda r: not r["exported"])
    return rows


def _fmt_tokens(n) -> str:
    return f"{n:,}" if isinstance(n, int) else "?"


def _fmt_num(v) -> str:
    return f"{v:.4f}" if isinstance(v, (int, float)) and not isinstance(v, bool) else ""


def front_matter(src: Source, arch: Arch, evals: list[dict]) -> dict:
    fm: dict = {"library_name": "transformers", "pipeline_tag": "text-generation",
                "tags": ["spud", arch.model_type, "chat" if src.kind == "chat" else "base"]}
    if fm["tags"][-1] == "chat":
        fm["tags"].append("conversational")
    results = []
    for r in (e for e in evals if e["exported"]):
        for task, t in r["tasks"].items():
            if isinstance(t, dict) and isinstance(t.get("value"), (int, float)):
                results.append({"task": {"type": "text-generation"},
                                "dataset": {"name": task, "type": task},
                                "metrics": [{"type": str(t.get("metric", "score")),
                                             "value": round(float(t["value"]), 4)}]})
    if results:
        fm["model-index"] = [{"name": src.run.name, "results": results}]
    return fm


def render(src: Source, arch: Arch, params: int) -> str:
    m = src.cfg.model
    evals = eval_results(src)
    lines = ["---", yaml.safe_dump(front_matter(src, arch, evals), sort_keys=False).rstrip(), "---", "",
             f"# {src.run.name} ({src.kind} model)", "",
             f"Trained with Spud and exported with `spud export hf` from "
             f"`{src.checkpoint.relative_to(src.run.parent)}` (step {src.state.get('step', '?')}). "
             f"Loads natively as `{arch.hf_class}`; no `trust_remote_code` is needed.", "",
             "## Architecture", "",
             "| field | value |", "|---|---|",
             f"| architecture | {arch.hf_class} (`model_type: {arch.model_type}`) |",
             f"| parameters | {params:,} |",
             f"| layers × d_model | {m.n_layers} × {m.d_model} |",
             f"| attention heads (KV heads) × head_dim | {m.n_heads} ({m.kv_heads}) × {m.dim_head} |",
             f"| MLP | {m.mlp}, hidden {m.hidden} |",
             f"| QK-norm | {'yes' if m.qk_norm else 'no'} |",
             f"| RoPE theta | {m.rope_theta:g} |",
             f"| context | {m.max_seq_len} tokens |",
             f"| vocabulary | {m.vocab_size} |",
             f"| tied embeddings | {'yes' if m.tie_embeddings else 'no'} |", ""]
    mix = data_mix(src.run)
    lines += ["## Training data", ""]
    if mix:
        lines += ["| source | origin | weight | train tokens | val tokens |", "|---|---|---|---|---|"]
        lines += [f"| {s['name']} | {s['origin']} | {s['weight']} | {_fmt_tokens(s['train_tokens'])} "
                  f"| {_fmt_tokens(s['val_tokens'])} |" for s in mix]
    else:
        lines.append("Not recorded: this run has no `data/manifest.json` (e.g. an imported model).")
    if src.kind == "chat" and src.cfg.sft.data:
        lines += ["", f"Chat fine-tuning data: {', '.join(src.cfg.sft.data)}."]
    lines += ["", "## Training compute", ""]
    for stage, (tokens, flops) in training_flops(src).items():
        lines.append(f"- {stage}: {tokens:,} tokens × {flops / max(tokens, 1):,.0f} FLOPs/token "
                     f"= {flops:.3e} FLOPs (matmul FLOPs, training = 3 × forward)")
    lines += ["", "## Evaluation", ""]
    if evals:
        lines += ["| results | checkpoint | task | metric | value | ± stderr | n |", "|---|---|---|---|---|---|---|"]
        for r in evals:
            for task, t in r["tasks"].items():
                if not isinstance(t, dict):
                    continue
                val, se = t.get("value"), t.get("stderr")
                mark = " (exported)" if r["exported"] else ""
                lines.append(f"| `{r['where']}` | {r['checkpoint']}{mark} | {task} | {t.get('metric', '')} "
                             f"| {_fmt_num(val)} | {_fmt_num(se)} | {t.get('n', '')} |")
    else:
        lines.append(f"No evaluation recorded; run `spud eval {src.run}` before exporting to include one.")
    lines += ["", "## Use", "", "```python",
              "from transformers import AutoModelForCausalLM, AutoTokenizer",
              "tok = AutoTokenizer.from_pretrained(PATH)",
              "model = AutoModelForCausalLM.from_pretrained(PATH)", "```", ""]
    if src.kind == "chat":
        lines += ["The chat template is Spud's own: `<|bos|>` then `<|role|>content<|end|>` per message, "
                  "`<|assistant|>` as the generation prompt; a reply ends with `<|end|>`.", ""]
    return "\n".join(lines)


def write_model_card(out: Path, src: Source, arch: Arch, params: int) -> None:
    (out / "README.md").write_text(render(src, arch, params), encoding="utf-8")
