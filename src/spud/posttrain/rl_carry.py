"""Groups with signal that a `spud rl` step found beyond its quota, kept for the next step
(`rl.carry_surplus`).

Dynamic sampling (spud.posttrain.rl_sampling) rolls out more prompts until a step holds
`rl.prompts_per_step` groups whose rewards differ; the last round overshoots, and DAPO drops the
extra groups with signal — on the demo about one in six of those found (stop 36's runs: 2,317
found, 1,918 trained on, over 242 steps). With `rl.carry_surplus` they are trained on at the
next step instead, and a step's first round asks for as many prompts as the last step's survival
rate says it needs, since an overshoot is no longer lost.

A carried group was sampled by the policy one update earlier. Its completion tokens' log-probs
under that policy are computed before the update (`old_logprobs`), so the next step weighs it
by the exact importance ratio π_now / π_sampled, clipped like any PPO ratio; fresh groups keep
ratio 1. At most `rl.prompts_per_step` groups are carried and all of them are used at the next
step, so nothing is ever more than one update old. The carried groups are saved in the
checkpoint's state.json (`rl_carry`), so resume stays exact (resumed with the option off,
they are dropped).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from spud.errors import SpudError
from spud.posttrain.rl_logprobs import completion_batch, token_logprobs


@dataclass
class CarriedGroup:
    rows: list[tuple[list[int], list[int]]]  # (prompt ids, completion ids) per completion
    rewards: list[float]
    level: int | None
    old_logprobs: list[list[float]] = field(default_factory=list)  # per row, per completion token

    def to_json(self) -> dict:
        return {"rows": [[p, c] for p, c in self.rows], "rewards": self.rewards, "level": self.level,
                "old_logprobs": self.old_logprobs}


def restore_carry(saved: object, keep: bool = True, console=None) -> list[CarriedGroup]:
    """The checkpoint's `rl_carry`; anything malformed is an error naming the field. With `keep`
    false (a run resumed with rl.carry_surplus off) the saved groups are dropped, with a warning,
    rather than trained on once more."""
    if not keep:
        if isinstance(saved, list) and saved and console is not None:
            console.print(f"[yellow]rl.carry_surplus is off: the {len(saved)} groups carried by the "
                          "checkpoint are dropped")
        return []
    if saved is None:
        return []
    try:
        out = []
        for g in saved:  # type: ignore[union-attr]
            rows = [(list(map(int, p)), list(map(int, c))) for p, c in g["rows"]]
            old = [list(map(float, lp)) for lp in g["old_logprobs"]]
            rewards = list(map(float, g["rewards"]))
            if not (len(rows) == len(old) == len(rewards)) or any(len(c) != len(lp) for (_, c), lp in zip(rows, old)):
                raise ValueError("rows, rewards and old_logprobs do not line up")
            out.append(CarriedGroup(rows, rewards, g["level"], old))
        return out
    except (TypeError, KeyError, ValueError) as e:
        raise SpudError(f"rl_carry in the checkpoint's state.json is malformed ({e}); resume from an "
                        "earlier checkpoint or start the run again") from e


def fill_old_logprobs(model, groups: list[CarriedGroup], pad: int, micro_batch: int) -> None:
    """Each carried row's completion log-probs under `model` (the policy that sampled it, before
    this step's update). Every rank computes all of them, so every rank holds the same carry."""
    rows = [(g, i) for g in groups for i in range(len(g.rows))]
    for g in groups:
        g.old_logprobs = [None] * len(g.rows)  # each filled below; one left None would fail loudly
    with torch.no_grad():
        for k in range(0, len(rows), micro_batch):
            part = rows[k:k + micro_batch]
            x, y = completion_batch([g.rows[i] for g, i in part], pad)
            lp = token_logprobs(model, x, y, share_prompts=True)[0]
            for b, (g, i) in enumerate(part):
                g.old_logprobs[i] = lp[b][y[b] >= 0].tolist()


def sampling_logprobs(live: torch.Tensor, y: torch.Tensor, stored: list[list[float] | None]) -> torch.Tensor:
    """The sampling policy's (B, T) log-probs for a micro-batch: the stored ones for carried rows,
    the live ones detached (ratio 1) for rows sampled by the current policy."""
    base = live.detach()
    if all(s is None for s in stored):
        return base
    base = base.clone()
    for b, s in enumerate(stored):
        if s is not None:
            base[b, y[b] >= 0] = torch.tensor(s, dtype=base.dtype)
    return base
