"""`spud ablate`: train recipe variants at equal training FLOPs and compare them on held-out text.

    spud ablate BASE.yaml --vary model.mlp=swiglu,relu2 --vary train.lr=1e-3,3e-3 \\
        --flops 2e13 [--seeds 2] [--heldout gnu=/usr/share/doc/gnu-standards] --out DIR

Every variant (the cartesian product of the --vary lists, or the named variants of a YAML file)
is trained once per seed and per FLOP budget, for steps = floor(budget / (FLOPs per token ×
tokens per step)) with FLOPs per token from spud.model.flops (the count `spud info`, the planner
and MFU use). A variant with a cheaper model therefore trains on more tokens: that is the point of
an equal-compute comparison. Every run reads the same data and tokenizer, built once in
DIR/data/, and seed k is the same seed (init and data order) for every variant.

Variants and budgets are parsed in ablate_variants.py. Each finished run is scored
(ablate_score.py) on the shared validation split (the same fixed windows for every variant) and on
held-out corpora (spud.data.heldout: built-in `stdlib_prose` by default, plus directories), whose
13-gram contamination by the shared data is checked first; DIR/ablation.{md,json,png} summarise
them (ablate_report.py).

Resumable: a finished run leaves `ablation_run.json` and is never retrained; an interrupted one
resumes from its last checkpoint (bit-exact, as `spud train --resume`). A run directory trained
with a different config than the one now planned is an error, not a silent mix of results.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from spud.config import Config, _merge, parse_overrides, validate_config
from spud.errors import SpudError
from spud.train.ablate_variants import (
    Variant,
    load_variants_file,
    parse_flops,
    parse_vary,
)

RESULT = "ablation_run.json"  # marker + result of a finished run
DATA_STAMP = "ablation_data.json"  # the shared shards' hashes a run was (or is being) trained on


@dataclass
class RunSpec:
    """One training run of the ablation: a variant at one budget and seed, with its step count."""

    variant: Variant
    seed: int
    budget: float
    cfg: Config
    steps: int
    tokens_per_step: int
    flops_per_token: int
    run_dir: Path
    result: dict | None = field(default=None, repr=False)

    @property
    def label(self) -> str:
        return f"{self.variant.name} · seed {self.seed} · {self.budget:.3g} FLOPs"


# ----------------------------------------------------------------------------------- planning
def tokens_per_step(cfg: Config) -> int:
    """Tokens per optimizer step, rounded as the Trainer rounds gradient accumulation (1 process)."""
    micro = cfg.train.micro_batch_size * cfg.seq_len
    return max(1, round((cfg.train.tokens_per_step or micro) / micro)) * micro


def base_tree(base: str | Path, overrides: list[str] | None) -> dict:
    from spud.config import load_config

    load_config(base, overrides)  # validates the base recipe itself first
    tree = yaml.safe_load(Path(base).read_text(encoding="utf-8")) or {}
    return _merge(tree, parse_overrides(overrides or []), "")


def variant_config(tree: dict, variant: Variant, seed: int, vocab: int) -> Config:
    merged = _merge(copy.deepcopy(tree), copy.deepcopy(variant.overrides), "")
    merged["seed"] = seed
    cfg = validate_config(merged, f"variant {variant.name!r}")
    if cfg.model.vocab_size is None:  # as Trainer.resolve_vocab, so FLOPs are known up front
        cfg.model.vocab_size = vocab
    return cfg


def plan_runs(tree: dict, variants: list[Variant], budgets: list[float], seeds: list[int],
              vocab: int, out: Path, evals: int) -> list[RunSpec]:
    """Every (budget, variant, seed) run with its step count; SpudError if a budget buys no step.
    Within each budget the variant order alternates, so slow drift in machine load does not
    always favour the same variant."""
    from spud.model.flops import flops_per_token

    specs = []
    for b_index, budget in enumerate(budgets):
        ordered = variants if b_index % 2 == 0 else variants[::-1]
        for variant in ordered:
            for seed in seeds:
                cfg = variant_config(tree, variant, seed, vocab)
                fpt = flops_per_token(cfg.model, cfg.seq_len)["training"]
                tps = tokens_per_step(cfg)
                steps = math.floor(budget / (fpt * tps))
                if steps < 1:
                    raise SpudError(
                        f"--flops {budget:.3g} is too small for variant {variant.name!r}: one step "
                        f"costs {fpt * tps:.3g} FLOPs ({fpt:,} FLOPs/token × {tps:,} tokens/step)")
                t = cfg.train
                t.max_steps = steps
                t.warmup_steps = min(t.warmup_steps, steps // 4)
                t.eval_every = t.checkpoint_every = max(1, math.ceil(steps / evals))
                t.keep_checkpoints, t.log_every = 1, 1
                run_dir = out / "runs" / variant.dirname / f"flops{budget:.3g}-seed{seed}"
                specs.append(RunSpec(variant, seed, budget, cfg, steps, tps, fpt, run_dir))
    return specs


def _estimated_vocab(tree: dict, data_dir: Path) -> int:
    """The model vocab the shared tokenizer gives (or will give: an upper bound before it exists)."""
    if (data_dir / "tokenizer.json").is_file():
        from spud.tokenizer import Tokenizer

        size = Tokenizer.load(data_dir / "tokenizer.json").vocab_size
    else:
        size = validate_config(tree).tokenizer.vocab_size
    return (size + 63) // 64 * 64


# ------------------------------------------------------------------------------------ running
def _prepare_run_dir(spec: RunSpec, data_dir: Path) -> None:
    from spud.train.checkpoint import latest_checkpoint

    run = spec.run_dir
    run.mkdir(parents=True, exist_ok=True)
    if not (run / DATA_STAMP).is_file():
        (run / DATA_STAMP).write_text(json.dumps(_data_stamp(data_dir)), encoding="utf-8")
    if not (run / "tokenizer.json").is_file():
        shutil.copy(data_dir / "tokenizer.json", run / "tokenizer.json")
    link = run / "data"
    if latest_checkpoint(run) is None:  # metrics of an attempt killed before its first checkpoint
        (run / "metrics.jsonl").unlink(missing_ok=True)  # would be appended to, not replaced
    if not link.exists():
        try:  # one copy of the shards for every run; relative, so DIR can be moved
            link.symlink_to(os.path.relpath(data_dir / "data", run), target_is_directory=True)
        except OSError:  # no symlinks (some Windows setups): copy instead
            shutil.copytree(data_dir / "data", link)


def _common(a, b):
    """a and b restricted (recursively, into lists of equal length too) to the keys both have."""
    if isinstance(a, dict) and isinstance(b, dict):
        pairs = {k: _common(a[k], b[k]) for k in a if k in b}
        return {k: v[0] for k, v in pairs.items()}, {k: v[1] for k, v in pairs.items()}
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        pairs = [_common(x, y) for x, y in zip(a, b)]
        return [x for x, _ in pairs], [y for _, y in pairs]
    return a, b


def _data_stamp(data_dir: Path) -> list[str]:
    from spud.data.shards import load_manifest

    return [s["sha256"] for s in load_manifest(data_dir)["shards"]]


def _check_same_config(spec: RunSpec, stamp: list[str]) -> None:
    """A run directory already trained (or half-trained) must have been planned exactly like now.
    Only what shapes a pretraining run is compared, and only keys both configs have, so a spud
    upgrade that adds a config field (with its default) does not orphan finished runs."""
    from spud.config import load_config
    from spud.train.checkpoint import config_diff

    saved = None
    if (spec.run_dir / RESULT).is_file():
        saved = json.loads((spec.run_dir / RESULT).read_text(encoding="utf-8"))["config"]
    elif (spec.run_dir / "config.yaml").is_file():
        saved = load_config(spec.run_dir / "config.yaml").model_dump(mode="json")
    if saved is None:
        return
    stamp_file = spec.run_dir / DATA_STAMP
    if stamp_file.is_file() and json.loads(stamp_file.read_text(encoding="utf-8")) != stamp:
        raise SpudError(f"{spec.run_dir} was trained on another build of the shared data (the shards "
                        f"in {spec.run_dir.parent.parent.parent / 'data'} changed since, e.g. after a "
                        "spud upgrade); use a new --out directory, or delete that run to retrain it")
    sections = ("seed", "data", "tokenizer", "model", "train")
    planned = {k: v for k, v in spec.cfg.model_dump(mode="json").items() if k in sections}
    diff = config_diff(*_common({k: v for k, v in saved.items() if k in sections}, planned))
    if diff:
        raise SpudError(f"{spec.run_dir} was trained with a different config than this ablation "
                        f"plans for it:\n  " + "\n  ".join(diff)
                        + "\nUse a new --out directory, or delete that run directory to retrain it.")


def train_and_score(spec: RunSpec, data_dir: Path, corpora: list, console, val_windows: int,
                    heldout_tokens: int) -> dict:
    """Train one run (resuming if it was interrupted) and score it; writes the RESULT marker."""
    from spud.data.shards import load_manifest
    from spud.tokenizer import Tokenizer
    from spud.train.ablate_score import run_summary, score_model
    from spud.train.checkpoint import latest_checkpoint
    from spud.train.trainer import Trainer

    class SharedDataTrainer(Trainer):
        """Reads the ablation's shared shards as they are: a seed other than the one the data was
        built with must not trigger a rebuild (build_dataset keys its reuse on the seed)."""

        def prepare_data(self, cfg):
            self.manifest = load_manifest(self.run_dir)
            return Tokenizer.load(self.run_dir / "tokenizer.json")

    _prepare_run_dir(spec, data_dir)
    resume = latest_checkpoint(spec.run_dir) is not None
    trainer = SharedDataTrainer(spec.cfg, spec.run_dir, resume=resume, console=console)
    load_before = os.getloadavg()[0]
    summary = trainer.run()
    if summary["interrupted"]:
        raise KeyboardInterrupt
    scores = score_model(trainer.model, trainer.tokenizer, spec.cfg, spec.run_dir, corpora,
                         val_windows, heldout_tokens)
    result = {
        "variant": spec.variant.name,
        "overrides": spec.variant.overrides,
        "seed": spec.seed,
        "budget": spec.budget,
        "params": trainer.facts["params"],
        "non_embedding_params": trainer.facts["non_embedding_params"],
        "flops_per_token": spec.flops_per_token,
        "tokens_per_step": spec.tokens_per_step,
        "steps": spec.steps,
        "tokens": spec.steps * spec.tokens_per_step,
        "flops": spec.steps * spec.tokens_per_step * spec.flops_per_token,
        **scores,
        **run_summary(spec.run_dir, spec.tokens_per_step, spec.flops_per_token),
        "load_avg": [load_before, os.getloadavg()[0]],  # 1-minute load around training
        "run_dir": str(spec.run_dir),
        "config": spec.cfg.model_dump(mode="json"),
    }
    return _write_result(spec, result, corpora, val_windows, heldout_tokens)


def _scored_on(corpora: list, val_windows: int, heldout_tokens: int) -> dict:
    """What a run's scores were computed on: a finished run is rescored when this changes."""
    return {"val_windows": val_windows, "heldout_tokens": heldout_tokens,
            "corpora": {c.name: f"{c.nbytes}:{len(c.documents)}" for c in corpora}}


