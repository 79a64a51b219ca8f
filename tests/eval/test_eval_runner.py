import json
import math
from pathlib import Path

import pytest

from spud.eval.runner import run_eval
from spud.eval.scoring import choice_logprobs


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    from spud.config import load_config
    from spud.train.trainer import Trainer

    run = tmp_path_factory.mktemp("evalrun") / "run"
    cfg = load_config(Path(__file__).parents[2] / "configs" / "tiny.yaml", [
        "train.max_steps=3", "data.total_tokens=60000", "tokenizer.vocab_size=400",
        "tokenizer.train_bytes=200000", "train.micro_batch_size=4", "train.eval_every=3",
        "train.checkpoint_every=3", "train.eval_batches=1"])
    Trainer(cfg, run).run()
    return run


def test_real_model_choice_scores_are_finite(trained_run):
    from spud.runs import load_model

    model, tok, _, _ = load_model(trained_run, None, "cpu")
    scores = choice_logprobs(model, tok.encode("12 + 7 =", add_bos=True),
                             [tok.encode(" 19"), tok.encode(" 20"), tok.encode(" 1234567")], tok.pad_id)
    assert all(math.isfinite(s) and s < 0 for s in scores)


def test_run_eval_end_to_end(trained_run, tmp_path):
    gsm = tmp_path / "gsm.jsonl"
    gsm.write_text(json.dumps({"question": "What is 2 plus 3?", "answer": "2 + 3 = 5\n#### 5"}) + "\n")
    res = run_eval(str(trained_run), f"arithmetic,mc_arithmetic,code_simple,gsm8k:{gsm}", limit=3,
                   fewshot=2, checkpoint=None, device="cpu", seed=0, intrinsic_source_tokens=2000,
                   progress=False)
    out = trained_run / "eval" / "step_0000003"
    saved = json.loads((out / "results.json").read_text())
    assert set(saved["tasks"]) == {"arithmetic", "mc_arithmetic", "code_simple", "gsm8k"}
    for r in saved["tasks"].values():
        assert {"metric", "value", "stderr", "n", "seconds"} <= set(r)
        assert 0.0 <= r["value"] <= 1.0
    assert saved["tasks"]["arithmetic"]["n"] == 3 and saved["tasks"]["gsm8k"]["n"] == 1
    assert saved["tasks"]["mc_arithmetic"]["baseline"] == 0.25
    assert math.isfinite(saved["aggregate"]["centered_mean"])
    assert res["aggregate"] == saved["aggregate"]
    intr = saved["intrinsic"]
    assert math.isfinite(intr["val"]["bpb"]) and intr["val"]["bpb"] > 0
    assert set(intr["sources"]) == {"stdlib_docs", "arithmetic"}
    rows = [json.loads(line) for line in (out / "mc_arithmetic.jsonl").read_text().splitlines()]
    assert len(rows) == 3
    assert {"prompt", "target", "scores", "correct"} <= set(rows[0]) and len(rows[0]["scores"]) == 4
    gen = [json.loads(line) for line in (out / "arithmetic.jsonl").read_text().splitlines()]
    assert {"prompt", "target", "output", "extracted", "correct"} <= set(gen[0])
    assert gen[0]["prompt"].count("\n") == 2  # two few-shot lines, then the question


def test_run_eval_bad_spec_fails_before_loading(trained_run):
    from spud.errors import SpudError

    with pytest.raises(SpudError, match="unknown task"):
        run_eval(str(trained_run), "arithmetic,bogus", None, 0, None, "cpu", 0)


def test_run_eval_sampling_pass_at_k_and_chat(trained_run):
    res = run_eval(str(trained_run), "arithmetic,code_simple", limit=2, fewshot=1, checkpoint=None,
                   device="cpu", seed=1, chat=True, samples=3, temperature=0.8, ks=(1, 2),
                   intrinsic=False, progress=False)
    for name in ("arithmetic", "code_simple"):
        m = res["tasks"][name]["metrics"]
        assert set(m) == {"pass@1", "pass@2"} and m["pass@1"] <= m["pass@2"] <= 1.0
    assert "intrinsic" not in res
    rows = (trained_run / "eval" / "step_0000003" / "arithmetic.jsonl").read_text().splitlines()
    first = json.loads(rows[0])
    assert "<|user|>" in first["prompt"] and len(first["output"]) == 3
