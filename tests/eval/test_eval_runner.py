"""`spud eval` on a real tiny run: scores checked against the model's own forward pass and the
per-example JSONL, which model (base or chat) is evaluated and where its results go, the
prompt-format guard, and the sampling flags (pass@k) from the command line."""

import json
import math
from pathlib import Path

import pytest
import torch

from spud.cli import main
from spud.errors import SpudError
from spud.eval.runner import run_eval
from spud.eval.scoring import choice_logprobs

TINY = Path(__file__).parents[2] / "configs" / "tiny.yaml"
SFT_OVERRIDES = ["sft.max_steps=3", "sft.checkpoint_every=3", "sft.eval_every=3", "sft.eval_batches=1",
                 "sft.micro_batch_size=4", "sft.builtin_conversations=120", "train.sample_tokens=4",
                 "train.threads=1", "sft.max_bad_fraction=0.5"]  # long built-in chats do not fit 64 tokens


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    from rich.console import Console

    from spud.config import load_config
    from spud.train.trainer import Trainer

    run = tmp_path_factory.mktemp("evalrun") / "run"
    cfg = load_config(TINY, [
        "train.max_steps=3", "data.total_tokens=60000", "tokenizer.vocab_size=400",
        "tokenizer.train_bytes=200000", "train.micro_batch_size=4", "train.eval_every=3",
        "train.checkpoint_every=3", "train.eval_batches=1"])
    Trainer(cfg, run, console=Console(quiet=True)).run()
    return run


@pytest.fixture(scope="module")
def chat_run(trained_run):
    """RUN/chat from a real `spud sft`, stopped at step 3: the same checkpoint name as the base
    model's latest (step_0000003), the case where results used to overwrite each other."""
    from rich.console import Console

    from spud.posttrain.sft import sft_cmd

    sft_cmd(str(trained_run), ["builtin"], None, SFT_OVERRIDES, resume=False, console=Console(quiet=True))
    assert (trained_run / "chat" / "checkpoints" / "step_0000003").is_dir()
    return trained_run


def logprob_by_hand(model, ctx: list[int], cont: list[int]) -> float:
    """log p(cont | ctx) from one unbatched forward pass, summed token by token; a context that
    does not fit in front of the continuation keeps its end (the scorer's documented rule: the
    last max_seq_len + 1 tokens, the final one only a target, as lm-eval's adapter does)."""
    ctx = ctx[-(model.cfg.max_seq_len + 1 - len(cont)):]
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([(ctx + cont)[:-1]]))[0].float(), dim=-1)
    return sum(float(logp[len(ctx) - 1 + j, t]) for j, t in enumerate(cont))


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_choice_scores_equal_the_forward_pass_summed_by_hand(trained_run):
    from spud.runs import load_model

    model, tok, _, _ = load_model(trained_run, None, "cpu", model="base")
    ctx = tok.encode("12 + 7 =", add_bos=True)
    conts = [tok.encode(" 19"), tok.encode(" 20"), tok.encode(" 1234567")]
    scores = choice_logprobs(model, ctx, conts, tok.pad_id)  # batched and right-padded
    assert scores == pytest.approx([logprob_by_hand(model, ctx, c) for c in conts], abs=1e-4)
    assert len(set(round(s, 3) for s in scores)) == 3


