"""Weight averaging for `spud rl` (`rl.ema_decay`): the model RL hands on is an exponential
moving average of the policy's weights over the steps, not the weights of the last step.

Why: from one RL step to the next the policy's answers on held-out problems move a lot (one run's
dev pass@1, measured every 50 steps, went up and down by several points), and the last step is
one draw from that noise. Averaging the late weights (Polyak averaging; the EMA of many training
recipes) keeps what the steps agree on. The policy itself trains on its own weights: the average
is only read, never fed back, so rollouts and updates are exactly those of a run without it.

Selection (`rl.keep_best`): the model handed on is the evaluated one (the average, or the policy
without it) at its best in-run evaluation on the run's eval split, not at the last step. A run
stopped by a clock ends wherever the clock falls, and at a high LR a run's held-out score can
peak and fall back (docs/rl.md); picking the checkpoint on a validation split is the usual
remedy. Choose it on the dev split (`rl.eval_split=dev`): selected on test, test scores would be
biased.

In a checkpoint the handed-on model is `model.safetensors`, the file that serve, eval, export and
`spud dpo --from rl` read. The policy's own weights are `train.safetensors` and, when both the
average and the selection are on, the running average is `average.safetensors`: only resuming
needs those (as it needs the optimizer state).
"""

from __future__ import annotations

from pathlib import Path

import torch

from spud.model.registry import build_model
from spud.train import checkpoint as ckpt_io

POLICY_FILE = "train.safetensors"
AVERAGE_FILE = "average.safetensors"


def frozen_copy(model: torch.nn.Module, model_cfg) -> torch.nn.Module:
    """A copy of `model`'s weights in a model of the same config that no optimizer trains (the
    average, the selected model, the KL reference)."""
    copy = build_model(model_cfg)
    copy.load_state_dict(model.state_dict())
    copy.requires_grad_(False)
    return copy


class WeightAverage:
    """avg ← decay·avg + (1 − decay)·policy after every step, starting from the policy's weights."""

    def __init__(self, policy: torch.nn.Module, model_cfg, decay: float):
        self.decay = decay
        self.model = frozen_copy(policy, model_cfg)
        self._avg = list(self.model.parameters())  # same config, so the same order and tying
        self._policy = list(policy.parameters())
        if [p.shape for p in self._avg] != [p.shape for p in self._policy]:
            raise ValueError("the averaged model's parameters do not line up with the policy's")

    @torch.no_grad()
    def update(self) -> None:
        torch._foreach_lerp_(self._avg, self._policy, 1.0 - self.decay)


class BestModel:
    """`rl.keep_best`: a copy of the evaluated model as it was at its best evaluation so far (ties go
    to the later step, which has trained longer). It starts as the starting weights, unscored."""

    def __init__(self, served: torch.nn.Module, model_cfg):
        self.model = frozen_copy(served, model_cfg)
        self.step: int | None = None
        self.score: float | None = None

    @torch.no_grad()
    def offer(self, step: int, score: float, served: torch.nn.Module) -> None:
        """Keep `served` if `score` is at least the best so far."""
        if self.score is None or score >= self.score:
            self.model.load_state_dict(served.state_dict())
            self.step, self.score = step, score

    def state(self) -> dict:
        return {"step": self.step, "score": self.score}


def checkpoint_weights(policy: torch.nn.Module, avg: WeightAverage | None,
                       best: BestModel | None) -> tuple[torch.nn.Module, dict[str, torch.nn.Module] | None]:
    """→ (the module saved as model.safetensors, the other weight files a resume needs)."""
    served = avg.model if avg is not None else policy
    if best is None:
        return served, ({POLICY_FILE: policy} if avg is not None else None)
    extra = {POLICY_FILE: policy}
    if avg is not None:
        extra[AVERAGE_FILE] = avg.model
    return (served if best.step is None else best.model), extra  # nothing evaluated yet: the latest


def load_resumed(ckpt: Path, state: dict, policy: torch.nn.Module, avg: WeightAverage | None,
                 best: BestModel | None) -> None:
    """Resuming: the policy from its own file when the checkpoint has one (model.safetensors is then
    the average or the selected model), else from model.safetensors. The average goes on from the
    saved one, or starts at the policy when rl.ema_decay was turned on at resume (turned off, the
    average is dropped and the policy is handed on from then). The selection goes on from the
    saved best (state.json's `rl_best`), or starts unscored when rl.keep_best was turned on."""
    ckpt = Path(ckpt)
    own, saved_best = (ckpt / POLICY_FILE).is_file(), state.get("rl_best")
    ckpt_io.load_weights(ckpt, policy, "cpu", POLICY_FILE if own else "model.safetensors")
    if avg is not None:
        if (ckpt / AVERAGE_FILE).is_file():
            ckpt_io.load_weights(ckpt, avg.model, "cpu", AVERAGE_FILE)
        elif own and not saved_best:  # saved with the average alone: model.safetensors is it
            ckpt_io.load_weights(ckpt, avg.model, "cpu")
        else:
            avg.model.load_state_dict(policy.state_dict())
    if best is not None:
        served = avg.model if avg is not None else policy
        if saved_best:
            ckpt_io.load_weights(ckpt, best.model, "cpu")
            best.step, best.score = saved_best.get("step"), saved_best.get("score")
        else:
            best.model.load_state_dict(served.state_dict())
