"""Speculative decoding, on vs off, side by side in one run: plain decoding, prompt lookup
(n-gram drafts) and a draft model, on the same engine settings, prompts and weights.

    python benchmarks/speculation.py RUN [--draft RUN2] [--k 4] [--batch 1 8] [--max-tokens 96]
    (also: python benchmarks/serve_throughput.py --speculation RUN ...)

Two workloads, greedy, every request generating exactly --max-tokens tokens (end tokens ignored):
- `copy`: a passage of RUN's validation data followed by its first quarter again, so a model
  that has learnt to continue a repeat copies (what prompt lookup is for: quoting, editing,
  extraction, code changes);
- `free`: a passage of validation data to continue freely (what a draft model is for).
For each workload and batch size (B requests submitted together), each contender decodes the
same prompts; rounds alternate the order. Reported per contender: generated tokens/s (median
round, wall time from submit to the last token), speed-up over plain decoding in the same
round set, draft acceptance rate, tokens gained per verifying forward, and whether the tokens
are identical to plain decoding (they must be, greedy).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from spud.data.shards import load_manifest, token_dtype
from spud.runs import choose_model, default_serving_model, load_choice
from spud.serve.engine import Engine, SamplingParams
from spud.serve.speculative import load_draft


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", help="the served (target) run")
    p.add_argument("--draft", default=None, help="a smaller run with the same tokenizer")
    p.add_argument("--model", default=None, choices=["base", "chat"], help="RUN's model")
    p.add_argument("--k", type=int, default=4, help="tokens drafted per step")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8], help="requests decoded together")
    p.add_argument("--max-tokens", type=int, default=96)
    p.add_argument("--prompt-tokens", type=int, default=96)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--workloads", nargs="+", default=["copy", "free"], choices=["copy", "free"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1: on a shared, oversubscribed CPU more threads mostly wait)")
    p.add_argument("--out", default="benchmarks/results/speculation.json")
    return p.parse_args(argv)


def val_prompts(run: Path, vocab: int, n: int, length: int, workload: str) -> list[list[int]]:
    """n prompts cut from RUN's validation shards (train shards if there is no validation)."""
    manifest = load_manifest(run)
    files = sorted((run / "data").glob("val_*.bin")) or sorted((run / "data").glob("train_*.bin"))
    if not files:
        raise SystemExit(f"{run}/data has no token shards (manifest: {manifest.get('splits', '?')})")
    tokens = np.concatenate([np.fromfile(f, dtype=token_dtype(vocab)) for f in files]).astype(np.int64)
    body = length - length // 4 if workload == "copy" else length
    stride = max(1, (len(tokens) - body) // n)
    out = []
    for i in range(n):
        passage = tokens[i * stride:i * stride + body].tolist()
        out.append(passage + passage[:length // 4] if workload == "copy" else passage)
    return out


def run_once(model, tok, prompts, args, **spec) -> dict:
    eng = Engine(model, tok, max_batch=len(prompts), device=args.device, **spec)
    eng.start()
    try:
        params = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
        t0 = time.perf_counter()
        handles = [eng.submit(p, params) for p in prompts]
        results = [h.result() for h in handles]
        wall = time.perf_counter() - t0
    finally:
        eng.shutdown()
    stats = eng.stats()
    n = sum(len(toks) for _, toks, _ in results)
    return {"tokens": [[e.token_id for e in toks] for _, toks, _ in results], "wall_s": wall,
            "tokens_per_s": n / wall, "acceptance": stats.get("spec_acceptance_rate"),
            "per_forward": stats.get("spec_tokens_per_row_step")}


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    run = Path(args.run)
    choice = choose_model(run, args.model or default_serving_model(run))
    model, tok, cfg = load_choice(choice, args.device)
    contenders = {"plain": {}, f"ngram-k{args.k}": {"speculate": args.k}}
    draft_params = None
    if args.draft:
        draft = load_draft(args.draft, None, args.device, tok)
        draft_params = sum(p.numel() for p in draft.parameters())
        contenders[f"draft-k{args.k}"] = {"speculate": args.k, "draft_model": draft}
    load = os.getloadavg()
    print(f"target {run.name}: {sum(p.numel() for p in model.parameters()):,} params; "
          + (f"draft {Path(args.draft).name}: {draft_params:,} params; " if args.draft else "")
          + f"torch threads {torch.get_num_threads()}; load average {load[0]:.2f}", flush=True)
    rows = []
    with torch.inference_mode():
        for workload in args.workloads:
            for b in args.batch:
                prompts = val_prompts(run, cfg.model.vocab_size, b, args.prompt_tokens, workload)
                names = list(contenders)
                res: dict[str, list[dict]] = {k: [] for k in names}
                run_once(model, tok, prompts[:1], args)  # warm-up
                for r in range(args.rounds):
                    order = names if r % 2 == 0 else names[::-1]
                    for k in order:
                        res[k].append(run_once(model, tok, prompts, args, **contenders[k]))
                base = statistics.median(x["tokens_per_s"] for x in res["plain"])
                for k in names:
                    rate = statistics.median(x["tokens_per_s"] for x in res[k])
                    last = res[k][-1]
                    rows.append({"workload": workload, "batch": b, "contender": k, "tokens_per_s": rate,
                                 "speedup": rate / base, "acceptance": last["acceptance"],
                                 "tokens_per_forward": last["per_forward"],
                                 "identical_to_plain": all(x["tokens"] == res["plain"][0]["tokens"]
                                                           for x in res[k]),
                                 "rounds_tokens_per_s": [x["tokens_per_s"] for x in res[k]]})
                    print(_fmt(rows[-1]), flush=True)
    load_after = os.getloadavg()
    print(f"load average after: {load_after[0]:.2f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"benchmark": "speculation", "args": vars(args), "rows": rows,
                               "loadavg": {"before": load, "after": load_after}}, indent=2))
    print(f"wrote {out}")
    return 0


def _fmt(r: dict) -> str:
    acc = "-" if r["acceptance"] is None else f"{r['acceptance']:.2f}"
    per = "-" if r["tokens_per_forward"] is None else f"{r['tokens_per_forward']:.2f}"
    return (f"{r['workload']:5} B={r['batch']:<3} {r['contender']:9} {r['tokens_per_s']:8.1f} tok/s  "
            f"x{r['speedup']:.2f}  accept {acc}  tok/fwd {per}  identical {r['identical_to_plain']}")


if __name__ == "__main__":
    sys.exit(main())
