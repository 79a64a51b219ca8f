"""Which problems a `spud rl` step rolls out, and which groups it keeps: curriculum and DAPO's
dynamic sampling.

Sparse rewards are the problem both solve. A group of G completions whose rewards are all equal
(all wrong, or all right) has zero group-relative advantage: it costs a rollout and teaches
nothing. At the start of RL on a small model most groups are all wrong.

- **Difficulty range and curriculum.** Problems may carry a level (built-in arithmetic: 1 one
  operation, 2 plain word problem, 3 word problem with number words and distractors; a user's
  JSONL may set "level"). A step draws only levels in [rl.min_level, cap], the cap rising
  linearly from rl.min_level to rl.max_level over rl.curriculum_steps steps (0 = every level from
  the start), each allowed level in an equal share — so a run can start where the model already
  earns some reward and move on to the problems it is judged on. Ungraded problems (level None)
  are drawn at every step.
- **Dynamic sampling** (Yu et al. 2025, DAPO §3.2). Groups whose rewards are all equal are
  dropped and more prompts are drawn and rolled out, until the step holds rl.prompts_per_step
  groups with signal or rl.max_sample_rounds rounds have run; extra groups are trimmed. Later
  rounds draw more prompts when few groups survived (the expected number needed, up to 4×), so a
  step rarely needs many small rounds. Groups with equal rewards are counted in every step's
  metrics (`groups_equal_all_wrong`, `groups_equal_all_right`, `groups_dropped` when dynamic
  sampling is on), and every sampled completion in `rollouts`.
- **Dropping solved problems** (`rl.drop_solved`, `SolvedPool`): late in a run most groups that
  dynamic sampling drops are all right; a problem solved by a whole group is not drawn again.

Everything is a pure function of (seed, step, weights, and the solved set saved with the
checkpoint): a resumed run draws the same problems and the same samples.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from spud.errors import SpudError
from spud.posttrain.rl_carry import CarriedGroup
from spud.posttrain.rl_tasks import Problem


def seed_of(*parts) -> int:
    """A 56-bit seed from any parts: the same parts give the same draws on every machine."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:7], "big")


def level_range(problems: list[Problem], min_level: int, max_level: int | None) -> tuple[int, int]:
    """The [lowest, highest] level a run draws from; errors name the fields to change."""
    graded = sorted({p.level for p in problems if p.level is not None})
    hi = max_level if max_level is not None else (graded[-1] if graded else min_level)
    if min_level > hi:
        raise SpudError(f"rl.min_level={min_level} is above rl.max_level={hi}; lower rl.min_level")
    if not any(p.level is None or min_level <= p.level <= hi for p in problems):
        raise SpudError(f"no RL training problem has a level in [rl.min_level={min_level}, "
                        f"rl.max_level={hi}]; the tasks' levels are {graded}")
    return min_level, hi


def level_cap(lo: int, hi: int, curriculum_steps: int, step: int) -> int:
    """The hardest level step `step` (0-based) may draw: lo at step 0, hi from `curriculum_steps`
    on, in equal stages between."""
    if curriculum_steps <= 0 or hi == lo:
        return hi
    return min(hi, lo + math.floor((hi - lo + 1) * step / curriculum_steps))


def problem_stream(problems: list[Problem], lo: int, cap: int, seed: int, step: int,
                   skip: frozenset[int] | set[int] = frozenset()) -> Iterator[Problem]:
    """Problems for one step, without repetition: each draw picks an allowed level (equal shares;
    ungraded problems form a share of their own) and then a problem of that level. Problems whose
    index is in `skip` (solved ones, `SolvedPool`) are left out, unless that would leave their
    level with none: then the level is drawn whole again."""
    rng = random.Random(seed_of(seed, "rl-prompts", step))
    pools: dict = {}
    left_out: dict = {}
    for i, p in enumerate(problems):
        if p.level is None or lo <= p.level <= cap:
            (left_out if i in skip else pools).setdefault(p.level, []).append(p)
    for lv, ps in left_out.items():
        if lv not in pools:
            pools[lv] = ps
    ranked = sorted(pools.items(), key=lambda kv: (kv[0] is None, kv[0] or 0))  # a fixed order
    order = {lv: rng.sample(ps, len(ps)) for lv, ps in ranked}
    while order:
        lv = rng.choice(list(order))
        yield order[lv].pop()
        if not order[lv]:
            del order[lv]


def advantages(rewards: list[float], group: int, kind: str, negative_weight: float = 1.0) -> list[float]:
    """Group-relative advantages: reward minus the group mean (Dr. GRPO), divided by the group's
    standard deviation too for `kind == "grpo"`. Negative advantages are scaled by
    `negative_weight` (rl.negative_weight): below 1 the update leans on the right answers
    (sharpening), above 1 on pushing the wrong ones down."""
    out = []
    for g in range(0, len(rewards), group):
        r = torch.tensor(rewards[g:g + group], dtype=torch.float64)
        a = r - r.mean()
        if kind == "grpo":
            a = a / (r.std(unbiased=False) + 1e-6)
        if negative_weight != 1.0:
            a = torch.where(a < 0, a * negative_weight, a)
        out += a.tolist()
    return out


