"""spud dpo: preference pairs from a file (through the CLI) and from the verifiers."""

import json

import pytest
import torch

from spud.cli import main
from spud.errors import SpudError
from spud.posttrain.dpo import dpo_cmd
from spud.runs import choose_model, load_model
from spud.train.metrics import read_metrics


def prefs(path, n=24, bad=0):
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"prompt": f"Say seven ({i}).", "chosen": "7.", "rejected": "3."}) + "\n")
        for _ in range(bad):
            f.write(json.dumps({"prompt": "x", "chosen": "same", "rejected": "same"}) + "\n")
    return str(path)


def test_dpo_learns_the_preference_through_the_cli(base_run, tmp_path):
    data = prefs(tmp_path / "p.jsonl", bad=1)
    rc = main(["dpo", str(base_run), "dpo.epochs=4", "dpo.batch_size=8", "dpo.lr=0.003",
               "dpo.max_bad_fraction=0.1", "train.threads=1", "--from", "base", "--data", data])
    assert rc == 0
    rows = [r for r in read_metrics(base_run / "dpo" / "metrics.jsonl") if r["kind"] == "dpo"]
    assert len(rows) == 12  # 24 pairs / 8 per step × 4 epochs
    assert rows[0]["loss"] == pytest.approx(0.6931, abs=1e-3)  # policy = reference at step 1: −log σ(0)
    assert rows[-1]["loss"] < 0.5 and rows[-1]["accuracy"] == 1.0
    summary = json.loads((base_run / "dpo" / "dpo_data.json").read_text())
    assert summary[0]["pairs"] == 24 and summary[0]["skipped"] == [f"{data}:25: 'chosen' and 'rejected' are the same text"]
    assert choose_model(base_run, "dpo").step == 12
    # independently of the logged margin: the DPO model moved probability to the chosen answer
    gain = {}
    for kind in ("base", "dpo"):
        model, tok, _, _ = load_model(base_run, model=kind, device="cpu")
        p, _ = tok.render_chat([{"role": "user", "content": "Say seven (3)."}], add_generation_prompt=True)
        with torch.no_grad():
            for name, text in (("chosen", "7."), ("rejected", "3.")):
                c = tok.encode(text) + [tok.end_id]
                logp = torch.log_softmax(model(torch.tensor([p + c[:-1]])), -1)[0, len(p) - 1:]
                gain[kind, name] = float(logp.gather(-1, torch.tensor(c)[:, None]).sum())
    assert (gain["dpo", "chosen"] - gain["base", "chosen"]) - (gain["dpo", "rejected"] - gain["base", "rejected"]) > 1.0


def test_dpo_bad_input(base_run, tmp_path):
    with pytest.raises(SpudError, match="no preference data"):
        dpo_cmd(str(base_run), source="base", data=None)
    with pytest.raises(SpudError, match="lines are bad"):
        dpo_cmd(str(base_run), source="base", data=[prefs(tmp_path / "b.jsonl", n=4, bad=2)])
    with pytest.raises(SpudError, match="unknown task 'nope'"):
        dpo_cmd(str(base_run), source="base", data=["verifier:nope"])
    with pytest.raises(SpudError, match="no chat model"):
        dpo_cmd(str(base_run), source="chat", data=[prefs(tmp_path / "c.jsonl")])
