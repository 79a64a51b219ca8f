"""`spud demo --rl`: a short RL stage after the demo's SFT (RUN/chat → RUN/rl).

Not part of the default demo: the whole demo with this stage does not fit in 10 minutes on two
CPU cores (see docs/rl.md, "Measured"). The settings are the ones chosen on the dev split there;
the stage reports the greedy held-out pass@1 on the multi-step problems before and after, as
logged by the RL run itself (`rl_eval` rows of RUN/rl/metrics.jsonl).
"""

from __future__ import annotations

import time
from pathlib import Path

from rich.console import Console

# Chosen on the dev split (docs/rl.md): dynamic sampling on (the default), every difficulty level.
RL_OVERRIDES = ["rl.steps=20", "rl.prompts_per_step=8", "rl.group=8", "rl.eval_every=20",
                "rl.checkpoint_every=10", "rl.heldout_problems=200"]
RL_QUICK_OVERRIDES = ["rl.steps=2", "rl.prompts_per_step=2", "rl.group=4", "rl.max_tokens=24",
                      "rl.max_sample_rounds=2", "rl.eval_every=2", "rl.heldout_problems=8",
                      "rl.train_problems=200"]


def run_rl_stage(out: Path, quick: bool, console: Console) -> dict:
    """RL from the demo's chat model on the built-in arithmetic tasks; continues an interrupted stage."""
    from spud.posttrain.rl import rl_cmd
    from spud.train.checkpoint import latest_checkpoint
    from spud.train.metrics import read_metrics

    console.rule("[bold]rl: reinforcement learning on verifiable arithmetic (built-in tasks)")
    t0 = time.time()
    resume = latest_checkpoint(out / "rl") is not None
    summary = rl_cmd(str(out), "chat", ["arithmetic"], overrides=RL_QUICK_OVERRIDES if quick else RL_OVERRIDES,
                     resume=resume, console=console)
    if summary.get("interrupted"):
        console.print(f"demo stopped after RL step {summary['steps']}; run it again with --rl to continue")
        return summary
    evals = [r for r in read_metrics(out / "rl" / "metrics.jsonl") if r["kind"] == "rl_eval" and "pass@1" in r]
    if evals:
        first, last = evals[0], evals[-1]
        console.print(f"rl held-out pass@1 (greedy, {last['n']} multi-step problems in eval-only wordings): "
                      f"{first['pass@1']:.1%} at step {first['step']} → {last['pass@1']:.1%} at step "
                      f"{last['step']}, {time.time() - t0:.0f} s", soft_wrap=True, highlight=False)
        summary["heldout_pass@1"] = [(r["step"], r["pass@1"]) for r in evals]
    return summary
