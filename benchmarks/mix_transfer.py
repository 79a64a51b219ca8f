"""Does a searched mixture beat the natural and the uniform one on a model larger than the proxies?

RegMix's bet is that the *ranking* of mixtures measured on tiny proxies transfers to a larger model.
This checks it end to end: `spud mix search` (run_search: proxies, LightGBM, simplex search) on a
recipe, then the larger model (--large overrides on the same recipe) is trained with the searched,
the natural and the uniform weights at EQUAL training FLOPs (the same model and steps: the steps
come from the one FLOP count, via the very function that trains the proxies), each on its own data
build with the search's shared tokenizer, and scored on the target sources' validation documents
(bits per byte; the hash split keeps them out of every training set). Runs alternate mixes within
each seed; every finished run is a row in WORK/final.jsonl, so a rerun resumes.

    python benchmarks/mix_transfer.py --target stdlib_docs --proxies 20 --proxy-flops 2.5e11 \\
        --flops 6e12 --seeds 2 --work /tmp/mixproof/work

The default recipe (written to WORK/recipe.yaml) is the four built-in sources with a 48-wide,
2-layer proxy; --large makes the check model 128 wide and 4 layers deep (8.6x the proxy's
training FLOPs per token). Pass --recipe to search your own sources.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
RECIPE = {
    "seed": 0,
    "data": {"total_tokens": 300_000, "val_fraction": 0.05, "sources": [
        {"name": "stdlib_docs", "type": "builtin", "builtin": "stdlib_docs", "weight": 0.35},
        {"name": "stdlib_code", "type": "builtin", "builtin": "stdlib_code", "weight": 0.15},
        {"name": "arithmetic", "type": "builtin", "builtin": "arithmetic", "weight": 0.25},
        {"name": "reasoning", "type": "builtin", "builtin": "reasoning", "weight": 0.25}]},
    "tokenizer": {"vocab_size": 1024, "train_bytes": 1_000_000},
    "model": {"d_model": 48, "n_layers": 2, "n_heads": 4, "max_seq_len": 128},
    "train": {"micro_batch_size": 8, "lr": 0.003, "warmup_steps": 10, "threads": 1, "sample_every": 0,
              "log_every": 50, "eval_batches": 2},
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--recipe", default=None, help="recipe YAML (default: the built-in four-source recipe)")
    p.add_argument("--target", required=True, help="source name(s), comma-separated")
    p.add_argument("--proxies", type=int, default=20)
    p.add_argument("--proxy-flops", type=float, default=2.5e11)
    p.add_argument("--flops", type=float, default=6e12, help="training FLOPs of each larger run")
    p.add_argument("--large", default="model.d_model=128,model.n_layers=4",
                   help="comma-separated overrides that make the larger model")
    p.add_argument("--seeds", type=int, default=1, help="seeds of the three larger runs")
    p.add_argument("--score-tokens", type=int, default=100_000, help="target validation tokens scored")
    p.add_argument("--no-train", action="store_true", help="only score and tabulate the runs already done")
    p.add_argument("--work", default=str(REPO / "runs" / "mix_transfer"))
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "mix_transfer.json"))
    return p.parse_args(argv)


def rescore(run: Path, targets: list[str], max_tokens: int) -> dict:
    """Target bpb of a finished run's final checkpoint on ALL the target's validation documents
    (up to max_tokens): the scoring inside training stops scanning a source after 30 s, which on a
    loaded machine would give each run a different prefix of the validation documents."""
    import torch

    import spud.eval.intrinsic as intrinsic
    from spud.runs import load_model

    torch.set_num_threads(1)
    intrinsic.MAX_SCAN_SECONDS = float("inf")
    model, tok, cfg, _ = load_model(run, model="base")
    token_bytes = torch.tensor(tok.byte_lengths(model.cfg.vocab_size), dtype=torch.float64)
    with torch.no_grad():
        res = intrinsic.source_metrics(model.eval(), tok, cfg, token_bytes, max_tokens)
    return {t: res[t] for t in targets}


def main(argv=None) -> int:
    from spud.config import _merge, parse_overrides
    from spud.data.mixsearch import run_search, train_on_mix
    from spud.ui import make_console

    args = parse_args(argv)
    work, console = Path(args.work), make_console()
    work.mkdir(parents=True, exist_ok=True)
    recipe = Path(args.recipe) if args.recipe else work / "recipe.yaml"
    if not args.recipe:
        recipe.write_text(yaml.safe_dump(RECIPE, sort_keys=False))
    targets = [t for t in args.target.split(",") if t]
    t0 = time.time()
    search = run_search(recipe, targets, args.proxies, args.proxy_flops, work / "search", console=console)
    search_s = time.time() - t0
    names = search["sources"]
    mixes = {"searched": [search["weights"][n] for n in names], "natural": [search["natural"][n] for n in names],
             "uniform": [1 / len(names)] * len(names)}
    vocab = json.loads((work / "search" / "_natural" / "data" / "manifest.json").read_text())["vocab_size"]
    base = _merge(yaml.safe_load(recipe.read_text()), parse_overrides(args.large.split(",")), "")
    done_path = work / "final.jsonl"
    rows = [json.loads(x) for x in done_path.read_text().splitlines()] if done_path.is_file() else []
    for seed in range(args.seeds):
        for mix, w in mixes.items():
            if args.no_train or any(r["mix"] == mix and r["seed"] == seed for r in rows):
                continue
            console.print(f"[bold]larger model, {mix} mix, seed {seed}[/]: {[round(x, 3) for x in w]}")
            tree = _merge(base, {"seed": seed}, "")
            start = time.time()
            row = train_on_mix(tree, names, w, args.flops, work / "final" / f"{mix}_s{seed}",
                               work / "search" / "_natural" / "tokenizer.json", targets, (vocab + 63) // 64 * 64, console,
                               score_tokens=args.score_tokens, flops_name="--flops")
            row |= {"mix": mix, "seed": seed, "seconds": round(time.time() - start, 1),
                    "load_avg": os.getloadavg()}
            rows.append(row)
            with open(done_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")
    for r in rows:
        scored = rescore(work / "final" / f"{r['mix']}_s{r['seed']}", targets, args.score_tokens)
        r["rescored"] = scored
        r["rescored_bpb"] = statistics.mean(v["bpb"] for v in scored.values())
    table = {}
    for mix in mixes:
        vals = [r["rescored_bpb"] for r in rows if r["mix"] == mix]
        if not vals:
            continue
        table[mix] = {"bpb": vals, "mean": statistics.mean(vals),
                      "spread": (max(vals) - min(vals)) if len(vals) > 1 else None}
    result = {"args": vars(args), "search": search, "search_seconds": round(search_s),
              "runs": rows, "table": table, "machine": platform.processor() or platform.machine(),
              "cpus": os.cpu_count()}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"\nproxies: {search['proxies']} at {args.proxy_flops:.3g} FLOPs; CV Spearman {search['cv_spearman']:.3f}")
    print(f"larger model: {rows[0]['steps']} steps, {rows[0]['flops']:.3g} training FLOPs per run")
    print(f"{'mix':<10}{'weights':<36}{'target bpb (per seed)':<28}mean")
    for mix, w in mixes.items():
        if mix not in table:
            continue
        t = table[mix]
        print(f"{mix:<10}{str([round(x, 3) for x in w]):<36}{str([round(v, 4) for v in t['bpb']]):<28}{t['mean']:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
