"""benchmarks/llama_cpp_peer.py: the serving benchmark's llama.cpp contender runs the same model.

The run directory it writes must export (through `spud export gguf`, as users do) to a file whose
function is the model's: checked with the numpy reference forward of tests/export, which needs no
llama.cpp. Where llama-cpp-python is installed, llama.cpp itself must also produce the engine's
greedy tokens (skipped elsewhere: installing it compiles llama.cpp)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("gguf")

ROOT = Path(__file__).parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests" / "export"))

import llama_cpp_peer  # noqa: E402
from spud.config import ModelConfig, TokenizerConfig  # noqa: E402
from spud.model.registry import build_model  # noqa: E402
from spud.tokenizer import train_tokenizer  # noqa: E402


@pytest.fixture(scope="module")
def model_and_tok():
    texts = ["the quick brown fox jumps over the lazy dog 0123456789 " * 4, "héllo wörld"] * 20
    tok = train_tokenizer(iter(texts), TokenizerConfig(vocab_size=300, min_frequency=1))
    torch.manual_seed(0)
    cfg = ModelConfig(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=tok.vocab_size,
                      max_seq_len=64, init_std=0.3)  # the default recipe: QK-norm → GGUF qwen3
    return cfg, build_model(cfg).eval(), tok


def test_the_peer_run_exports_to_a_gguf_of_the_same_function(model_and_tok, tmp_path):
    from gguf_reference import forward, load

    from spud.export.gguf import export_gguf

    cfg, model, tok = model_and_tok
    run = llama_cpp_peer.write_run(model, cfg, tok, tmp_path / "run")
    summary = export_gguf(run, tmp_path / "m.gguf", which="base", outtype="f32")
    assert summary["arch"] == "qwen3"
    ids = [tok.bos_id, *range(40, 52)]
    meta, w = load(tmp_path / "m.gguf")
    theirs = forward(meta, w, ids)[:, : tok.vocab_size]
    with torch.no_grad():
        mine = model(torch.tensor([ids]))[0, :, : tok.vocab_size].numpy()
    np.testing.assert_allclose(theirs, mine, atol=1e-4 * max(1.0, float(np.abs(mine).max())))


def test_llama_cpp_decodes_the_engines_greedy_tokens(model_and_tok, tmp_path):
    """Every token llama.cpp picks is the model's top token on that sequence, to llama.cpp's
    rounding (it differs from torch by ~1e-3 of the logits' scale, so a near-tie may go either
    way); up to the first near-tie the engine picks the very same tokens."""
    pytest.importorskip("llama_cpp")
    from spud.serve.engine import Engine, SamplingParams

    cfg, model, tok = model_and_tok
    peer = llama_cpp_peer.LlamaCppPeer.build(model, cfg, tok, tmp_path, threads=1)
    prompt = [tok.bos_id, *range(40, 52)]
    n = 24
    times, theirs = peer.run(prompt, n)
    peer.close()
    assert len(theirs) == len(times) == n and times == sorted(times)
    with torch.no_grad():  # the model's logits along llama.cpp's own continuation
        logits = model(torch.tensor([prompt + theirs]))[0, len(prompt) - 1 : -1, : tok.vocab_size]
    tol = 1e-2 * logits.abs().max().item()
    top2 = logits.topk(2, dim=-1).values
    picked = logits.gather(1, torch.tensor(theirs)[:, None])[:, 0]
    assert (top2[:, 0] - picked <= tol).all(), (top2[:, 0] - picked).tolist()
    ties = (top2[:, 0] - top2[:, 1] <= tol).nonzero()
    clear = n if len(ties) == 0 else int(ties[0])
    assert clear >= 4  # the comparison below is not vacuous
    engine = Engine(model, tok, max_batch=2)
    engine.start()
    try:
        h = engine.submit(prompt, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True))
        mine = [e.token_id for e in h.result()[1]]
    finally:
        engine.shutdown(abort=True)
    assert theirs[:clear] == mine[:clear]
