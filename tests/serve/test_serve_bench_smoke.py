"""Smoke test of benchmarks/serve_throughput.py: --quick runs end to end and writes its JSON.

No timing assertions (CI machines are noisy); only that every part ran and reported.
"""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("httpx")

SCRIPT = Path(__file__).parents[2] / "benchmarks" / "serve_throughput.py"


def _load_bench():
    spec = importlib.util.spec_from_file_location("serve_throughput_bench", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_quick_run_writes_expected_json(tmp_path):
    bench = _load_bench()
    out = tmp_path / "serve.json"
    t0 = time.perf_counter()
    rc = bench.main(["--quick", "--max-tokens", "4", "--prompt-tokens", "4",
                     "--concurrency", "1", "2", "--threads", "1", "--out", str(out)])
    elapsed = time.perf_counter() - t0
    assert rc == 0
    assert elapsed < 60  # generous bound for a loaded machine; typically a few seconds
    data = json.loads(out.read_text())

    for key in ("benchmark", "cpu", "cpu_count", "threads", "torch", "transformers", "python",
                "loadavg", "args", "model", "engine", "batch1", "http", "targets"):
        assert key in data, key
    assert data["benchmark"] == "serve_throughput"
    assert data["threads"] == 1
    assert set(data["loadavg"]) == {"before", "after_batch1", "after"}
    assert data["engine"]["max_batch"] >= 64
    assert data["model"]["max_abs_logit_diff_vs_hf"] < 1e-3  # identical weights both sides

    b1 = data["batch1"]
    for name in ("spud_engine", "spud_generate", "hf_generate"):
        r = b1[name]
        assert r["decode_tokens_per_s"] > 0 and r["ttft_s"] > 0
        assert r["tokens_generated"] == [4]  # --rounds 1 under --quick, exact token count
    assert {"engine_vs_hf", "generate_vs_hf", "greedy_tokens_match_hf"} <= set(b1)
    if importlib.util.find_spec("llama_cpp") and importlib.util.find_spec("gguf"):
        assert b1["llama_cpp"]["tokens_generated"] == [4]  # the peer ran on the exported model
        assert {"engine_vs_llama_cpp", "llama_cpp_matches_engine"} <= set(b1)
        assert data["llama_cpp_python"] and "batch1_vs_llama_cpp" in data["targets"]
    else:  # absent peer: said, not silently dropped
        assert "llama_cpp" not in b1 and "not installed" in data["llama_cpp_note"]

    assert [h["concurrency"] for h in data["http"]] == [1, 2]
    for h in data["http"]:
        assert h["requests_failed"] == 0 and not h["timed_out"]
        assert h["requests_completed"] == h["concurrency"] * h["requests_per_client"]
        assert h["completion_tokens"] == 4 * h["requests_completed"]
        for k in ("aggregate_tokens_per_s", "ttft_p50_s", "ttft_p99_s", "latency_p50_s",
                  "latency_p99_s", "wall_s"):
            assert h[k] is not None and h[k] > 0, k
    assert [e["concurrency"] for e in data["engine_streams"]] == [1, 2]
    assert all(e["aggregate_tokens_per_s"] > 0 for e in data["engine_streams"])
    assert "batch1_vs_hf" in data["targets"]


def test_quick_only_fills_unset_flags():
    bench = _load_bench()
    args = bench.parse_args(["--quick", "--preset", "micro"])
    assert args.preset == "micro" and args.max_tokens == 8 and args.concurrency == [1, 2]
    full = bench.parse_args([])
    assert full.concurrency == [1, 4, 16, 64] and full.preset == "micro"


# ---- decode-path shortcuts made with this benchmark: they must not change any result ----
def _nano(vocab: int = 300):
    import torch

    from spud.config import ModelConfig
    from spud.model.registry import build_model

    torch.manual_seed(0)
    # tied: a random model whose greedy output the penalty test sees change
    return build_model(ModelConfig(preset="nano", vocab_size=vocab, max_seq_len=64,
                                   tie_embeddings=True)).eval()


def test_slot_decode_without_mask_matches_masked():
    """Equal-length rows decoding one token skip the (all-True) mask; same numbers as with it."""
    import torch

    model = _nano()
    cache = model.new_slot_cache(4, 32)
    x = torch.randint(0, 300, (2, 5))
    with torch.inference_mode():
        for row, slot in enumerate((1, 3)):
            model.forward_slots(x[row : row + 1], cache, [slot], [0])
        nxt = torch.randint(0, 300, (2, 1))
        cache.bind([1, 3], [5, 5], 1)
        assert cache.mask is None
        fast = model.hidden_states(nxt, cache)
        cache.bind([1, 3], [5, 5], 1)
        cache.mask = torch.ones(2, 1, 1, 6, dtype=torch.bool)
        ref = model.hidden_states(nxt, cache)
        cache.bind([1, 3], [4, 5], 1)  # unequal lengths still get a mask
        assert cache.mask is not None
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-5)


def test_engine_batch_reuse_keeps_per_request_params():
    """The engine reuses a batch's parameter tensors while its members are unchanged; a
    penalised request must give the same tokens alone and next to greedy ones, also in a slot
    that plain requests used before (their counts are no longer accumulated)."""
    from spud.serve.engine import Engine, SamplingParams

    bench = _load_bench()
    tok = bench.make_tokenizer(400, 0)
    model = _nano(tok.vocab_size)
    prompt = bench.make_prompt(tok, 6, 0)
    pen = SamplingParams(max_tokens=12, temperature=0.0, frequency_penalty=1.5,
                         presence_penalty=1.0, ignore_eos=True)
    plain = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)

    def ids(handle):
        return [e.token_id for e in handle.result()[1]]

    alone = Engine(model, tok, max_batch=4)
    alone.start()
    ref_pen = ids(alone.submit(prompt, pen))
    ref_plain = ids(alone.submit(prompt, plain))
    alone.shutdown()

    eng = Engine(model, tok, max_batch=4)
    eng.start()
    assert ids(eng.submit(prompt, plain)) == ref_plain  # occupies slot 0 first
    handles = [eng.submit(prompt, plain), eng.submit(prompt, pen), eng.submit(prompt, plain)]
    got = [ids(h) for h in handles]
    eng.shutdown()
    assert got == [ref_plain, ref_pen, ref_plain]
    assert ref_pen != ref_plain[: len(ref_pen)]  # the penalty did change the output