class SolvedPool:
    """Training problems a run has solved: a group whose every completion was correct (pass rate 1,
    so zero advantage). With `rl.drop_solved` they are not drawn again (the online filtering of
    Polaris and Skywork-OR1), so late in a run the rollouts go to problems that still teach
    something instead of being dropped by dynamic sampling. The set is saved in the checkpoint
    (state.json, `rl_solved`: indices into the run's training problems), so resume stays exact."""

    def __init__(self, problems: list[Problem], on: bool):
        self.on = on
        self.index = {id(p): i for i, p in enumerate(problems)}
        self.ids: set[int] = set()

    def skip(self) -> frozenset[int]:
        return frozenset(self.ids) if self.on else frozenset()

    def add(self, solved: list[Problem]) -> None:
        if self.on:
            self.ids.update(self.index[id(p)] for p in solved)

    def restore(self, saved: list[int]) -> None:
        bad = [i for i in saved if not isinstance(i, int) or not 0 <= i < len(self.index)]
        if bad:
            raise SpudError(f"rl_solved in the checkpoint's state.json names problems {bad[:5]} that this "
                            f"run's {len(self.index)} training problems do not have; was rl.tasks changed?")
        self.ids = set(saved)


@dataclass
class StepRollouts:
    """The groups a step trains on, plus what it cost to find them."""
    rows: list[tuple[list[int], list[int]]] = field(default_factory=list)  # (prompt, completion) ids
    rewards: list[float] = field(default_factory=list)
    levels: list[int | None] = field(default_factory=list)  # one per kept group
    solved: list[Problem] = field(default_factory=list)  # every completion correct (SolvedPool)
    stats: dict = field(default_factory=dict)
    old_logprobs: list[list[float] | None] = field(default_factory=list)  # per row: carried rows' (rl_carry)
    surplus: list[CarriedGroup] = field(default_factory=list)  # groups with signal beyond the quota


def collect(draw: Iterator[Problem], rollout: Callable[[list[Problem], int], tuple[list, list[float], list[bool], int]],
            groups: int, group_size: int, dynamic: bool, max_rounds: int,
            carried: list[CarriedGroup] = (), keep_surplus: bool = False,
            first_survival: float | None = None) -> StepRollouts:
    """Roll out `groups` problems; with `dynamic`, replace groups with equal rewards by fresh ones.

    `rollout(problems, round)` → (rows, rewards, correct flags, verifier errors) for
    `group_size` completions of each problem, in problem order. `carried` groups (the last step's
    surplus, spud.posttrain.rl_carry) come first and count toward `groups`; with `keep_surplus`
    the groups with signal beyond the quota are returned in `surplus` (at most `groups`), and
    the first round asks for `need / first_survival` prompts (the last step's survival rate)."""
    out = StepRollouts()
    for g in carried:
        out.rows += g.rows
        out.rewards += g.rewards
        out.levels.append(g.level)
        out.old_logprobs += g.old_logprobs
    sampled = kept_seen = all_wrong = all_right = errors = correct = 0
    reward_sum = length_sum = 0.0
    rounds = 0
    need = groups - len(carried)
    while need > 0 and rounds < (max_rounds if dynamic else 1):
        # Ask for what is missing, scaled up by the share of groups that survived so far.
        survive = kept_seen / sampled if sampled else (first_survival if keep_surplus and dynamic else None)
        ask = need if survive is None else min(4 * groups, math.ceil(need / max(survive, 0.25)))
        problems = [p for _, p in zip(range(ask), draw)]
        if not problems:
            break
        rows, rewards, ok, errs = rollout(problems, rounds)
        rounds += 1
        errors += errs
        correct += sum(ok)
        reward_sum += sum(rewards)
        length_sum += sum(len(c) for _, c in rows)
        for g, p in enumerate(problems):
            sl = slice(g * group_size, (g + 1) * group_size)
            r, hits = rewards[sl], ok[sl]
            sampled += 1
            if all(hits):
                out.solved.append(p)
            if max(r) == min(r):  # no signal: counted with or without dynamic sampling
                all_right += any(hits)
                all_wrong += not any(hits)
                if dynamic:
                    continue
            kept_seen += 1
            if need > 0:
                out.rows += rows[sl]
                out.rewards += r
                out.old_logprobs += [None] * group_size
                out.levels.append(p.level)
                need -= 1
            elif keep_surplus and len(out.surplus) < groups:
                out.surplus.append(CarriedGroup(rows[sl], r, p.level))
    n = sampled * group_size
    out.stats = {"reward": reward_sum / max(n, 1), "accuracy": correct / max(n, 1),
                 "response_length": length_sum / max(n, 1), "verifier_errors": errors,
                 "rollouts": n, "groups_sampled": sampled, "groups_kept": len(out.levels),
                 "groups_equal_all_wrong": all_wrong, "groups_equal_all_right": all_right,
                 "groups_dropped": (all_wrong + all_right) if dynamic else 0, "sample_rounds": rounds,
                 "groups_carried": len(carried), "survival": kept_seen / sampled if sampled else None}
    return out
