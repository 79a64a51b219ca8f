"""spud rl on a tiny random base run: learning, exact resume, verifiers, tasks, bad input."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from spud.config import RLConfig
from spud.data import templates
from spud.data.facts import any_held_out
from spud.errors import SpudError
from spud.posttrain import rl_tasks
from spud.posttrain.rl import advantages, rl_cmd
from spud.posttrain.verifiers import Verdict, equation_slips, final_number, verify
from spud.train.metrics import read_metrics
from spud.train.schedule import rl_lr

FAST = ["rl.max_tokens=3", "rl.prompts_per_step=4", "rl.group=8", "rl.eval_every=100",
        "rl.heldout_problems=4", "train.threads=1"]


def seven_task(path, n=40):
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"prompt": f"Question {i}: say the number seven.", "verifier": "numeric",
                                "reference": "7"}) + "\n")
        f.write(json.dumps({"prompt": "Held: say seven.", "verifier": "numeric", "reference": "7",
                            "split": "heldout"}) + "\n")
    return str(path)


def half_task(path, n=40):
    """'Free' problems, always right (no signal), and questions judged by `odd_length_verdict`
    (mixed groups): dynamic sampling then finds groups with signal beyond a step's quota."""
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"prompt": f"Free {i}.", "reference": "free"}) + "\n")
            f.write(json.dumps({"prompt": f"Question {i}: say anything.", "reference": "odd"}) + "\n")
    return str(path)


def odd_length_verdict(kind, text, ref, *args):
    """A stub for spud.posttrain.rl.verify: a 'free' problem is always right, others when the answer's
    length is odd."""
    return Verdict(ref == "free" or len(text) % 2 == 1, False)


def quiet():
    from rich.console import Console
    return Console(quiet=True)


def test_rl_raises_reward_on_a_learnable_task(base_run, tmp_path):
    task = seven_task(tmp_path / "seven.jsonl")
    out = rl_cmd(str(base_run), source="base", tasks=[task], overrides=FAST + ["rl.steps=20", "rl.lr=0.01"],
                 console=quiet())
    assert out["steps"] == 20 and not out["interrupted"]
    rows = [r for r in read_metrics(base_run / "rl" / "metrics.jsonl") if r["kind"] == "rl"]
    acc = [r["accuracy"] for r in rows]
    first, last = sum(acc[:5]) / 5, sum(acc[-5:]) / 5
    assert last >= first + 0.1, acc  # random init: ~3 % of 3-token samples end in a 7
    assert rows[-1]["entropy"] < rows[0]["entropy"]
    for key in ("reward", "response_length", "kl", "clip_fraction", "rollout_s", "update_s"):
        assert key in rows[-1]
    # the RL model is a run of its own, chosen with --model rl
    from spud.runs import choose_model
    choice = choose_model(base_run, "rl")
    assert choice.run == base_run / "rl" and choice.step == 20


