"""`spud mix search`: learn a data mixture from small proxy runs (RegMix, Liu et al. 2024).

1. **Proxies.** K mixtures are drawn around the corpus's natural distribution (each source's share
   of the tokens it has): Dirichlet(α = natural × s) with the concentration s log-uniform in
   [0.1, 10], so some proxies stay close to natural and some are far from it; the natural and the
   uniform mixture are always among them. Each proxy is an ordinary spud run (DIR/proxies/pNNN)
   trained for the same training FLOPs (steps from the one FLOP count, spud.model.flops) on a
   data build with its weights and the shared tokenizer, then scored on the target sources'
   validation documents (bits per byte; documents the hash split never trains on).
2. **Regression.** LightGBM gradient-boosted trees map mixture weights → target bpb, as in RegMix:
   the response is non-linear and interacting (a source helps until it crowds out another), trees
   need no feature scaling, and LightGBM is maintained and fast on a CPU. The fit is judged by the
   Spearman rank correlation of out-of-fold predictions (5-fold): what matters is ranking mixtures.
3. **Search.** 100,000 candidate mixtures from the same Dirichlet family are predicted; the mean
   of the 100 best is the answer (averaging top candidates is RegMix's guard against the
   regressor's noise at one point).

Proxies are independent jobs: `--worker i/N` trains only the proxies whose number is i mod N (each
finished proxy leaves DIR/proxies/pNNN/proxy.json, written last and atomically, so any job resumes
where it stopped and none repeats another's work) and exits without fitting; the same command
without `--worker`, run once all workers finished, trains whatever is still missing and fits. The
shared natural-mix build (the tokenizer every proxy uses) is made in a private directory and
renamed into place, so workers starting together on a shared file system agree on one tokenizer;
DIR/search.json pins the settings (recipe, targets, FLOPs, seed) and a worker started with other
settings is refused.

Outputs in DIR: proxies.jsonl (one row per finished proxy, in order), mix.json (weights,
predicted bpb of the searched, natural and uniform mixes, CV rank correlation), mix.yaml (the base
recipe with the searched weights: ready to train), report.md with predicted_vs_actual.png and
weights.png. Limits: proxies are small and short, so the method bets that the *ranking* of
mixtures transfers to the larger model — what RegMix measured at 1M→1B parameters; check it on
your target with an equal-FLOP run of the searched vs the natural mix.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import socket
from pathlib import Path

import numpy as np
import yaml

from spud.config import _merge, load_config, parse_overrides, validate_config
from spud.errors import SpudError

CANDIDATES = 100_000
TOP = 100
SEARCH_FILE = "search.json"
PROXY_FILE = "proxy.json"


def natural_weights(manifest: dict) -> np.ndarray:
    """Each source's share of the distinct tokens it holds (its tokens per pass)."""
    avail = []
    for s in manifest["sources"]:
        tokens = s["train_tokens"] + s["val_tokens"]
        epochs = s.get("epochs") or 0
        avail.append(tokens / epochs if epochs > 1 else tokens if s.get("exhausted") else tokens * 10)
    w = np.asarray(avail, dtype=np.float64)
    return w / w.sum()