def test_run_eval_end_to_end(trained_run, tmp_path):
    from spud.runs import load_model

    gsm = tmp_path / "gsm.jsonl"
    gsm.write_text(json.dumps({"question": "What is 2 plus 3?", "answer": "2 + 3 = 5\n#### 5"}) + "\n")
    res = run_eval(str(trained_run), f"arithmetic,mc_arithmetic,code_simple,gsm8k:{gsm}", limit=3,
                   fewshot=2, checkpoint=None, device="cpu", seed=0, intrinsic_source_tokens=2000,
                   progress=False)
    out = trained_run / "eval" / "base-step_0000003"
    assert res["path"] == str(out / "results.json")
    saved = json.loads((out / "results.json").read_text())
    assert saved["model"] == "base" and saved["step"] == 3 and saved["chat"] is False
    assert saved["checkpoint"] == str(trained_run / "checkpoints" / "step_0000003")
    assert set(saved["tasks"]) == {"arithmetic", "mc_arithmetic", "code_simple", "gsm8k"}
    assert saved["tasks"]["arithmetic"]["n"] == 3 and saved["tasks"]["gsm8k"]["n"] == 1
    assert saved["tasks"]["mc_arithmetic"]["baseline"] == 0.25

    # multiple choice: every score is the model's own log-likelihood of that choice after the
    # prompt, the prediction its argmax, the accuracy the share of correct predictions
    model, tok, _, _ = load_model(trained_run, None, "cpu", model="base")
    rows = read_rows(out / "mc_arithmetic.jsonl")
    assert len(rows) == 3
    bos_text = tok.decode([tok.bos_id])
    for r in rows:
        assert r["prompt"].startswith(bos_text)  # the prompt as decoded ids: BOS, then plain text
        ctx = tok.encode(r["prompt"][len(bos_text):], add_bos=True)
        want = [logprob_by_hand(model, ctx, tok.encode(c)) for c in r["choices"]]
        assert r["scores"] == pytest.approx(want, abs=1e-4)
        pred = max(range(4), key=lambda i: want[i])
        assert r["pred"] == pred and r["correct"] == (pred == r["label"])
    mc = saved["tasks"]["mc_arithmetic"]
    acc = sum(r["correct"] for r in rows) / 3
    assert mc["metrics"]["acc"] == acc and mc["metrics"]["acc_norm"] == sum(r["correct_norm"] for r in rows) / 3
    assert mc["stderr"] == pytest.approx(math.sqrt(acc * (1 - acc) / 3))
    # generative and code tasks: the value is the mean of the per-example verdicts
    for name in ("arithmetic", "code_simple", "gsm8k"):
        per = read_rows(out / f"{name}.jsonl")
        assert saved["tasks"][name]["value"] == sum(float(r["correct"]) for r in per) / len(per)
    gen = read_rows(out / "arithmetic.jsonl")
    assert {"prompt", "target", "output", "extracted", "correct"} <= set(gen[0])
    assert gen[0]["prompt"].count("\n") == 2  # two few-shot lines, then the question
    centred = [(t["value"] - t["baseline"]) / (1 - t["baseline"]) for t in saved["tasks"].values()]
    assert saved["aggregate"]["centered_mean"] == pytest.approx(sum(centred) / 4)
    assert res["aggregate"] == saved["aggregate"]
    intr = saved["intrinsic"]
    assert math.isfinite(intr["val"]["bpb"]) and intr["val"]["bpb"] > 0
    assert set(intr["sources"]) == {"stdlib_docs", "arithmetic"}


def test_run_eval_bad_spec_fails_before_loading(trained_run):
    with pytest.raises(SpudError, match="unknown task"):
        run_eval(str(trained_run), "arithmetic,bogus", None, 0, None, "cpu", 0)


def test_base_and_chat_results_never_collide_and_the_report_names_both(chat_run):
    from spud.eval.report import write_report
    from spud.runs import load_model

    kw = {"limit": 3, "device": "cpu", "seed": 0, "intrinsic": False, "progress": False}
    base = run_eval(str(chat_run), "mc_arithmetic", **kw)
    chat = run_eval(str(chat_run), "mc_arithmetic", model="chat", chat=True, **kw)
    base_dir, chat_dir = chat_run / "eval" / "base-step_0000003", chat_run / "eval" / "chat-step_0000003"
    assert base["path"] == str(base_dir / "results.json") and chat["path"] == str(chat_dir / "results.json")
    saved = {m: json.loads((d / "results.json").read_text()) for m, d in (("base", base_dir), ("chat", chat_dir))}
    assert saved["base"]["model"] == "base" and saved["chat"]["model"] == "chat"
    assert saved["chat"]["checkpoint"] == str(chat_run / "chat" / "checkpoints" / "step_0000003")
    assert saved["chat"]["chat"] is True and saved["chat"]["step"] == 3
    # the chat rows were scored by the chat model (its weights, chat-template prompts)
    from spud.eval.builtin_tasks import make_task

    model, tok, _, _ = load_model(chat_run, None, "cpu", model="chat")
    row = read_rows(chat_dir / "mc_arithmetic.jsonl")[0]
    question = make_task("mc_arithmetic", 0).examples[0].prompt
    ctx = tok.render_chat([{"role": "user", "content": question}], add_generation_prompt=True)[0]
    assert row["prompt"] == tok.decode(ctx) and "<|user|>" in row["prompt"]
    want = [logprob_by_hand(model, ctx, tok.encode(c.lstrip())) for c in row["choices"]]
    assert row["scores"] == pytest.approx(want, abs=1e-4)
    assert read_rows(base_dir / "mc_arithmetic.jsonl")[0]["scores"] != row["scores"]

    md = write_report(chat_run).read_text()
    for model_name, r in saved.items():
        value = f"{r['tasks']['mc_arithmetic']['value']:.4g}"
        assert f"| {model_name} | `step_0000003` | mc_arithmetic | acc | {value}" in md


