"""docs/architecture.md's "Write your own block" example, taken from the page itself: registered
through model.plugins, trained for a few steps by the CLI, decoded with the KV cache, counted."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from spud.model.flops import flops_per_token, param_counts

from tiny_recipe import TINY_OVERRIDES

ROOT = Path(__file__).parents[2]


def example_source() -> str:
    doc = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    m = re.search(r"<!-- example: my_blocks.py -->\n```python\n(.*?)```", doc, re.S)
    assert m, "docs/architecture.md lost its worked example"
    return m.group(1)


def test_documented_block_trains_decodes_and_counts(tmp_path, monkeypatch):
    (tmp_path / "my_blocks.py").write_text(example_source(), encoding="utf-8")
    run = tmp_path / "run"
    # python -m spud puts the working directory on sys.path: that is how the plugin is found.
    overrides = [*TINY_OVERRIDES, "train.max_steps=8", "train.eval_every=8", "train.checkpoint_every=8",
                 "train.sample_tokens=4", "model.plugins=[my_blocks]", "model.block=sandwich",
                 "model.attn_pattern=LG", "model.attn_window=8"]
    r = subprocess.run([sys.executable, "-m", "spud", "train", "tiny", *overrides, "--out", str(run)],
                       cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()
              if json.loads(line)["kind"] == "train"]
    assert len(losses) == 8 and losses[-1] < losses[0]
    r = subprocess.run([sys.executable, "-m", "spud", "sample", str(run), "--prompt", "The ",
                        "--max-tokens", "6", "--seed", "1"], cwd=tmp_path, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-2000:]
    r = subprocess.run([sys.executable, "-m", "spud", "info", str(run)], cwd=tmp_path, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0 and "block=sandwich" in r.stdout and "attn_window=8" in r.stdout, r.stdout

    monkeypatch.syspath_prepend(str(tmp_path))
    from spud.runs import load_model

    model, _tok, cfg, _ = load_model(run, None, "cpu")  # the config imports the plugin again
    assert type(model.blocks[0]).__name__ == "SandwichBlock"
    assert sum(type(m).__name__ == "RMSNorm" for m in model.blocks[0].children()) == 4
    model.eval()
    idx = torch.randint(0, cfg.model.vocab_size, (2, 20))
    with torch.no_grad():
        full = model(idx)
        cache = model.new_kv_cache(2, 20)
        steps = [model(idx[:, :5], kv_cache=cache)] + [model(idx[:, t : t + 1], kv_cache=cache)
                                                       for t in range(5, 20)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=0)

    counts = param_counts(cfg.model)
    assert counts["total"] == model.num_params()
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc, torch.no_grad():
        model(idx)
    assert fc.get_total_flops() == flops_per_token(cfg.model, 20)["forward"] * 2 * 20