def test_rl_resume_is_exact(base_run, tmp_path):
    task = seven_task(tmp_path / "seven.jsonl")
    straight = tmp_path / "straight"
    # a seed and train.threads of its own: a resume keeps them (it draws and computes the same)
    rl_cmd(str(base_run), source="base", tasks=[task], out=str(straight),
           overrides=FAST + ["rl.steps=4", "rl.lr=0.01", "seed=7"], console=quiet())
    cut = tmp_path / "cut"
    rl_cmd(str(base_run), source="base", tasks=[task], out=str(cut),
           overrides=FAST + ["rl.steps=2", "rl.lr=0.01", "seed=7"], console=quiet())
    rl_cmd(str(base_run), source="base", tasks=None, out=str(cut), overrides=["rl.steps=4"], resume=True,
           console=quiet())
    import yaml
    resumed = yaml.safe_load((cut / "config.yaml").read_text())
    assert resumed["seed"] == 7 and resumed["train"]["threads"] == 1 and resumed["rl"]["steps"] == 4
    a = load_file(straight / "checkpoints" / "step_0000004" / "model.safetensors")
    b = load_file(cut / "checkpoints" / "step_0000004" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ra = [r["reward"] for r in read_metrics(straight / "metrics.jsonl") if r["kind"] == "rl"]
    rb = [r["reward"] for r in read_metrics(cut / "metrics.jsonl") if r["kind"] == "rl"]
    assert ra == rb and len(ra) == 4


def test_ema_decay_hands_on_the_weight_average_and_resumes_exactly(base_run, tmp_path):
    """rl.ema_decay: the policy trains exactly as without it (its own weights are train.safetensors),
    model.safetensors, which serve/eval/export read, is the EMA of the policy's weights over the
    steps, and a resumed run ends bit for bit where a straight one does."""
    from spud.runs import choose_model

    task = seven_task(tmp_path / "seven.jsonl")
    fast = FAST + ["rl.lr=0.01", "rl.checkpoint_every=1", "rl.keep_checkpoints=10"]
    plain, avg, cut = tmp_path / "plain", tmp_path / "avg", tmp_path / "cut"
    rl_cmd(str(base_run), source="base", tasks=[task], out=str(plain), overrides=fast + ["rl.steps=4"],
           console=quiet())
    rl_cmd(str(base_run), source="base", tasks=[task], out=str(avg),
           overrides=fast + ["rl.steps=4", "rl.ema_decay=0.5"], console=quiet())
    rl_cmd(str(base_run), source="base", tasks=[task], out=str(cut),
           overrides=fast + ["rl.steps=2", "rl.ema_decay=0.5"], console=quiet())
    rl_cmd(str(base_run), source="base", tasks=None, out=str(cut), overrides=["rl.steps=4"], resume=True,
           console=quiet())

    def weights(run, step, name="model.safetensors"):
        return load_file(run / "checkpoints" / f"step_{step:07d}" / name)

    start = load_file(choose_model(base_run, "base").checkpoint / "model.safetensors")
    policy = [start] + [weights(plain, k) for k in range(1, 5)]
    assert all(torch.equal(policy[4][k], v) for k, v in weights(avg, 4, "train.safetensors").items())
    expected = {k: v.clone() for k, v in start.items()}
    for w in policy[1:]:
        for k in expected:
            expected[k] = 0.5 * expected[k] + 0.5 * w[k]
    served = weights(avg, 4)
    assert served.keys() == expected.keys()
    assert all(torch.allclose(served[k], expected[k], atol=1e-6) for k in served)
    assert not all(torch.equal(served[k], policy[4][k]) for k in served)  # not the last step's weights
    for name in ("model.safetensors", "train.safetensors"):
        a, b = weights(avg, 4, name), weights(cut, 4, name)
        assert all(torch.equal(a[k], b[k]) for k in a), name
    assert choose_model(avg, "rl").checkpoint == avg / "checkpoints" / "step_0000004"
    # turned on at resume: the average starts at the policy it resumes (plain's step 4)
    rl_cmd(str(base_run), source="base", tasks=None, out=str(plain), overrides=["rl.steps=5", "rl.ema_decay=0.5"],
           resume=True, console=quiet())
    served, own = weights(plain, 5), weights(plain, 5, "train.safetensors")
    assert all(torch.allclose(served[k], 0.5 * policy[4][k] + 0.5 * own[k], atol=1e-6) for k in served)
    with pytest.raises(Exception, match="ema_decay"):
        RLConfig(ema_decay=1.0)


def test_rl_lr_schedules(base_run, tmp_path):
    task = seven_task(tmp_path / "seven.jsonl")
    out = tmp_path / "wsd"
    rl_cmd(str(base_run), source="base", tasks=[task], out=str(out), console=quiet(),
           overrides=FAST + ["rl.steps=6", "rl.lr=0.01", "rl.warmup_steps=2", "rl.schedule=wsd",
                             "rl.decay_fraction=0.5", "rl.min_lr_ratio=0.1"])
    lrs = [r["lr"] for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "rl"]
    # warm-up over 2 steps, hold to step 3, then linear from 0.01 towards 0.001 over the last 3
    assert lrs == pytest.approx([0.005, 0.01, 0.01, 0.01, 0.007, 0.004]), lrs
    r = RLConfig(lr=1e-4, steps=10, schedule="cosine", warmup_steps=0)
    assert rl_lr(r, 0) == 1e-4 and rl_lr(r, 5) == pytest.approx(0.5e-4) and rl_lr(r, 9) < 0.03e-4
    # the constant default is bit for bit the schedule earlier runs were measured with
    r = RLConfig(lr=1e-4, steps=50, warmup_steps=3)
    assert all(rl_lr(r, s) == 1e-4 * min(1.0, (s + 1) / 3) for s in range(50))


def test_entropy_weight_bonus_and_minimisation(base_run, tmp_path):
    """From the same start, seed and problems, rl.entropy_weight > 0 (a bonus) ends wider than the
    plain policy gradient (0, the default), and < 0 (minimisation) clearly narrower. 12 steps: a
    random model starts near the uniform distribution, where the entropy's gradient is ~0."""
    task = seven_task(tmp_path / "seven.jsonl")
    entropy = {}
    for w in (0.5, 0.0, -0.5):
        out = tmp_path / f"ent{w}"
        rl_cmd(str(base_run), source="base", tasks=[task], out=str(out), console=quiet(),
               overrides=FAST + ["rl.steps=12", "rl.lr=0.01", f"rl.entropy_weight={w}"])
        rows = [r for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "rl" and not r["skipped"]]
        entropy[w] = rows[-1]["entropy"]
    assert entropy[0.5] > entropy[0.0], entropy
    assert entropy[-0.5] < entropy[0.0] - 0.2, entropy
    with pytest.raises(Exception, match="entropy_weight"):
        RLConfig(entropy_weight=2)


def test_token_logprobs_run_the_head_on_completion_positions_only():
    """The update's log-probs and entropies equal those of the full (B, T, V) logits at the
    completion positions, 0 elsewhere, and the gradient is the same, while the LM head sees only
    the completion positions."""
    from spud.config import ModelConfig
    from spud.model.registry import build_model
    from spud.posttrain.rl_logprobs import token_logprobs

    torch.manual_seed(0)
    model = build_model(ModelConfig(d_model=32, n_layers=2, n_heads=2, vocab_size=97, max_seq_len=32))
    x = torch.randint(0, 97, (3, 12))
    y = torch.full((3, 12), -1)
    y[0, 4:9], y[1, 1:12], y[2, 10:12] = 5, 7, 11
    logp = torch.log_softmax(model(x).float(), dim=-1)
    mask = y >= 0
    want = logp.gather(-1, y.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask
    want_ent = -(logp.exp() * logp).sum(-1) * mask
    want.sum().backward()
    want_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    rows_seen = []
    hook = model.lm_head.register_forward_hook(lambda m, i, o: rows_seen.append(i[0].shape[0]))
    got, got_ent = token_logprobs(model, x, y)
    hook.remove()
    assert rows_seen == [int(mask.sum())]
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got_ent, want_ent.detach())
    got.sum().backward()
    for p, g in zip(model.parameters(), want_grads):
        torch.testing.assert_close(p.grad, g)


@pytest.mark.parametrize("arch", [
    {},  # the demo's block: llama, QK-norm
    # another block, grouped keys, a sliding window shorter than the rows, value embeddings, x0 mix
    {"block": "parallel", "n_kv_heads": 1, "attn_pattern": "LG", "attn_window": 4, "value_embeds": 1,
     "x0_mix": True, "unet_skips": True, "qk_norm": False},
])
def test_token_logprobs_run_each_prompt_through_the_trunk_once(arch):
    """With share_prompts the rows of an RL batch that share a prompt (a group's completions)
    share one trunk pass over it: log-probs, entropies and gradients equal the plain form's,
    and the trunk sees each prompt once and each completion only as long as its group's
    longest one."""
    from spud.config import ModelConfig
    from spud.model.registry import build_model
    from spud.posttrain.rl_logprobs import completion_batch
    from spud.posttrain.rl_logprobs import token_logprobs

    torch.manual_seed(0)
    model = build_model(ModelConfig(d_model=32, n_layers=4, n_heads=4, vocab_size=97, max_seq_len=64, **arch))
    g = torch.Generator().manual_seed(1)

    def ids(n):
        return torch.randint(4, 97, (n,), generator=g).tolist()

    p1, p2, p3 = ids(9), ids(6), ids(1)
    rows = [(p1, ids(3)), (p1, ids(7)), (p1, ids(5)), (p2, ids(2)), (p3, ids(4)), (p2, ids(8)), (ids(9), ids(3))]
    x, y = completion_batch(rows, pad=0)
    positions = []
    hook = model.blocks[0].register_forward_hook(lambda m, i, o: positions.append(i[0].shape[0] * i[0].shape[1]))
    results = {}
    for share in (False, True):
        model.zero_grad()
        positions.clear()
        logp, ent = token_logprobs(model, x, y, entropy_grad=True, share_prompts=share)
        (logp.sum() + 0.1 * ent.sum()).backward()
        results[share] = (logp.detach(), ent.detach(), [q.grad.clone() for q in model.parameters()], sum(positions))
    hook.remove()
    (lp0, e0, g0, n0), (lp1, e1, g1, n1) = results[False], results[True]
    torch.testing.assert_close(lp1, lp0, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(e1, e0, atol=1e-5, rtol=1e-5)
    assert (lp1 == 0).equal(y < 0)
    for a, b in zip(g1, g0):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert n0 == x.numel() == 7 * 15
    # prompts (their last token is the first completion position) + each group's longest completion
    assert n1 == (8 + 3 * 7) + (5 + 2 * 8) + (0 + 1 * 4) + (8 + 1 * 3)


def test_advantages_dr_grpo_and_grpo():
    r = [1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0]
    assert advantages(r, 4, "drgrpo") == [0.75, -0.25, -0.25, -0.25, 0.0, 0.0, 0.0, 0.0]
    g = advantages(r, 4, "grpo")
    std = (0.75 ** 2 * 0.25 + 0.25 ** 2 * 0.75) ** 0.5
    assert g[0] == pytest.approx(0.75 / std, rel=1e-5) and g[4:] == [0.0] * 4
    # rl.negative_weight scales only the answers below their group's mean
    assert advantages(r, 4, "drgrpo", 0.5) == [0.75, -0.125, -0.125, -0.125, 0.0, 0.0, 0.0, 0.0]


@pytest.mark.parametrize("kind, text, ref, correct, formatted", [
    ("numeric", "3 * 4 = 12. 12 + 5 = 17. The answer is 17.", "17", True, True),
    ("numeric", "Ones: 7 + 8 = 15. So 47 + 38 = 85.", "85", True, True),
    ("numeric", "It is 1,250 apples", "1250", True, False),
    ("numeric", "I think 16", "17", False, False),
    ("output", "It prints 42.", "42", True, True),
    ("output", "hello", "42", False, True),
    ("math", "so the result is \\boxed{\\frac{1}{2}}", "0.5", True, False),
])
def test_verifiers(kind, text, ref, correct, formatted):
    v = verify(kind, text, ref)
    assert (v.correct, v.formatted, v.error) == (correct, formatted, None)


def test_equation_slips_and_rl_gain_sorts_failures(base_run, tmp_path):
    assert equation_slips("36 + 34 = 70. 70 - 43 = 27. The answer is 27.") == (2, 0)
    assert equation_slips("36 + 34 = 70. 70 - 43 = 37. The answer is 37.") == (2, 1)
    assert equation_slips("9 * 12 = 108. 1,000 - 108 = 892.") == (2, 0)
    assert equation_slips("The answer is 12.") == (0, 0)
    out = tmp_path / "gain.json"
    done = subprocess.run([sys.executable, "benchmarks/rl_gain.py", str(base_run), "--models", "base",
                           "--problems", "6", "--samples", "0", "--why", "--by-wording", "--threads", "1",
                           "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    row = json.loads(out.read_text())["rows"][0]
    why = [row["wrong_plan"], row["wrong_arithmetic"], row["wrong_no_step"]]
    assert row["greedy_pass@1"] + sum(why) == pytest.approx(1.0) and "wrong_plan" in done.stdout
    # per wording: the eval-only story wordings of the held-out split, every problem counted once
    words = row["by_wording"]
    held = {t[0] for t in templates.story_templates(True)}
    assert set(words) <= held and sum(w["n"] for w in words.values()) == 6, words
    assert "by wording" in done.stdout


def test_code_verifier_limits_and_crashes_are_zero_reward():
    ok = verify("code", "def f(x):\n    return x + 1", "", "assert f(1) == 2")
    assert ok.correct
    loop = verify("code", "def f(x):\n    while True: pass", "", "f(1)", timeout=1.0)
    assert not loop.correct and loop.error == "timeout"
    net = verify("code", "import socket\nsocket.create_connection(('127.0.0.1', 9))", "", "")
    assert not net.correct
    assert verify("nonsense", "x", "1").error == "unknown verifier 'nonsense'"
    assert final_number("no digits here") is None


def test_builtin_tasks_hold_out_wordings_and_operands():
    for name in rl_tasks.BUILTIN:
        train = rl_tasks.builtin_problems(name, "train", 300, 0)
        held = rl_tasks.builtin_problems(name, "heldout", 40, 0)
        assert len(train) == 300 and len(held) == 40
        wording = lambda p: p.key.split("|")[0].split("+")[0]  # noqa: E731
        assert not {wording(p) for p in train} & {wording(p) for p in held}
        assert not {p.messages[0]["content"] for p in train} & {p.messages[0]["content"] for p in held}
    arith = rl_tasks.builtin_problems("arithmetic", "train", 300, 0)
    assert not any(any_held_out(p.facts) for p in arith)
    assert all(any_held_out(p.facts) for p in rl_tasks.builtin_problems("arithmetic", "heldout", 40, 0))
    # every program's reference is what Python really prints
    for p in rl_tasks.builtin_problems("program", "train", 30, 1):
        assert p.program in p.messages[0]["content"]
        run = subprocess.run([sys.executable, "-c", p.program], capture_output=True, text=True)
        assert run.stdout.strip() == p.reference, p.program


def test_bad_input(base_run, tmp_path):
    with pytest.raises(SpudError, match="no chat model to start RL from"):
        rl_cmd(str(base_run), source="chat", tasks=["arithmetic"], overrides=FAST, console=quiet())
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n" + json.dumps({"prompt": "x"}) + "\n")
    with pytest.raises(SpudError, match=r"empty.jsonl: no usable problem.*missing 'reference'"):
        rl_cmd(str(base_run), source="base", tasks=[str(empty)], overrides=FAST, console=quiet())
    with pytest.raises(SpudError, match="unknown RL task 'gsm9k'"):
        rl_cmd(str(base_run), source="base", tasks=["gsm9k"], overrides=FAST, console=quiet())
    long = tmp_path / "long.jsonl"
    long.write_text(json.dumps({"prompt": "word " * 400, "reference": "1"}) + "\n")
    with pytest.raises(SpudError, match="no RL training problem fits the model's context"):
        rl_cmd(str(base_run), source="base", tasks=[str(long)], overrides=FAST, console=quiet())