@pytest.mark.parametrize("argv, words", [
    (["--chat"], ["--chat", "base model", "--model chat", "--force"]),
    (["--model", "chat"], ["chat model", "plain, non-chat prompts", "--chat", "--force"]),
])
def test_mismatched_prompt_format_is_refused(chat_run, capsys, argv, words):
    before = sorted(p.name for p in (chat_run / "eval").glob("*")) if (chat_run / "eval").exists() else []
    rc = main(["eval", str(chat_run), "--tasks", "mc_arithmetic", "--limit", "1", "--device", "cpu", *argv])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ")
    for w in words:
        assert w in err
    after = sorted(p.name for p in (chat_run / "eval").glob("*")) if (chat_run / "eval").exists() else []
    assert after == before  # refused before anything was written


def test_forced_mismatch_runs_and_is_recorded(chat_run):
    res = run_eval(str(chat_run), "mc_arithmetic", limit=1, device="cpu", chat=True, force=True,
                   intrinsic=False, progress=False)
    assert res["model"] == "base" and res["chat"] is True and res["forced"] is True


def test_model_chat_without_sft_is_a_clear_error(trained_run, tmp_path):
    import shutil

    bare = tmp_path / "bare"
    shutil.copytree(trained_run, bare, ignore=shutil.ignore_patterns("chat", "eval"))
    with pytest.raises(SpudError, match=r"has no chat model.*spud sft"):
        run_eval(str(bare), "mc_arithmetic", model="chat", chat=True, device="cpu")


@pytest.mark.parametrize("argv, message", [
    (["--samples", "3"], "--samples 3 needs --temperature > 0"),
    (["--temperature", "-0.5"], "--temperature must be >= 0"),
    (["--samples", "0"], "--samples must be >= 1"),
    (["--samples", "3", "--temperature", "0.8", "--k", "1,5"], "--k 1,5: every k must be between 1 and --samples (3)"),
    (["--k", "2"], "--k 2: every k must be between 1 and --samples (1)"),
])
def test_sampling_flags_are_validated(trained_run, capsys, argv, message):
    rc = main(["eval", str(trained_run), "--tasks", "arithmetic", "--limit", "1", "--device", "cpu", *argv])
    assert rc == 2 and message in capsys.readouterr().err


def test_k_flag_must_be_integers(trained_run, capsys):
    with pytest.raises(SystemExit):
        main(["eval", str(trained_run), "--k", "1,ten"])
    assert "expected comma-separated integers" in capsys.readouterr().err


def test_cli_sampling_flags_reach_the_runner_and_pass_at_k_is_exact(trained_run, tmp_path, monkeypatch, capsys):
    """Scripted completions (the model is untrained): f passes 2 of 3 samples, g 1 of 3. By hand,
    pass@k = 1 - C(n-c, k)/C(n, k): f → 2/3, 1, 1; g → 1/3, 2/3, 1; the task means 1/2, 5/6, 1."""
    from spud.eval import runner, scoring

    data = tmp_path / "he.jsonl"
    data.write_text("".join(json.dumps({"task_id": f"t/{f}", "prompt": f"def {f}():\n", "entry_point": f,
                                        "test": "def check(fn):\n    assert fn() == 1\n"}) + "\n"
                            for f in ("f", "g")))
    script = {"f": ["    return 1\n", "    return 2\n", "    return 1\n"],
              "g": ["    return 3\n", "    return 1\n", "    return 0\n"]}
    calls = []

    def scripted(model, tok, prompts, params):  # the one batched call the runner makes per chunk
        out = []
        for ctx, p in zip(prompts, params):
            name = "f" if "def f" in tok.decode(ctx) else "g"
            calls.append((name, p.temperature, p.seed, p.top_p))
            out.append(script[name][sum(c[0] == name for c in calls) - 1])
        return out

    monkeypatch.setattr(scoring, "generate_texts", scripted)
    monkeypatch.setattr(runner, "intrinsic_metrics", lambda *a, **k: {})
    rc = main(["eval", str(trained_run), "--tasks", f"humaneval:{data}", "--device", "cpu",
               "--samples", "3", "--temperature", "0.7", "--k", "1,2,3", "--seed", "5"])
    assert rc == 0, capsys.readouterr().err
    assert sorted(calls) == sorted((n, 0.7, s, 0.95) for n in "fg" for s in (5, 6, 7))
    saved = json.loads((trained_run / "eval" / "base-step_0000003" / "results.json").read_text())
    assert saved["samples"] == 3 and saved["temperature"] == 0.7 and saved["ks"] == [1, 2, 3]
    assert saved["tasks"]["humaneval"]["metrics"] == pytest.approx({"pass@1": 0.5, "pass@2": 5 / 6, "pass@3": 1.0})
    rows = read_rows(trained_run / "eval" / "base-step_0000003" / "humaneval.jsonl")
    assert [r["status"] for r in rows] == [["passed", "failed", "passed"], ["failed", "passed", "failed"]]
    assert rows[1]["pass@k"] == pytest.approx({"1": 1 / 3, "2": 2 / 3, "3": 1.0})


