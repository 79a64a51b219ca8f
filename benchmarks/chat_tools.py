"""The demo's chat eval with the tool-use split, for one or more chat models side by side (e.g. a
chat model fine-tuned with sft.tool_share=0.1 next to one fine-tuned without tool data, from the
same base): exact match on the five held-out splits (spud.posttrain.chat_eval, no tools offered),
then the calculator offered on held-out questions (well-formed calls, calls whose result is the
answer, correct answers after the tool's result, any correct answer) and on requests that need no
tool (share answered without a call). Greedy, through the serving engine (complete_many).

    python benchmarks/chat_tools.py CHAT_RUN [CHAT_RUN ...] [--n 100] [--tool-n 100] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="chat run directories (RUN/chat) or runs holding one")
    p.add_argument("--n", type=int, default=100, help="questions per chat-eval split (the demo's 100)")
    p.add_argument("--tool-n", type=int, default=100, help="held-out calculator questions")
    p.add_argument("--direct-n", type=int, default=50, help="requests that need no tool")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="benchmarks/results/chat_tools.json")
    args = p.parse_args(argv)

    import torch

    from spud.posttrain.chat_eval import SPLITS, direct_prompts, eval_items, split_accuracy, tool_accuracy, tool_items
    from spud.runs import load_model
    from spud.train.checkpoint import read_state

    torch.set_num_threads(args.threads)
    items = [it for split in SPLITS for it in eval_items(split, args.n)]
    tools, direct = tool_items(args.tool_n), direct_prompts(args.direct_n)
    rows = []
    for run in args.runs:
        model, tok, cfg, ckpt = load_model(run, device="cpu", model="chat")
        t0 = time.time()
        chat = split_accuracy(model, tok, items, chat=True)
        t1 = time.time()
        tool = tool_accuracy(model, tok, tools, direct, examples=3)
        # the saved config, not the validated one: a run from before sft.tool_share had no tool data
        saved = read_state(ckpt)["config"].get("sft") or {}
        rows.append({"run": str(run), "checkpoint": str(ckpt), "tool_share": float(saved.get("tool_share", 0.0)),
                     "splits": {s: chat[s]["accuracy"] for s in SPLITS},
                     "calls_without_tools": sum(chat[s]["tool_calls"] for s in SPLITS) / len(items),
                     "tool_use": {k: v for k, v in tool.items() if k != "examples"},
                     "tool_examples": tool["examples"],
                     "seconds": {"splits": round(t1 - t0, 1), "tool_use": round(time.time() - t1, 1)}})
    head = f"{'run':<40} {'share':>5} " + " ".join(f"{s[:9]:>9}" for s in SPLITS)
    head += f" {'called':>7} {'right':>6} {'after':>6} {'answer':>7} {'direct':>7} {'unasked':>8}"
    print(f"chat eval ({args.n}/split, no tools) and tool use ({args.tool_n} held-out questions, calculator "
          f"offered; direct: {args.direct_n} requests that need no tool, answered without a call; unasked: "
          "chat-eval answers that wrote a call though no tool was offered)")
    print(head)
    for r in rows:
        t = r["tool_use"]
        print(f"{r['run'][-40:]:<40} {r['tool_share']:>5.2f} "
              + " ".join(f"{r['splits'][s]:>9.0%}" for s in SPLITS)
              + f" {t['called']:>7.0%} {t['call_right']:>6.0%} {t['after_call']:>6.0%} {t['accuracy']:>7.0%}"
              f" {t['direct']['no_call']:>7.0%} {r['calls_without_tools']:>8.1%}")
        for q, transcript, ok in r["tool_examples"]:
            print(f"    {q} → {transcript} {'✓' if ok else '✗'}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"n": args.n, "tool_n": args.tool_n, "direct_n": args.direct_n,
                               "load_average": os.getloadavg(), "rows": rows}, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