def _write_result(spec: RunSpec, result: dict, corpora: list, val_windows: int, heldout_tokens: int) -> dict:
    result["scored_on"] = _scored_on(corpora, val_windows, heldout_tokens)
    tmp = spec.run_dir / (RESULT + ".tmp")
    tmp.write_text(json.dumps(result, indent=1), encoding="utf-8")
    tmp.replace(spec.run_dir / RESULT)  # atomic: a marker is complete or absent
    return result


def rescore(spec: RunSpec, result: dict, corpora: list, val_windows: int, heldout_tokens: int) -> dict:
    """Score a finished run again from its final checkpoint (e.g. a held-out corpus was added),
    without retraining."""
    from spud.model.registry import build_model
    from spud.runtime import pick_device
    from spud.tokenizer import Tokenizer
    from spud.train.ablate_score import score_model
    from spud.train.checkpoint import latest_checkpoint, load_weights

    ckpt = latest_checkpoint(spec.run_dir)
    if ckpt is None:
        raise SpudError(f"{spec.run_dir} has a result but no checkpoint to rescore; delete the "
                        "run directory to retrain it")
    device = pick_device(spec.cfg.train.device)
    model = build_model(spec.cfg.model)
    load_weights(ckpt, model, device)
    model.to(device)
    tok = Tokenizer.load(spec.run_dir / "tokenizer.json")
    scores = score_model(model, tok, spec.cfg, spec.run_dir, corpora, val_windows, heldout_tokens)
    return _write_result(spec, {**result, **scores}, corpora, val_windows, heldout_tokens)