def test_real_sampling_with_the_chat_model(chat_run):
    """No script: real sampled completions from the chat model; each task's pass@k is the mean
    over examples of the unbiased estimator applied to that example's recorded verdicts."""
    res = run_eval(str(chat_run), "arithmetic,code_simple", limit=2, fewshot=1, checkpoint=None,
                   device="cpu", seed=1, model="chat", chat=True, samples=3, temperature=0.8, ks=(1, 2),
                   intrinsic=False, progress=False)
    out = chat_run / "eval" / "chat-step_0000003"
    assert res["path"] == str(out / "results.json") and "intrinsic" not in res
    for name in ("arithmetic", "code_simple"):
        rows = read_rows(out / f"{name}.jsonl")
        passed = [round(r["correct"] * 3) if name == "arithmetic" else r["status"].count("passed") for r in rows]
        want = {f"pass@{k}": sum(1 - math.comb(3 - c, k) / math.comb(3, k) for c in passed) / len(rows)
                for k in (1, 2)}
        assert res["tasks"][name]["metrics"] == pytest.approx(want)
    first = read_rows(out / "arithmetic.jsonl")[0]
    assert "<|user|>" in first["prompt"] and len(first["output"]) == 3


def test_generative_eval_runs_through_the_engine_in_batches(trained_run, monkeypatch):
    """One engine per chunk of examples (not a loop of single decodes); sampled completions do not
    depend on what they were batched with; greedy ones equal single-sequence decoding."""
    from spud.eval import runner
    from spud.runs import load_model
    from spud.serve import engine as engine_mod
    from spud.serve.sampling import generate

    engines = []
    real_init = engine_mod.Engine.__init__

    def counting_init(self, *a, **k):
        engines.append(k.get("max_batch"))
        real_init(self, *a, **k)

    monkeypatch.setattr(engine_mod.Engine, "__init__", counting_init)
    out = trained_run / "eval" / "base-step_0000003" / "arithmetic.jsonl"

    def outputs(**kw):
        run_eval(str(trained_run), "arithmetic", limit=4, checkpoint=None, device="cpu", seed=3,
                 intrinsic=False, decontam_tokens=0, progress=False, **kw)
        return [r["output"] for r in read_rows(out)]

    sampled = outputs(samples=3, temperature=0.9)
    assert engines == [12]  # 4 examples × 3 samples in one batch
    monkeypatch.setattr(runner, "GEN_CHUNK", 1)
    assert outputs(samples=3, temperature=0.9) == sampled  # one example per batch: same text
    greedy = outputs()
    model, tok, _, _ = load_model(trained_run, device="cpu")
    (task,) = runner.load_tasks("arithmetic", 3)
    for i, (ex, text) in enumerate(zip(task.examples[:4], greedy)):
        ids = runner.render_prompt(task, ex, runner.pick_shots(task, 0, 3, i), tok, False)
        ref = tok.decode(list(generate(model, ids, task.max_new_tokens, temperature=0.0,
                                       stop_ids=[tok.end_id, tok.eos_id, tok.bos_id])))
        assert text == ref.split("\n")[0]
