"""Chunked vs whole-prompt prefill: inter-token latency of running streams while long prompts
arrive, both engines on the same weights in the same run (alternating rounds).

Each round: `--streams` short requests decode continuously; once they run, `--long` prompts of
`--long-tokens` tokens arrive `--gap` seconds apart. Recorded: the gaps between consecutive tokens
of the running streams while the long prompts are in the engine (first arrival to last first
token), their p50 / p99 / max, and the long prompts' time to first token.

With --prefix: time to first token of the second turn of a long chat (turn 1 = `--long-tokens`
prompt + 16 answer tokens, turn 2 adds 32 tokens), an engine with the prefix cache vs one
without, alternating rounds on fresh conversations.

    python benchmarks/prefill_stall.py [--long-tokens 2000] [--chunk 256] [--rounds 3] [--prefix]
    python benchmarks/serve_throughput.py --prefill-stall   (the same, from the serve benchmark)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from spud.config import ModelConfig
from spud.model.registry import build_model
from spud.serve.engine import Engine, FinishEvent, SamplingParams


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--streams", type=int, default=4)
    p.add_argument("--long", type=int, default=3, help="long prompts per round")
    p.add_argument("--long-tokens", type=int, default=2000)
    p.add_argument("--gap", type=float, default=0.3, help="seconds between long arrivals")
    p.add_argument("--chunk", type=int, default=256, help="prefill_chunk of the chunked engine")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--prefix", action="store_true", help="prefix-cache second-turn TTFT instead")
    p.add_argument("--out", default="benchmarks/results/prefill_stall.json")
    return p.parse_args(argv)


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def one_round(engine: Engine, args, seed: int) -> tuple[list[float], list[float]]:
    g = torch.Generator().manual_seed(seed)
    ids = lambda n: torch.randint(4, args.vocab, (n,), generator=g).tolist()  # noqa: E731
    stamps: list[list[float]] = [[] for _ in range(args.streams)]
    room = engine.max_context - 16
    shorts = [engine.submit(ids(16), SamplingParams(temperature=0, max_tokens=room, ignore_eos=True))
              for _ in range(args.streams)]

    def drain(k, h):
        for ev in h:
            if isinstance(ev, FinishEvent):
                return
            stamps[k].append(time.perf_counter())
    threads = [threading.Thread(target=drain, args=(k, h)) for k, h in enumerate(shorts)]
    for t in threads:
        t.start()
    while min(len(s) for s in stamps) < 5:
        time.sleep(0.01)
    t_first = time.perf_counter()
    ttft: list[float] = []
    waiters = []

    def wait_long(t0, h):  # max_tokens=1: finished = first token
        h.result()
        ttft.append(time.perf_counter() - t0)
    for _ in range(args.long):
        h = engine.submit(ids(args.long_tokens), SamplingParams(temperature=0, max_tokens=1))
        waiters.append(threading.Thread(target=wait_long, args=(time.perf_counter(), h)))
        waiters[-1].start()
        time.sleep(args.gap)
    for w in waiters:
        w.join()
    t_last = time.perf_counter()
    for h in shorts:
        h.cancel()
    for t in threads:
        t.join()
    gaps = [b - a for s in stamps for a, b in zip(s, s[1:]) if t_first <= b and a <= t_last]
    return gaps, ttft


def prefix_ttft(args, model, tok) -> dict:
    cold = Engine(model, tok, max_batch=2, prefill_chunk=args.chunk)
    warm = Engine(model, tok, max_batch=2, prefill_chunk=args.chunk, prefix_cache_tokens=4 * args.long_tokens)
    ttft: dict[str, list[float]] = {"no cache": [], "prefix cache": []}
    same = True
    for e in (cold, warm):
        e.start()
    try:
        for r in range(args.rounds):
            g = torch.Generator().manual_seed(100 + r)
            turn1 = torch.randint(4, args.vocab, (args.long_tokens,), generator=g).tolist()
            extra = torch.randint(4, args.vocab, (32,), generator=g).tolist()
            outs = []
            for name, e in (("no cache", cold), ("prefix cache", warm)):
                p = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
                answer = [ev.token_id for ev in e.submit(turn1, p).result()[1]]
                t0 = time.perf_counter()
                h = e.submit(turn1 + answer + extra, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
                first = next(iter(h))
                ttft[name].append(time.perf_counter() - t0)
                outs.append([first.token_id] + [ev.token_id for ev in h.result()[1]])
            same &= outs[0] == outs[1]
        stats = warm.stats()
    finally:
        cold.shutdown(abort=True)
        warm.shutdown(abort=True)
    res = {"benchmark": "prefix_ttft", "args": vars(args), "identical_outputs": same,
           "cache_hit_rate": stats["prefix_cache_hit_rate"], "results": {}}
    print(f"second-turn TTFT, turn 1 = {args.long_tokens} + 16 tokens, turn 2 adds 32; {args.rounds} rounds; "
          f"outputs identical: {same}; hit rate {stats['prefix_cache_hit_rate']:.2f}")
    for k, v in ttft.items():
        res["results"][k] = {"ttft_s_median": statistics.median(v), "rounds_s": v}
        print(f"{k:<14} TTFT median {1e3 * statistics.median(v):8.1f} ms")
    return res


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.manual_seed(0)
    max_len = args.long_tokens + 2048
    model = build_model(ModelConfig(d_model=args.d_model, n_layers=args.layers, n_heads=4, n_kv_heads=2,
                                    vocab_size=args.vocab, max_seq_len=max_len)).eval()
    tok = SimpleNamespace(end_id=1, eos_id=2, bos_id=3, pad_id=0, decode=lambda ids, **k: "")
    if args.prefix:
        load_before = list(os.getloadavg())
        res = prefix_ttft(args, model, tok)
        res |= {"load_avg_before": load_before, "load_avg_after": list(os.getloadavg())}
        print(f"load avg {load_before} -> {res['load_avg_after']}")
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(res, indent=2) + "\n", encoding="utf-8")
        return res
    engines = {"whole": Engine(model, tok, max_batch=args.streams + args.long, prefill_chunk=None),
               f"chunked-{args.chunk}": Engine(model, tok, max_batch=args.streams + args.long,
                                               prefill_chunk=args.chunk)}
    for e in engines.values():
        e.start()
    load_before = list(os.getloadavg())
    gaps = {k: [] for k in engines}
    ttft = {k: [] for k in engines}
    try:
        for r in range(args.rounds):
            for k, e in engines.items():
                g, t = one_round(e, args, seed=r)
                gaps[k] += g
                ttft[k] += t
    finally:
        for e in engines.values():
            e.shutdown(abort=True)
    res = {"benchmark": "prefill_stall", "args": vars(args), "threads": torch.get_num_threads(),
           "load_avg_before": load_before, "load_avg_after": list(os.getloadavg()), "results": {}}
    print(f"{args.streams} running streams, {args.long} prompts of {args.long_tokens} tokens arriving "
          f"{args.gap}s apart, {args.rounds} alternating rounds; model d={args.d_model} L={args.layers}; "
          f"load avg {res['load_avg_before']} -> {res['load_avg_after']}")
    print(f"{'prefill':<14} {'ITL p50 ms':>11} {'ITL p99 ms':>11} {'ITL max ms':>11} {'long TTFT s':>12}")
    for k in engines:
        row = {"itl_p50_ms": 1e3 * _pct(gaps[k], 0.5), "itl_p99_ms": 1e3 * _pct(gaps[k], 0.99),
               "itl_max_ms": 1e3 * max(gaps[k]), "gaps": len(gaps[k]),
               "long_ttft_s_median": statistics.median(ttft[k])}
        res["results"][k] = row
        print(f"{k:<14} {row['itl_p50_ms']:>11.1f} {row['itl_p99_ms']:>11.1f} {row['itl_max_ms']:>11.1f} "
              f"{row['long_ttft_s_median']:>12.2f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {out}")
    return res


if __name__ == "__main__":
    main()