def run_ablation(base: str | Path, variants: list[Variant], budgets: list[float], out: str | Path,
                 seeds: int = 1, heldout: list[str] | None = None, overrides: list[str] | None = None,
                 evals: int = 8, val_windows: int = 128, heldout_tokens: int = 32768,
                 console=None, command: str | None = None) -> dict:
    """Plan (validating everything), build the shared data once, train and score every run not
    finished yet, then write DIR/ablation.{json,md,png}. Returns the ablation.json content."""
    from spud.data import heldout as heldout_mod
    from spud.data.build import build_dataset
    from spud.train.ablate_report import write_reports
    from spud.ui import make_console

    console = console or make_console()
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise SpudError(f"--out {out} is a file, not a directory")
    if not variants:
        raise SpudError("nothing to compare: give --vary KEY=V1,V2 or --variants FILE.yaml")
    if seeds < 1 or evals < 1:
        raise SpudError("--seeds and --evals must be at least 1")
    names = [v.name for v in variants]
    if len(set(names)) != len(names):
        raise SpudError(f"variant names must be unique: {names}")
    tree = base_tree(base, overrides)
    first_seed = validate_config(tree).seed
    seed_list = [first_seed + i for i in range(seeds)]
    data_dir = out / "data"
    # Everything a user can get wrong is checked before the first byte is written.
    plan_runs(tree, variants, budgets, seed_list, _estimated_vocab(tree, data_dir), out, evals)
    corpora = heldout_mod.resolve_all(heldout if heldout is not None else ["stdlib_prose"])

    out.mkdir(parents=True, exist_ok=True)
    base_cfg = validate_config(tree)
    build_dataset(base_cfg, data_dir, progress=True, log=console.print)
    specs = plan_runs(tree, variants, budgets, seed_list, _estimated_vocab(tree, data_dir), out, evals)
    stamp = _data_stamp(data_dir)
    for spec in specs:
        _check_same_config(spec, stamp)
    from spud.train.ablate_score import contamination

    corpus_info = contamination(corpora, data_dir, console)

    started, flops_done, load_start = time.time(), 0.0, os.getloadavg()
    todo_flops = sum(s.steps * s.tokens_per_step * s.flops_per_token for s in specs
                     if not (s.run_dir / RESULT).is_file())
    for i, spec in enumerate(specs, 1):
        marker = spec.run_dir / RESULT
        if marker.is_file():
            spec.result = json.loads(marker.read_text(encoding="utf-8"))
            console.print(f"[dim][{i}/{len(specs)}] {spec.label}: finished earlier, not retrained")
            if spec.result.get("scored_on") != _scored_on(corpora, val_windows, heldout_tokens):
                console.print("  held-out corpora or scoring settings changed: rescoring its final checkpoint")
                spec.result = rescore(spec, spec.result, corpora, val_windows, heldout_tokens)
            continue
        elapsed = time.time() - started
        eta = (f" · ablation ETA {(todo_flops - flops_done) * elapsed / flops_done / 60:.1f} min"
               if flops_done else "")
        console.print(f"[bold][{i}/{len(specs)}] {spec.label}[/]: {spec.steps} steps × "
                      f"{spec.tokens_per_step:,} tokens{eta}")
        spec.result = train_and_score(spec, data_dir, corpora, console, val_windows, heldout_tokens)
        flops_done += spec.steps * spec.tokens_per_step * spec.flops_per_token

    report = {
        "command": command,
        "base": str(base),
        "base_overrides": list(overrides or []),
        "budgets": budgets,
        "seeds": seed_list,
        "variants": [{"name": v.name, "overrides": v.overrides} for v in variants],
        "heldout": corpus_info,
        "machine": {"cpus": os.cpu_count(), "load_start": load_start, "load_end": os.getloadavg()},
        "runs": [s.result for s in specs],
    }
    write_reports(report, out)
    return report


