"""spud rl: DAPO dynamic sampling, difficulty levels and curriculum, the dev split."""

import json
import shutil
from collections import Counter

import pytest
import torch
from safetensors.torch import load_file

from test_rl import half_task, odd_length_verdict

from spud.errors import SpudError
from spud.posttrain import rl_tasks
from spud.posttrain.rl import rl_cmd
from spud.posttrain import rl as rl_module
from spud.posttrain.rl_sampling import SolvedPool, collect, level_cap, level_range, problem_stream
from spud.posttrain.rl_tasks import Problem
from spud.posttrain.verifiers import Verdict, steps_right, verify
from spud.train.metrics import read_metrics

FAST = ["rl.max_tokens=3", "rl.prompts_per_step=4", "rl.group=8", "rl.eval_every=100",
        "rl.heldout_problems=4", "train.threads=1"]


def quiet():
    from rich.console import Console
    return Console(quiet=True)


def problem(i: int, kind: str, level: int | None = None) -> Problem:
    return Problem([{"role": "user", "content": f"q{i}"}], "numeric", kind, key=str(i), level=level)


def fake_rollout(group: int):
    """Rewards fixed by the problem: 'right' all 1, 'wrong' all 0, 'mixed' half and half."""
    calls = []

    def rollout(problems, round_):
        calls.append((round_, [p.key for p in problems]))
        ok = []
        for p in problems:
            ok += {"right": [True] * group, "wrong": [False] * group,
                   "mixed": [j % 2 == 0 for j in range(group)]}[p.reference]
        rows = [([1], [2, 3]) for _ in ok]
        return rows, [float(x) for x in ok], ok, 0
    return rollout, calls


def test_dynamic_sampling_drops_equal_groups_and_refills():
    kinds = ["wrong", "wrong", "right", "mixed"] * 20  # one group in four has signal
    problems = [problem(i, k) for i, k in enumerate(kinds)]
    rollout, calls = fake_rollout(4)
    got = collect(iter(problems), rollout, groups=6, group_size=4, dynamic=True, max_rounds=5)
    s = got.stats
    assert s["groups_kept"] == 6 and len(got.rows) == len(got.rewards) == 24
    for g in range(6):  # every kept group has signal
        r = got.rewards[g * 4:(g + 1) * 4]
        assert max(r) > min(r)
    assert s["sample_rounds"] == len(calls) >= 2
    assert calls[0][1] == ["0", "1", "2", "3", "4", "5"]  # round 0 asks for exactly the batch
    assert len(calls[1][1]) > 5  # later rounds ask for more: few groups survived
    assert s["groups_sampled"] == sum(len(k) for _, k in calls)
    assert s["groups_dropped"] == s["groups_equal_all_wrong"] + s["groups_equal_all_right"]
    seen = Counter(kinds[int(k)] for _, keys in calls for k in keys)
    assert (s["groups_equal_all_wrong"], s["groups_equal_all_right"]) == (seen["wrong"], seen["right"])
    assert s["rollouts"] == 4 * s["groups_sampled"]
    # a round cap leaves the step short rather than sampling forever
    rollout, calls = fake_rollout(4)
    short = collect(iter(problems), rollout, groups=6, group_size=4, dynamic=True, max_rounds=1)
    assert short.stats["groups_kept"] == 1 and short.stats["sample_rounds"] == 1
    # off: one round, every group kept (equal ones carry zero advantage), still counted
    rollout, calls = fake_rollout(4)
    off = collect(iter(problems), rollout, groups=6, group_size=4, dynamic=False, max_rounds=5)
    assert off.stats["groups_kept"] == 6 and off.stats["sample_rounds"] == 1
    assert off.stats["groups_dropped"] == 0 and off.stats["groups_equal_all_wrong"] == 4


