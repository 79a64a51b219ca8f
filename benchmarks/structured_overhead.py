"""Structured output's cost: constrained vs free decoding through the same engine, side by side.

A random-init model (the config's architecture, a RUN's tokenizer) generates up to --max-tokens
greedy tokens per request, at batch 1 and batch B, once free and once constrained by a JSON schema.
Every request generates exactly --max-tokens tokens (ignore_eos, and schemas the model cannot finish
within them): --schema array: an array of at least 10^4 small integers (grammar-level counting);
--schema fixed-length: one string longer than the generation (a counted-repetition regex, the
lexer's worst case). Rounds alternate free/constrained (a busy machine
then hits both alike); the best round of each is reported, plus the ratio. Prints a table and
writes JSON.

    python benchmarks/structured_overhead.py RUN [--batch 8] [--max-tokens 64] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path, help="a run directory (its tokenizer.json and config.yaml)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--schema", choices=["array", "fixed-length"], default="array")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/structured_overhead.json"))
    args = ap.parse_args()

    from spud.config import load_config
    from spud.model.registry import build_model
    from spud.serve.engine import Engine, SamplingParams
    from spud.serve.structured import GrammarCompiler
    from spud.tokenizer import Tokenizer

    tok = Tokenizer.load(args.run / "tokenizer.json")
    cfg = load_config(args.run / "config.yaml", [])
    torch.manual_seed(0)
    need = args.max_tokens + 16
    model = build_model(cfg.model.model_copy(update={"max_seq_len": max(cfg.model.max_seq_len, need)}))
    engine = Engine(model, tok, max_batch=max(args.batch, 1), device="cpu")
    engine.start()
    grammars = GrammarCompiler(tok, engine.vocab_size, sorted(engine.end_ids))
    n = args.max_tokens * 8  # longer than any generation: the grammar constrains every step
    if args.schema == "fixed-length":
        value = {"type": "string", "minLength": n, "maxLength": n}
    else:
        value = {"type": "array", "minItems": 10_000, "items": {"type": "integer", "minimum": 0, "maximum": 99}}
    grammar = grammars.json_schema({"type": "object", "required": ["s"], "additionalProperties": False,
                                    "properties": {"s": value}})
    prompt = tok.encode("Describe the weather.", add_bos=True)

    def rate(b: int, constrained: bool) -> float:
        params = [SamplingParams(max_tokens=args.max_tokens, temperature=0, ignore_eos=True,
                                 constraint=grammars.constraint(grammar) if constrained else None)
                  for _ in range(b)]
        t0 = time.perf_counter()
        handles = [engine.submit(prompt, p) for p in params]
        done = sum(len(h.result()[1]) for h in handles)
        return done / (time.perf_counter() - t0)

    rate(1, False), rate(1, True)  # warm-up
    rows = []
    for b in sorted({1, args.batch}):
        free, cons = [], []
        for _ in range(args.rounds):
            free.append(rate(b, False))
            cons.append(rate(b, True))
        rows.append({"batch": b, "free_tok_s": max(free), "constrained_tok_s": max(cons),
                     "ratio": max(cons) / max(free), "free_all": free, "constrained_all": cons})
    engine.shutdown()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    print(f"vocab {engine.vocab_size}, schema {args.schema}, {args.max_tokens} greedy tokens/request, "
          f"load average {load}")
    print(f"{'batch':>5} {'free tok/s':>11} {'constrained tok/s':>18} {'ratio':>6}")
    for r in rows:
        print(f"{r['batch']:>5} {r['free_tok_s']:>11.0f} {r['constrained_tok_s']:>18.0f} {r['ratio']:>6.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"vocab": engine.vocab_size, "max_tokens": args.max_tokens, "schema": args.schema,
                                    "load_average": load, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