def sample_mixtures(natural: np.ndarray, k: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    n = len(natural)
    rows = [natural, np.full(n, 1.0 / n)]
    while len(rows) < k:
        scale = math.exp(rng.uniform(math.log(0.1), math.log(10.0)))
        rows.append(rng.dirichlet(np.maximum(natural * scale * n, 1e-3)))
    w = np.maximum(np.asarray(rows[:k]), 1e-3)  # every source keeps a sliver: weights must be > 0
    return w / w.sum(axis=1, keepdims=True)


def _target_bpb(trainer, cfg, targets: list[str], max_tokens: int) -> dict[str, float]:
    import torch  # noqa: PLC0415

    from spud.eval.intrinsic import source_metrics  # noqa: PLC0415

    tok = trainer.tokenizer
    token_bytes = torch.tensor(tok.byte_lengths(cfg.model.vocab_size), dtype=torch.float64)
    trainer.model.eval()
    with torch.no_grad():
        res = source_metrics(trainer.model, tok, cfg, token_bytes, max_tokens)
    out = {}
    for t in targets:
        r = res.get(t, {})
        if "bpb" not in r:
            raise SpudError(f"target source {t!r}: no validation bits/byte ({r.get('error', 'no result')})")
        out[t] = float(r["bpb"])
    return out


def train_on_mix(tree: dict, names: list[str], w, flops: float, run: Path, tokenizer: Path,
                 targets: list[str], vocab: int, console, score_tokens: int = 20_000,
                 flops_name: str = "--proxy-flops") -> dict:
    """Train the recipe `tree` with source weights `w` for `flops` training FLOPs (steps from the one
    FLOP count) in the fresh run directory `run`, tokenized with `tokenizer`; score the target
    sources' validation documents. The proxies and the larger check runs (benchmarks/mix_transfer.py)
    are both made here, so "equal FLOPs" means the same thing for both."""
    from spud.data.build import build_dataset  # noqa: PLC0415
    from spud.model.flops import flops_per_token  # noqa: PLC0415
    from spud.train.ablate import tokens_per_step  # noqa: PLC0415
    from spud.train.trainer import Trainer  # noqa: PLC0415

    t = copy.deepcopy(tree)
    for j in range(len(names)):
        t = _merge(t, parse_overrides([f"data.sources.{j}.weight={float(w[j])!r}"]), "")
    cfg = validate_config(t, str(run))
    cfg.model.vocab_size = cfg.model.vocab_size or vocab
    fpt, tps = flops_per_token(cfg.model, cfg.seq_len)["training"], tokens_per_step(cfg)
    steps = math.floor(flops / (fpt * tps))
    if steps < 1:
        raise SpudError(f"{flops_name} {flops:.3g} buys no step (one costs {fpt * tps:.3g} FLOPs)")
    cfg.train.max_steps, cfg.train.warmup_steps = steps, min(cfg.train.warmup_steps, steps // 4)
    cfg.train.eval_every = cfg.train.checkpoint_every = steps
    cfg.train.keep_checkpoints, cfg.train.sample_every = 1, 0
    cfg.data.total_tokens = int(steps * tps * 1.1) + 10 * cfg.seq_len  # ~one pass, a little spare
    if run.exists():
        shutil.rmtree(run)  # a half-trained run: its loss is not a final loss
    run.mkdir(parents=True)
    shutil.copy(tokenizer, run / "tokenizer.json")
    build_dataset(cfg, run, progress=False, log=lambda *_: None)
    trainer = Trainer(cfg, run, console=console)
    if trainer.run()["interrupted"]:
        raise SpudError("mix search interrupted; rerun the same command to continue")
    bpb = _target_bpb(trainer, cfg, targets, score_tokens)
    return {"weights": [float(x) for x in w], "target_bpb": bpb, "loss": float(np.mean(list(bpb.values()))),
            "steps": steps, "flops": steps * tps * fpt}


def fit_and_rank(x: np.ndarray, y: np.ndarray, seed: int):
    """→ (LightGBM model fit on all rows, out-of-fold predictions, Spearman ρ of those)."""
    try:
        import lightgbm as lgb  # noqa: PLC0415
    except ImportError:
        raise SpudError("spud mix search needs LightGBM: pip install 'spud[mix]' (or pip install lightgbm)") from None
    from scipy.stats import spearmanr  # noqa: PLC0415

    params = dict(n_estimators=300, learning_rate=0.05, num_leaves=8, min_child_samples=3,
                  subsample=0.9, subsample_freq=1, random_state=seed, verbose=-1)
    folds = np.arange(len(y)) % 5
    np.random.default_rng(seed).shuffle(folds)
    oof = np.zeros_like(y)
    for f in range(5):
        test = folds == f
        if test.all() or not test.any():
            continue
        oof[test] = lgb.LGBMRegressor(**params).fit(x[~test], y[~test]).predict(x[test])
    rho = float(spearmanr(oof, y).statistic) if len(y) > 2 else float("nan")
    return lgb.LGBMRegressor(**params).fit(x, y), oof, rho


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{socket.gethostname()}.{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _pinned_recipe(tree: dict) -> dict:
    """The recipe less the settings that say how fast, not what, a proxy trains (thread and worker
    counts), so jobs on different machines may set their own."""
    t = copy.deepcopy(tree)
    for section, key in (("train", "threads"), ("data", "workers")):
        if isinstance(t.get(section), dict):
            t[section].pop(key, None)
    return t


def _pin_settings(out: Path, settings: dict) -> None:
    """DIR/search.json holds the settings the proxies were trained with; refuse others (a proxy row
    trained for other FLOPs or another target would silently corrupt the regression)."""
    path = out / SEARCH_FILE
    if path.is_file():
        old = json.loads(path.read_text(encoding="utf-8"))
        diff = [k for k in settings if old.get(k) != json.loads(json.dumps(settings[k]))]
        if diff:
            raise SpudError(f"{out}: its proxies were trained with another {', '.join(diff)} "
                            f"(see {path}); use a new --out, or the settings it was made with")
        return
    out.mkdir(parents=True, exist_ok=True)
    _write_atomic(path, json.dumps(settings, indent=2))


def _natural_build(base, out: Path) -> dict:
    """The natural-mix build whose tokenizer every proxy shares. Built in a private directory and
    renamed into place: of several workers starting at once, the first rename wins and the others
    use its build (a rename onto an existing directory fails), so all proxies share one tokenizer."""
    from spud.data.build import build_dataset  # noqa: PLC0415

    shared = out / "_natural"
    if not (shared / "data" / "manifest.json").is_file():
        tmp = out / f"_natural.tmp-{socket.gethostname()}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        build_dataset(base, tmp, progress=False, log=lambda *_: None)
        try:
            tmp.rename(shared)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)  # another worker's build is in place: use it
    return build_dataset(base, shared, progress=False, log=lambda *_: None)  # reused as built


def _finished_proxies(out: Path, mixes: np.ndarray) -> dict[int, dict]:
    """proxy number → its result row, from DIR/proxies/pNNN/proxy.json (and proxies.jsonl, which a
    search that finished also holds); each row's weights must be the mixture drawn for it."""
    rows = {}
    legacy = out / "proxies.jsonl"
    if legacy.is_file():
        rows |= {r["proxy"]: r for r in map(json.loads, legacy.read_text(encoding="utf-8").splitlines())}
    for f in sorted((out / "proxies").glob(f"p*/{PROXY_FILE}")):
        r = json.loads(f.read_text(encoding="utf-8"))
        rows[r["proxy"]] = r
    rows = {i: r for i, r in rows.items() if i < len(mixes)}
    for i, r in rows.items():
        if not np.allclose(r["weights"], mixes[i], atol=1e-9):
            raise SpudError(f"{out}: proxy {i} was trained on another mixture than this search draws for it "
                            "(another recipe, seed or data?); use a new --out")
    return rows


def run_search(config: str | Path, targets: list[str], proxies: int, proxy_flops: float, out: str | Path,
               overrides: list[str] | None = None, seed: int = 0, console=None,
               worker: tuple[int, int] | None = None) -> dict:
    """The whole search, or with `worker=(i, N)` only the proxies numbered i mod N (no fit): the
    dict returned then says which proxies this worker trained and which are still missing."""
    from spud.ui import make_console  # noqa: PLC0415

    console = console or make_console()
    out = Path(out)
    base = load_config(config, overrides)
    names = [s.name for s in base.data.sources]
    unknown = [t for t in targets if t not in names]
    if unknown:
        raise SpudError(f"--target {','.join(unknown)}: not a source of {config} (sources: {', '.join(names)})")
    if proxies < 8:
        raise SpudError(f"--proxies {proxies}: at least 8 proxies are needed to fit a regression")
    if len(names) < 2:
        raise SpudError("a mixture search needs at least two sources")
    tree = _merge(yaml.safe_load(Path(config).read_text(encoding="utf-8")) if Path(config).is_file() else {},
                  parse_overrides(overrides or []), "")
    settings = {"recipe": _pinned_recipe(tree), "targets": targets, "proxy_flops": proxy_flops, "seed": seed}
    _pin_settings(out, settings)
    manifest = _natural_build(base, out)
    shared = out / "_natural"
    natural = natural_weights(manifest)
    mixes = sample_mixtures(natural, proxies, seed)
    vocab = (manifest["vocab_size"] + 63) // 64 * 64
    found = _finished_proxies(out, mixes)
    mine = [i for i in range(proxies) if worker is None or i % worker[1] == worker[0]]
    for i in mine:
        if i in found:
            continue
        console.print(f"[bold]proxy {i + 1}/{proxies}[/] weights {np.round(mixes[i], 3).tolist()}")
        run = out / "proxies" / f"p{i:03d}"
        found[i] = {"proxy": i, **train_on_mix(tree, names, mixes[i], proxy_flops, run,
                                                shared / "tokenizer.json", targets, vocab, console)}
        _write_atomic(run / PROXY_FILE, json.dumps(found[i]))
    if worker is not None:
        finished = _finished_proxies(out, mixes)  # other workers may have finished meanwhile
        missing = [i for i in range(proxies) if i not in finished]
        return {"worker": list(worker), "trained": [i for i in mine if i in found], "missing": missing}
    rows = [found[i] for i in range(proxies)]
    jsonl = "".join(json.dumps(r) + "\n" for r in rows)
    done_path = out / "proxies.jsonl"
    if not done_path.is_file() or done_path.read_text(encoding="utf-8") != jsonl:
        _write_atomic(done_path, jsonl)
    rows.sort(key=lambda r: r["proxy"])
    x = np.asarray([r["weights"] for r in rows])
    y = np.asarray([r["loss"] for r in rows])
    model, oof, rho = fit_and_rank(x, y, seed)
    cands = sample_mixtures(natural, CANDIDATES, seed + 1)
    pred = model.predict(cands)
    best = cands[np.argsort(pred)[:TOP]].mean(axis=0)
    best = best / best.sum()
    result = {
        "targets": targets, "sources": names, "proxies": len(rows), "proxy_flops": proxy_flops,
        "regressor": "lightgbm", "cv_spearman": rho,
        "weights": dict(zip(names, best.round(4).tolist())),
        "natural": dict(zip(names, natural.round(4).tolist())),
        "predicted_bpb": {"searched": float(model.predict(best[None])[0]),
                          "natural": float(model.predict(natural[None])[0]),
                          "uniform": float(model.predict(np.full((1, len(names)), 1 / len(names)))[0])},
        "best_proxy": min(rows, key=lambda r: r["loss"]),
    }
    _write_outputs(out, result, tree, names, best, x, y, oof)
    return result


def _write_outputs(out: Path, result: dict, tree: dict, names, best, x, y, oof) -> None:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    (out / "mix.json").write_text(json.dumps(result, indent=2))
    t = copy.deepcopy(tree)
    for j, w in enumerate(best):
        t = _merge(t, parse_overrides([f"data.sources.{j}.weight={float(round(w, 4))!r}"]), "")
    (out / "mix.yaml").write_text(yaml.safe_dump(t, sort_keys=False))
    fig, ax = plt.subplots(figsize=(4.5, 4))
    ax.scatter(y, oof, s=12)
    lo, hi = float(min(y.min(), oof.min())), float(max(y.max(), oof.max()))
    ax.plot([lo, hi], [lo, hi], lw=0.8, color="grey")
    ax.set(xlabel="actual target bpb", ylabel="predicted (out of fold)",
           title=f"Spearman ρ = {result['cv_spearman']:.3f}")
    fig.tight_layout()
    fig.savefig(out / "predicted_vs_actual.png", dpi=110)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(5, 3))
    idx = np.arange(len(names))
    ax.bar(idx - 0.2, [result["natural"][n] for n in names], 0.4, label="natural")
    ax.bar(idx + 0.2, best, 0.4, label="searched")
    ax.set_xticks(idx, names)
    ax.set_ylabel("weight")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "weights.png", dpi=110)
    plt.close(fig)
    p = result["predicted_bpb"]
    lines = [f"# Mixture search for {', '.join(result['targets'])}", "",
             f"{result['proxies']} proxies at {result['proxy_flops']:.3g} training FLOPs each; "
             f"regressor LightGBM, out-of-fold Spearman ρ = {result['cv_spearman']:.3f}.", "",
             "| source | natural | searched |", "|---|---|---|"]
    lines += [f"| {n} | {result['natural'][n]:.3f} | {result['weights'][n]:.3f} |" for n in names]
    lines += ["", f"Predicted target bpb: searched {p['searched']:.4f}, natural {p['natural']:.4f}, "
              f"uniform {p['uniform']:.4f} (predictions, not measurements: train mix.yaml to check).", "",
              "![predicted vs actual](predicted_vs_actual.png)", "", "![weights](weights.png)", ""]
    (out / "report.md").write_text("\n".join(lines))