def test_curriculum_cap_and_level_mix():
    assert [level_cap(1, 3, 30, s) for s in (0, 9, 10, 19, 20, 29, 30, 99)] == [1, 1, 2, 2, 3, 3, 3, 3]
    assert level_cap(1, 3, 0, 0) == 3 and level_cap(2, 2, 10, 0) == 2
    pool = [problem(i, "x", level=1 + i % 3) for i in range(300)] + [problem(300 + i, "x") for i in range(30)]
    drawn = list(problem_stream(pool, 1, 2, seed=0, step=5))
    assert {p.level for p in drawn} == {1, 2, None}  # level 3 is above the cap; ungraded always in
    assert len(drawn) == len({p.key for p in drawn}) == 100 + 100 + 30  # no repeats, all allowed
    first = Counter(p.level for p in drawn[:60])
    assert min(first.values()) >= 12  # equal shares per level, not per problem
    again = [p.key for p in problem_stream(pool, 1, 2, seed=0, step=5)]
    assert again == [p.key for p in drawn]  # a pure function of (seed, step): resume draws the same
    assert again != [p.key for p in problem_stream(pool, 1, 2, seed=0, step=6)]


def test_level_range_errors_name_the_fields():
    pool = [problem(i, "x", level=1 + i % 3) for i in range(9)]
    assert level_range(pool, 1, None) == (1, 3) and level_range(pool, 2, 2) == (2, 2)
    with pytest.raises(SpudError, match=r"rl.min_level=3 is above rl.max_level=2"):
        level_range(pool, 3, 2)
    with pytest.raises(SpudError, match=r"no RL training problem has a level in \[rl.min_level=4"):
        level_range(pool, 4, 5)


def test_arithmetic_levels_and_dev_split():
    train = rl_tasks.builtin_problems("arithmetic", "train", 600, 0)
    levels = Counter(p.level for p in train)
    assert set(levels) == {1, 2, 3} and min(levels.values()) > 150
    assert all(len(p.facts) == 1 for p in train if p.level == 1)
    assert all(len(p.facts) == 2 for p in train if p.level > 1)
    plain = [p for p in train if p.level == 2]
    assert all("+" not in p.key.split("|")[0] for p in plain)  # no distractor sentence at level 2
    assert sum("+" in p.key.split("|")[0] for p in train if p.level == 3) > 50
    for name in rl_tasks.BUILTIN:
        test = rl_tasks.builtin_problems(name, "heldout", 60, 0)
        dev = rl_tasks.builtin_problems(name, "dev", 60, 0)
        assert len(dev) == 60
        text = lambda ps: {p.messages[0]["content"] for p in ps}  # noqa: E731
        assert not text(dev) & text(test)
        wording = lambda ps: {p.key.split("|")[0].split("+")[0] for p in ps}  # noqa: E731
        assert not wording(dev) & wording(rl_tasks.builtin_problems(name, "train", 300, 0))
    assert all(rl_tasks.any_held_out(p.facts) for p in rl_tasks.builtin_problems("arithmetic", "dev", 60, 0))


def test_rl_run_logs_dynamic_sampling_and_curriculum(base_run, tmp_path):
    task = tmp_path / "levels.jsonl"
    with open(task, "w") as f:
        for i in range(30):
            f.write(json.dumps({"prompt": f"Easy {i}: say seven.", "reference": "7", "level": 1}) + "\n")
            f.write(json.dumps({"prompt": f"Hard {i}: say seven.", "reference": "7", "level": 2}) + "\n")
        f.write(json.dumps({"prompt": "Dev: say seven.", "reference": "7", "split": "dev"}) + "\n")
        f.write(json.dumps({"prompt": "Bad level.", "reference": "7", "level": 0}) + "\n")
    from rich.console import Console

    out = rl_cmd(str(base_run), source="base", tasks=[str(task)], console=Console(quiet=True),
                 overrides=FAST + ["rl.steps=4", "rl.curriculum_steps=2", "rl.max_sample_rounds=2",
                                   "rl.eval_split=dev", "rl.eval_every=4"])
    assert any("'level' must be an integer >= 1" in s for t in out["tasks"] for s in t.get("skipped", []))
    rows = read_metrics(tmp_path / "base" / "rl" / "metrics.jsonl")
    steps = [r for r in rows if r["kind"] == "rl"]
    assert [r["level_cap"] for r in steps] == [1, 2, 2, 2]
    for r in steps:
        assert r["groups_kept"] <= 4 and r["groups_sampled"] >= 4 and 1 <= r["sample_rounds"] <= 2
        assert r["rollouts"] == 8 * r["groups_sampled"]
        assert r["groups_dropped"] == r["groups_equal_all_wrong"] + r["groups_equal_all_right"]
    evals = [r for r in rows if r["kind"] == "rl_eval"]
    assert evals and all(r["split"] == "dev" and r["n"] == 1 for r in evals)


