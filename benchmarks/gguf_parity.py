"""GGUF parity: the file `spud export gguf` writes, run by llama.cpp (through llama-cpp-python),
against Spud's own forward on the same token ids.

For each --outtype and each prompt: the prompt is tokenized by both (llama.cpp with the GGUF's
tokenizer metadata, Spud with its tokenizer; the ids must be equal), then every position's
next-token distribution is compared: top-1 agreement and max / mean |Δ log-prob| over the whole
vocabulary. Then the greedy continuation of each prompt (32 tokens) is compared token by token.

    python benchmarks/gguf_parity.py [--run RUN] [--outtype f32 f16 q8_0] [--qk-norm] [--engine E]

--engine llama.cpp (default when llama-cpp-python is installed) runs the file in llama.cpp;
--engine reference (the fallback) runs tests/export/gguf_reference.py, a numpy forward that reads
only the file and applies llama.cpp's conventions (pair RoPE for llama, NeoX RoPE for qwen3). The
reference engine does not check llama.cpp's tokenizer (that column reads n/a). The JSON records
which engine produced the figures.

Without --run, a tiny run is trained first (configs/tiny.yaml, a few steps) in a temp dir;
--qk-norm trains it with QK-norm, which exports to the qwen3 arch instead of llama. Not part of
the test suite: llama-cpp-python compiles llama.cpp when installed (pip install llama-cpp-python).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "tests" / "export"))  # gguf_reference.py

PROMPTS = ["The ", "12 + 7 = ", "def main():\n    ", "import os\nimport sys\n\n",
           "Returns the number of items in a container.", "3 * 4 = 12\n5 * 6 = "]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", default=None, help="run directory (default: train a tiny one)")
    p.add_argument("--outtype", nargs="+", default=["f32", "f16", "q8_0"])
    p.add_argument("--qk-norm", action="store_true", help="tiny run with QK-norm (qwen3 arch)")
    p.add_argument("--steps", type=int, default=60, help="training steps of the tiny run")
    p.add_argument("--greedy", type=int, default=32, help="greedy tokens compared per prompt")
    p.add_argument("--engine", choices=["auto", "llama.cpp", "reference"], default="auto")
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/gguf_parity.json"))
    return p.parse_args(argv)


def tiny_run(tmp: Path, qk_norm: bool, steps: int) -> Path:
    from rich.console import Console

    from spud.config import load_config
    from spud.train.trainer import Trainer
    from tiny_recipe import TINY_OVERRIDES

    over = [*TINY_OVERRIDES, f"train.max_steps={steps}", "train.sample_prompts=[]", "model.max_seq_len=128",
            "train.seq_len=64", f"model.qk_norm={str(qk_norm).lower()}"]
    cfg = load_config(ROOT / "configs" / "tiny.yaml", over)
    run = tmp / "tiny-run"
    Trainer(cfg, run, console=Console(quiet=True)).run()
    return run


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


class LlamaCpp:
    name = "llama.cpp"

    def __init__(self, path: Path, n_ctx: int):
        from llama_cpp import Llama

        self.llm = Llama(model_path=str(path), n_ctx=n_ctx, logits_all=True, verbose=False, n_threads=2)

    def tokenize(self, text: str):
        return self.llm.tokenize(text.encode("utf-8"), add_bos=True, special=False)

    def logits(self, ids: list[int]) -> np.ndarray:
        self.llm.reset()
        self.llm.eval(ids)
        return np.array(self.llm.scores[: len(ids)], dtype=np.float64)

    def greedy(self, ids: list[int], n: int) -> list[int]:
        out = []
        for t in self.llm.generate(ids, temp=0.0, top_k=1, reset=True):
            out.append(int(t))
            if len(out) == n:
                break
        return out


class Reference:
    name = "reference (numpy, llama.cpp conventions)"

    def __init__(self, path: Path, n_ctx: int):
        from gguf_reference import load

        self.meta, self.w = load(path)

    def tokenize(self, text: str):
        return None  # not llama.cpp's tokenizer: not checked

    def logits(self, ids: list[int]) -> np.ndarray:
        from gguf_reference import forward

        return forward(self.meta, self.w, ids)

    def greedy(self, ids: list[int], n: int) -> list[int]:
        seq = list(ids)
        for _ in range(n):
            seq.append(int(self.logits(seq)[-1].argmax()))
        return seq[len(ids):]


def compare(engine, src, prompt: str, greedy: int) -> dict:
    tok, model = src.tokenizer, src.model
    ids = tok.encode(prompt, add_bos=True)
    theirs_ids = engine.tokenize(prompt)
    n_vocab = tok.vocab_size  # padding rows beyond the tokenizer are never produced by either
    theirs = engine.logits(ids)[:, :n_vocab]
    with torch.no_grad():
        mine = model(torch.tensor([ids]))[0, :, :n_vocab].float().numpy()
    lp_t, lp_m = log_softmax(theirs), log_softmax(mine)
    diff = np.abs(lp_t - lp_m)
    # greedy continuation, token by token, each side on its own previous outputs
    from spud.serve.sampling import generate

    mine_gen = list(generate(model, ids, greedy, temperature=0.0))
    theirs_gen = engine.greedy(ids, greedy)
    same = next((i for i, (a, b) in enumerate(zip(mine_gen, theirs_gen)) if a != b), len(mine_gen))
    return {"prompt": prompt, "tokens": len(ids),
            "same_tokenization": None if theirs_ids is None else theirs_ids == ids,
            "top1_agree": float((lp_t.argmax(-1) == lp_m.argmax(-1)).mean()),
            "max_abs_dlogprob": float(diff.max()), "mean_abs_dlogprob": float(diff.mean()),
            "greedy_same_prefix": same, "greedy_len": len(mine_gen)}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        import llama_cpp
    except ImportError:
        llama_cpp = None
    if args.engine == "llama.cpp" and llama_cpp is None:
        print("llama-cpp-python is not installed (pip install llama-cpp-python; it compiles llama.cpp)")
        return 2
    engine_cls = LlamaCpp if args.engine == "llama.cpp" or (args.engine == "auto" and llama_cpp) else Reference
    print(f"engine: {engine_cls.name}")
    from spud.export.gguf import export_gguf
    from spud.export.source import load_source

    with tempfile.TemporaryDirectory() as tmpd:
        tmp = Path(tmpd)
        run = Path(args.run) if args.run else tiny_run(tmp, args.qk_norm, args.steps)
        src = load_source(run)
        rows = []
        for outtype in args.outtype:
            path = tmp / f"model-{outtype}.gguf"
            s = export_gguf(run, path, outtype=outtype, force=True)
            engine = engine_cls(path, src.cfg.model.max_seq_len)
            t0 = time.perf_counter()
            per = [compare(engine, src, p, args.greedy) for p in PROMPTS]
            rows.append({"outtype": outtype, "arch": s["arch"], "bytes": s["bytes"], "prompts": per,
                         "seconds": round(time.perf_counter() - t0, 2)})
            del engine
    print(f"{'outtype':8} {'arch':6} {'tok ids =':>9} {'top-1 agree':>11} {'max |Δlogp|':>12} "
          f"{'mean |Δlogp|':>13} {'greedy = (of)':>14}")
    for r in rows:
        p = r["prompts"]
        agree = sum(x["top1_agree"] * x["tokens"] for x in p) / sum(x["tokens"] for x in p)
        same = ("n/a" if p[0]["same_tokenization"] is None
                else f"{sum(x['same_tokenization'] for x in p)}/{len(p)}")
        print(f"{r['outtype']:8} {r['arch']:6} {same:>9} "
              f"{agree:>11.4f} {max(x['max_abs_dlogprob'] for x in p):>12.2e} "
              f"{np.mean([x['mean_abs_dlogprob'] for x in p]):>13.2e} "
              f"{sum(x['greedy_same_prefix'] for x in p):>6} ({sum(x['greedy_len'] for x in p)})")
    result = {"engine": engine_cls.name, "rows": rows,
              "llama_cpp_python": getattr(llama_cpp, "__version__", None) if llama_cpp else None,
              "torch": torch.__version__, "platform": platform.platform(), "run": str(args.run or "tiny")}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