def ablate_cmd(config: str | Path, vary: list[str], variants_file: str | None, flops: str, seeds: int,
               heldout: list[str] | None, out: Path, overrides: list[str] | None = None, evals: int = 8,
               heldout_tokens: int = 32768) -> dict:
    """`spud ablate`: validate, run, and print the summary table."""
    import shlex
    import sys

    from rich.table import Table

    from spud.ui import make_console

    if bool(vary) == bool(variants_file):
        raise SpudError("give either --vary KEY=V1,V2 (repeatable) or --variants FILE.yaml")
    if heldout_tokens < 1:
        raise SpudError("--heldout-tokens must be positive")
    variants = parse_vary(vary) if vary else load_variants_file(variants_file)
    console = make_console()
    command = "spud " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:2] == ["ablate"] else None
    report = run_ablation(config, variants, parse_flops(flops), out, seeds=seeds, heldout=heldout,
                          overrides=overrides, evals=evals, heldout_tokens=heldout_tokens,
                          console=console, command=command)
    corpora = [c["name"] for c in report["heldout"]]
    table = Table(title=f"ablation at equal FLOPs ({out / 'ablation.md'})")
    for col in ("FLOPs", "variant", "params", "steps", "val bpb", *(f"{c} bpb" for c in corpora), "tok/s"):
        table.add_column(col, justify="left" if col == "variant" else "right")
    for r in report["summary"]:
        def cell(mean, std):
            return "-" if mean is None else f"{mean:.4f}" + (f" ± {std:.4f}" if std is not None else "")
        table.add_row(f"{r['budget']:.3g}", r["variant"], f"{r['params']:,}", f"{r['steps']:,}",
                      cell(r["val_bpb"], r["val_bpb_std"]),
                      *(cell(r["heldout"][c]["bpb"], r["heldout"][c]["bpb_std"]) for c in corpora),
                      f"{r['tokens_per_s']:,.0f}" if r["tokens_per_s"] else "-")
    console.print(table)
    console.print(f"wrote {out / 'ablation.md'}, {out / 'ablation.json'}, {out / 'ablation.png'}")
    return report