def test_solved_pool_leaves_solved_problems_out():
    pool = [problem(i, "right" if i < 4 else "mixed", level=1 + (i % 2)) for i in range(12)]
    got = collect(iter(pool), fake_rollout(4)[0], groups=3, group_size=4, dynamic=True, max_rounds=2)
    assert {p.key for p in got.solved} <= {"0", "1", "2", "3"} and got.solved
    solved = SolvedPool(pool, on=True)
    solved.add(got.solved)
    drawn = [p.key for p in problem_stream(pool, 1, 2, seed=0, step=1, skip=solved.skip())]
    assert sorted(drawn, key=int) == [str(i) for i in range(12) if str(i) not in {p.key for p in got.solved}]
    # a level with every problem solved is drawn whole again rather than lost
    solved.add([p for p in pool if p.level == 1])
    again = [p.key for p in problem_stream(pool, 1, 2, seed=0, step=1, skip=solved.skip())]
    assert {int(k) % 2 for k in again} == {0, 1}
    assert SolvedPool(pool, on=False).skip() == frozenset()
    with pytest.raises(SpudError, match="rl_solved"):
        solved.restore([3, 99])


def test_steps_right_is_all_or_nothing():
    assert steps_right("36 + 34 = 70. 70 - 43 = 27. The answer is 27.")
    assert not steps_right("36 + 34 = 70. 70 - 43 = 37. The answer is 37.")
    assert not steps_right("The answer is 27.")


def straight_and_resumed(base_run, task, args: list[str], steps: int, tmp_path):
    """A run of `steps` steps, and one stopped after 2 and resumed to `steps`: → their two
    directories and each one's per-step metrics without the timings (which must be equal)."""
    straight, cut = tmp_path / "straight", tmp_path / "cut"
    for out, n in ((straight, steps), (cut, 2)):
        rl_cmd(str(base_run), source="base", tasks=[str(task)], out=str(out), console=quiet(),
               overrides=args + [f"rl.steps={n}"])
    rl_cmd(str(base_run), source="base", tasks=None, out=str(cut), overrides=[f"rl.steps={steps}"], resume=True,
           console=quiet())
    timing = ("time", "rollout_s", "update_s")
    rows = {o: [{k: v for k, v in r.items() if k not in timing} for r in read_metrics(o / "metrics.jsonl")
                if r["kind"] == "rl"] for o in (straight, cut)}
    return straight, cut, rows


