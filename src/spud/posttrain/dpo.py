"""`spud dpo`: direct preference optimisation (Rafailov et al. 2023) from preference pairs.

Loss per pair: −log σ(β · [(log π(chosen) − log π_ref(chosen)) − (log π(rejected) − log π_ref(rejected))]),
with log-probabilities summed over the completion tokens (including the closing <|end|>). The
reference model is the starting checkpoint; its log-probabilities are computed once, before the
first step, so the reference weights need not stay in memory.

Pairs come from JSONL files — `{"prompt": str | "messages": [...], "chosen": str, "rejected": str}`
per line; bad records are skipped and counted with file:line — or from the RL verifiers:
`--data verifier:arithmetic` samples `dpo.samples_per_prompt` completions of training problems
through the serving engine and pairs one the verifier accepts with one it rejects.

Writes RUN/dpo/ (a run directory like RUN/chat and RUN/rl; `--model dpo` serves/evaluates it).
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import torch
import torch.nn.functional as F

from spud.config import Config, _merge, parse_overrides, save_config, validate_config
from spud.errors import SpudError
from spud.model.registry import build_model
from spud.posttrain.rl_eval import generate_many, prompt_ids
from spud.posttrain.rl_logprobs import completion_batch, token_logprobs
from spud.posttrain.rl_sampling import seed_of
from spud.posttrain.rl_tasks import BUILTIN, builtin_problems
from spud.posttrain.verifiers import verify
from spud.tokenizer import Tokenizer
from spud.train import checkpoint as ckpt_io
from spud.train.faults import graceful_stop
from spud.train.metrics import MetricsLog

Pair = tuple[list[int], list[int], list[int]]  # prompt ids, chosen ids, rejected ids


def _answer_ids(tok: Tokenizer, text: str) -> list[int]:
    return tok.encode(text) + [tok.end_id]


def read_pairs(path: str | Path, tok: Tokenizer, limit: int, max_bad_fraction: float) -> tuple[list[Pair], dict]:
    path = Path(path)
    if not path.is_file():
        raise SpudError(f"preference file not found: {path}")
    pairs, skipped, lines = [], [], 0
    with open(path, encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            lines += 1
            try:
                rec = json.loads(line)
                if not isinstance(rec, dict):
                    raise ValueError("not a JSON object")
                if isinstance(rec.get("messages"), list) and rec["messages"]:
                    msgs = rec["messages"]
                elif isinstance(rec.get("prompt"), str):
                    msgs = [{"role": "user", "content": rec["prompt"]}]
                else:
                    raise ValueError("needs 'prompt' (string) or 'messages' (list)")
                for key in ("chosen", "rejected"):
                    if not isinstance(rec.get(key), str) or not rec[key].strip():
                        raise ValueError(f"'{key}' must be a non-empty string")
                if rec["chosen"] == rec["rejected"]:
                    raise ValueError("'chosen' and 'rejected' are the same text")
                p, _ = tok.render_chat(msgs, add_generation_prompt=True)
                c, r = _answer_ids(tok, rec["chosen"]), _answer_ids(tok, rec["rejected"])
                if len(p) + max(len(c), len(r)) > limit:
                    raise ValueError(f"longer than the {limit}-token context")
                pairs.append((p, c, r))
            except (ValueError, TypeError, KeyError, SpudError) as e:
                skipped.append(f"{path}:{lineno}: {e}")
    if not pairs:
        raise SpudError(f"{path}: no usable preference pair in {lines} lines; first problems: {skipped[:3]}")
    if skipped and len(skipped) / lines > max_bad_fraction:
        raise SpudError(f"{path}: {len(skipped)} of {lines} lines are bad (limit {max_bad_fraction:.0%}); "
                        f"first: {skipped[:3]}")
    return pairs, {"source": str(path), "pairs": len(pairs), "skipped": skipped}


def verifier_pairs(model, tok: Tokenizer, task: str, cfg: Config) -> tuple[list[Pair], dict]:
    """A right and a wrong sampled answer of the same training problem, judged by the verifier."""
    d = cfg.dpo
    problems = builtin_problems(task, "train", d.pairs_per_task * 4, cfg.seed)
    limit = model.cfg.max_seq_len - d.max_tokens
    prompts = [prompt_ids(tok, p, limit) for p in problems for _ in range(d.samples_per_prompt)]
    seeds = [seed_of(cfg.seed, "dpo", i) for i in range(len(prompts))]
    outs = generate_many(model, tok, prompts, d.max_tokens, 1.0, seeds)
    pairs, no_pair = [], 0
    for i, p in enumerate(problems):
        group = outs[i * d.samples_per_prompt:(i + 1) * d.samples_per_prompt]
        good = [ids for ids, text in group if verify(p.verifier, text, p.reference, p.tests).correct]
        bad = [ids for ids, text in group if not verify(p.verifier, text, p.reference, p.tests).correct]
        if good and bad and good[0] and bad[0]:
            pairs.append((prompts[i * d.samples_per_prompt], good[0], bad[0]))
        else:
            no_pair += 1
        if len(pairs) >= d.pairs_per_task:
            break
    if not pairs:
        raise SpudError(f"verifier:{task}: no problem got both a right and a wrong answer in "
                        f"{d.samples_per_prompt} samples; the model is all right or all wrong on it")
    return pairs, {"source": f"verifier:{task}", "pairs": len(pairs), "problems_without_pair": no_pair}


def _seq_logps(model, pairs: list[Pair], pad: int, batch: int) -> torch.Tensor:
    """(N, 2) summed completion log-probs of (chosen, rejected) per pair."""
    out = []
    for i in range(0, len(pairs), batch):
        chunk = pairs[i:i + batch]
        rows = [(p, c) for p, c, _ in chunk] + [(p, r) for p, _, r in chunk]
        x, y = completion_batch(rows, pad)
        logp, _ = token_logprobs(model, x, y)
        s = logp.sum(-1)
        out.append(torch.stack([s[:len(chunk)], s[len(chunk):]], dim=1))
    return torch.cat(out)


def dpo_config(run: str | Path, source: str, data: list[str] | None, overrides: list[str]) -> Config:
    from spud.runs import choose_model  # noqa: PLC0415

    base_ckpt = choose_model(run, source).checkpoint
    tree = ckpt_io.read_state(base_ckpt)["config"]
    tree["rl"] = {}  # the newest stage names the model (spud.runs._model_kind)
    if overrides:
        tree = _merge(tree, parse_overrides(overrides), "")
    tree.setdefault("dpo", {})
    if data:
        tree["dpo"]["data"] = list(data)
    if not tree["dpo"].get("data"):
        raise SpudError("no preference data: give --data prefs.jsonl or --data verifier:arithmetic")
    tree["dpo"].update(source=source, base_run=str(Path(run).resolve()), base_checkpoint=str(base_ckpt.resolve()))
    return validate_config(tree, f"spud dpo {run}")


def dpo_cmd(run: str, source: str = "chat", data: list[str] | None = None, out: str | None = None,
            overrides: list[str] | None = None, console=None) -> dict:
    """`spud dpo RUN --data prefs.jsonl [verifier:arithmetic ...] [--from chat|base|rl] [dpo.key=value]`."""
    from spud.ui import make_console  # noqa: PLC0415

    console = console or make_console()
    cfg = dpo_config(run, source, data, overrides or [])
    d = cfg.dpo
    out_dir = Path(out) if out else Path(run) / "dpo"
    out_dir.mkdir(parents=True, exist_ok=True)
    src = Path(d.base_checkpoint).parent.parent
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if (src / name).is_file():
            shutil.copyfile(src / name, out_dir / name)
    tok = Tokenizer.load(out_dir / "tokenizer.json")
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model)
    ckpt_io.load_weights(Path(d.base_checkpoint), model, "cpu")
    pairs, sources = [], []
    for entry in d.data:
        if entry.startswith("verifier:"):
            task = entry.split(":", 1)[1]
            if task not in BUILTIN:
                raise SpudError(f"--data {entry}: unknown task {task!r}; one of {', '.join(BUILTIN)}")
            got, summary = verifier_pairs(model, tok, task, cfg)
        else:
            got, summary = read_pairs(entry, tok, cfg.model.max_seq_len + 1, d.max_bad_fraction)
        pairs += got
        sources.append(summary)
        console.print(f"dpo data {summary['source']}: {summary['pairs']} pairs")
    (out_dir / "dpo_data.json").write_text(json.dumps(sources, indent=2))
    model.eval()
    with torch.no_grad():
        ref = _seq_logps(model, pairs, tok.pad_id, d.batch_size)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=d.lr, betas=(0.9, 0.99), weight_decay=0.0)
    save_config(cfg, out_dir / "config.yaml")
    log = MetricsLog(out_dir / "metrics.jsonl")
    step, interrupted = 0, False
    order = list(range(len(pairs)))
    with graceful_stop() as stop:
        for epoch in range(d.epochs):
            random.Random(seed_of(cfg.seed, "dpo-order", epoch)).shuffle(order)
            for i in range(0, len(order), d.batch_size):
                idx = order[i:i + d.batch_size]
                pol = _seq_logps(model, [pairs[j] for j in idx], tok.pad_id, d.batch_size)
                margin = d.beta * ((pol[:, 0] - ref[idx, 0]) - (pol[:, 1] - ref[idx, 1]))
                loss = -F.logsigmoid(margin).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                step += 1
                log.write("dpo", step, loss=float(loss.detach()), accuracy=float((margin > 0).float().mean()),
                          margin=float(margin.detach().mean()), epoch=epoch)
                if stop["stop"]:
                    interrupted = True
                    break
            if interrupted:
                break
    state = {"config": cfg.model_dump(mode="json"), "tokenizer_sha256": tok.sha256(), "loader": None,
             "tokens_seen": 0, "val": None}
    ckpt_io.save_checkpoint(out_dir, step, model, opt, state, None, 2)
    log.close()
    console.print(f"DPO model: {out_dir} after {step} steps (serve it with: spud serve {run} --model dpo)")
    return {"steps": step, "pairs": len(pairs), "interrupted": interrupted, "out": str(out_dir), "data": sources}
