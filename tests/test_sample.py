import subprocess
import sys

import pytest
import torch

from spud.config import ModelConfig
from spud.model.registry import build_model
from spud.serve.detok import Detokenizer
from spud.serve.sampling import filter_logits, generate, sample_token


@pytest.fixture(scope="module")
def trained(tiny_cfg, built_run, tmp_path_factory):
    import shutil

    from spud.train.trainer import Trainer

    run = tmp_path_factory.mktemp("sampled") / "run"
    shutil.copytree(built_run, run)
    Trainer(tiny_cfg, run).run()
    return run


def sample_cli(run, *args):
    r = subprocess.run([sys.executable, "-m", "spud", "sample", str(run), *args],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_same_seed_same_text(trained):
    a = sample_cli(trained, "--prompt", "The ", "--max-tokens", "20", "--seed", "7")
    b = sample_cli(trained, "--prompt", "The ", "--max-tokens", "20", "--seed", "7")
    c = sample_cli(trained, "--prompt", "The ", "--max-tokens", "20", "--seed", "8", "--temperature", "1.5")
    assert a == b and a.startswith("The ") and len(a) > len("The \n")
    assert c != a


def test_bad_sampling_args_are_clean_errors(trained):
    r = subprocess.run([sys.executable, "-m", "spud", "sample", str(trained), "--temperature", "-1"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "--temperature" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "-m", "spud", "sample", str(trained), "--checkpoint", "999"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "available" in r.stderr


def test_greedy_cached_generation_matches_full_forward():
    torch.manual_seed(0)
    model = build_model(ModelConfig(d_model=32, n_layers=2, n_heads=4, vocab_size=64, max_seq_len=32)).eval()
    prompt = [1, 5, 9]
    cached = list(generate(model, prompt, 10, temperature=0))
    ids = list(prompt)
    for _ in range(10):  # no cache: recompute the whole sequence each step
        ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    assert cached == ids[len(prompt):]


def test_top_k_top_p_filtering():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0]])
    assert torch.isinf(filter_logits(logits, 2, None))[0].tolist() == [False, False, True, True]
    # probabilities ≈ .64 .24 .09 .03: top_p=0.8 keeps the first two
    assert torch.isinf(filter_logits(logits, None, 0.8))[0].tolist() == [False, False, True, True]
    assert sample_token(logits, temperature=0).item() == 0
    g = torch.Generator().manual_seed(0)
    draws = {sample_token(logits, 1.0, top_k=1, generator=g).item() for _ in range(20)}
    assert draws == {0}


def test_streamer_holds_back_partial_utf8():
    data = "é😀".encode()
    # decode a list of "byte tokens" the way a byte-level tokenizer would
    streamer = Detokenizer(lambda ids: bytes(ids).decode("utf-8", errors="replace"))
    pieces = [streamer.push(b) for b in data]
    assert "".join(pieces) + streamer.flush() == "é😀"
    assert all("\ufffd" not in p for p in pieces)


def test_eval_cli_writes_results(trained):
    import json

    r = subprocess.run([sys.executable, "-m", "spud", "eval", str(trained), "--tasks", "mc_arithmetic,arithmetic",
                        "--limit", "4"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    results = list((trained / "eval").glob("*/results.json"))
    assert len(results) == 1
    data = json.loads(results[0].read_text())
    assert "mc_arithmetic" in json.dumps(data) and "aggregate" in json.dumps(data)
    r = subprocess.run([sys.executable, "-m", "spud", "eval", str(trained), "--tasks", "gsm8k:/nonexistent.jsonl"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "nonexistent" in r.stderr and "Traceback" not in r.stderr