def test_drop_solved_and_step_reward_in_a_run_resume_exactly(base_run, tmp_path, monkeypatch):
    """'Free' problems are always judged right (a stub verifier), so their groups are solved: with
    rl.drop_solved each is rolled out once, and the solved set survives a resume exactly."""
    task = tmp_path / "free.jsonl"
    with open(task, "w") as f:
        for i in range(20):
            f.write(json.dumps({"prompt": f"Free {i}.", "reference": "free"}) + "\n")
            f.write(json.dumps({"prompt": f"Question {i}: say seven.", "reference": "7"}) + "\n")
    monkeypatch.setattr(rl_module, "verify", lambda kind, text, ref, *a: Verdict(True, False) if ref == "free"
                        else verify(kind, text, ref, *a))
    monkeypatch.setattr(rl_module, "steps_right", lambda text: True)  # every answer earns the step bonus
    args = FAST + ["rl.lr=0.01", "rl.drop_solved=true", "rl.step_weight=0.5", "rl.max_sample_rounds=3"]
    straight, cut, rows = straight_and_resumed(base_run, task, args, 4, tmp_path)
    assert rows[straight] == rows[cut] and len(rows[cut]) == 4
    solved = [r["solved_problems"] for r in rows[straight]]
    assert solved == sorted(solved) and solved[-1] > 0
    # each free problem was solved once and never drawn again: all-right groups = solved problems
    assert sum(r["groups_equal_all_right"] for r in rows[straight]) == solved[-1]
    state = json.loads((straight / "checkpoints" / "step_0000004" / "state.json").read_text())
    assert len(state["rl_solved"]) == solved[-1] and all(i % 2 == 0 for i in state["rl_solved"])  # free ones
    a = load_file(straight / "checkpoints" / "step_0000004" / "model.safetensors")
    b = load_file(cut / "checkpoints" / "step_0000004" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the step bonus is in the reward: 0.5 on top of correctness (and the format bonus) for every answer
    assert all(r["reward"] >= r["accuracy"] + 0.5 - 1e-9 for r in rows[straight])


def test_surplus_groups_are_carried_to_the_next_step_first():
    """rl.carry_surplus: groups with signal beyond the quota come back as `surplus` (at most one
    step's worth), lead the next step's batch with their stored log-probs, and the first round asks
    for the quota over the last survival rate."""
    from spud.posttrain.rl_carry import CarriedGroup

    mixed = [problem(i, "mixed" if i % 2 else "right") for i in range(200)]  # half the groups have signal
    rollout, calls = fake_rollout(4)
    got = collect(iter(mixed), rollout, groups=3, group_size=4, dynamic=True, max_rounds=3,
                  keep_surplus=True, first_survival=0.25)
    assert len(calls[0][1]) == 12  # 3 / 0.25
    assert got.stats["groups_kept"] == 3 and len(got.surplus) == 3  # 6 with signal found, 3 over the quota
    assert got.stats["survival"] == 0.5 and got.stats["groups_carried"] == 0
    assert got.old_logprobs == [None] * 12 and all(g.level is None and len(g.rows) == 4 for g in got.surplus)
    for g in got.surplus:
        g.old_logprobs = [[-1.0, -2.0]] * 4
    rollout, calls = fake_rollout(4)
    nxt = collect(iter(mixed[12:]), rollout, groups=3, group_size=4, dynamic=True, max_rounds=3,
                  carried=got.surplus[:2], keep_surplus=True, first_survival=0.5)
    assert nxt.stats["groups_carried"] == 2 and nxt.stats["groups_kept"] == 3
    assert len(calls[0][1]) == 2  # the one group still missing, over the survival rate 0.5
    assert nxt.old_logprobs == [[-1.0, -2.0]] * 8 + [None] * 4  # the carried rows first
    full = collect(iter(mixed[20:]), rollout, groups=2, group_size=4, dynamic=True, max_rounds=3,
                   carried=got.surplus[:2], keep_surplus=True, first_survival=0.5)
    assert full.stats["rollouts"] == 0 and full.stats["survival"] is None and not full.surplus
    # off: nothing kept beyond the quota, and the first round asks for exactly the quota
    rollout, calls = fake_rollout(4)
    off = collect(iter(mixed), rollout, groups=3, group_size=4, dynamic=True, max_rounds=3, first_survival=0.25)
    assert not off.surplus and len(calls[0][1]) == 3
    assert CarriedGroup([([1], [2])], [1.0], 2).to_json()["rows"] == [[[1], [2]]]


def test_restore_carry_names_the_malformed_field():
    from spud.posttrain.rl_carry import CarriedGroup, restore_carry

    g = CarriedGroup([([1, 2], [3, 4])], [1.0], 2, [[-0.5, -0.25]])
    back = restore_carry(json.loads(json.dumps([g.to_json()])))
    assert back == [g] and restore_carry(None) == []
    for bad in ([{"rows": [[[1], [3, 4]]], "rewards": [1.0], "level": 2, "old_logprobs": [[-0.5]]}],
                [{"rows": [[[1], [3]]], "rewards": [1.0], "level": 2}], "nonsense"):
        with pytest.raises(SpudError, match="rl_carry"):
            restore_carry(bad)


def test_carry_surplus_in_a_run_uses_the_sampling_policys_logprobs_and_resumes_exactly(base_run, tmp_path,
                                                                                       monkeypatch):
    """Half the problems are always right (no signal), half are judged by the answer's length (a
    stub verifier: mixed groups). With rl.carry_surplus the extra groups reach the next step, their
    stored log-probs are the sampling policy's (the previous checkpoint's weights), and a resumed
    run ends bit for bit where a straight one does."""
    from spud.posttrain.rl_logprobs import completion_batch, token_logprobs
    from spud.runs import choose_model
    from spud.model.registry import build_model
    from spud.config import validate_config
    from spud.train import checkpoint as ckpt_io

    task = half_task(tmp_path / "half.jsonl")
    monkeypatch.setattr(rl_module, "verify", odd_length_verdict)
    args = FAST + ["rl.lr=0.01", "rl.carry_surplus=true", "rl.checkpoint_every=1", "rl.keep_checkpoints=10"]
    straight, cut, rows = straight_and_resumed(base_run, task, args, 5, tmp_path)
    assert rows[straight] == rows[cut] and len(rows[cut]) == 5
    carried = [r["groups_carried"] for r in rows[straight]]
    assert carried[0] == 0 and sum(carried) > 0, carried
    # with one pass over fresh rollouts the ratio is exactly 1: only carried rows move it
    drift = [r["policy_drift"] for r in rows[straight]]
    assert all((d > 0) == (n > 0) for d, n in zip(drift, carried)), (drift, carried)
    assert all(r["groups_kept"] == 4 for r in rows[straight])
    a = load_file(straight / "checkpoints" / "step_0000005" / "model.safetensors")
    b = load_file(cut / "checkpoints" / "step_0000005" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    # a carried group's stored log-probs are those of the weights that sampled it: the checkpoint
    # before the step that found it
    step = next(s for s in range(1, 5) if carried[s] > 0)  # step s + 1 trained on step s's surplus
    ckpt = straight / "checkpoints" / f"step_{step:07d}"
    state = json.loads((ckpt / "state.json").read_text())
    assert len(state["rl_carry"]) == carried[step]
    before = straight / "checkpoints" / f"step_{step - 1:07d}" if step > 1 else choose_model(base_run, "base").checkpoint
    model = build_model(validate_config(state["config"], "test").model)
    ckpt_io.load_weights(before, model, "cpu")
    for g in state["rl_carry"]:
        x, y = completion_batch([(p, c) for p, c in g["rows"]], 0)
        with torch.no_grad():
            lp = token_logprobs(model, x, y, share_prompts=True)[0]
        for i, old in enumerate(g["old_logprobs"]):
            assert torch.allclose(lp[i][y[i] >= 0], torch.tensor(old), atol=1e-5)
    # resumed with the option off, the saved groups are dropped, not trained on once more
    off = tmp_path / "off"
    shutil.copytree(straight, off)
    for c in (off / "checkpoints").glob("step_*"):
        if int(c.name.split("_")[1]) > step:
            shutil.rmtree(c)
    rl_cmd(str(base_run), source="base", tasks=None, out=str(off), resume=True, console=quiet(),
           overrides=[f"rl.steps={step + 1}", "rl.carry_surplus=false"])
    resumed = [r for r in read_metrics(off / "metrics.jsonl") if r["kind"] == "rl"]
    assert len(resumed) == step + 1 and resumed[step]["groups_carried"] == 0
