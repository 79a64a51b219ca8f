"""Weight averaging for `spud rl` (`rl.ema_decay`): the model RL hands on is an exponential
moving average of the policy's weights over the steps, not the weights of the last step.

Why: from one RL step to the next the policy's answers on held-out problems move a lot (one run's
dev pass@1, measured every 50 steps, went up and down by several points), and the last step is
one draw from that noise. Averaging the late weights (Polyak averaging; the EMA of many training
recipes) keeps what the steps agree on. The policy itself trains on its own weights: the average
is only read, never fed back, so rollouts and updates are exactly those of a run without it.

In a checkpoint the average is `model.safetensors`, the file that serve, eval, export and
`spud dpo --from rl` read, and the policy's own weights are `train.safetensors`, which only
resuming needs (as it needs the optimizer state).
"""

from __future__ import annotations

from pathlib import Path

import torch

from spud.model.registry import build_model
from spud.train import checkpoint as ckpt_io

POLICY_FILE = "train.safetensors"


class WeightAverage:
    """avg ← decay·avg + (1 − decay)·policy after every step, starting from the policy's weights."""

    def __init__(self, policy: torch.nn.Module, model_cfg, decay: float):
        self.decay = decay
        self.model = build_model(model_cfg)
        self.model.load_state_dict(policy.state_dict())
        self.model.requires_grad_(False)
        self._avg = list(self.model.parameters())  # same config, so the same order and tying
        self._policy = list(policy.parameters())
        if [p.shape for p in self._avg] != [p.shape for p in self._policy]:
            raise ValueError("the averaged model's parameters do not line up with the policy's")

    @torch.no_grad()
    def update(self) -> None:
        torch._foreach_lerp_(self._avg, self._policy, 1.0 - self.decay)


def load_resumed(ckpt: Path, policy: torch.nn.Module, avg: WeightAverage | None) -> None:
    """Resuming: the policy from its own file when the checkpoint has one (it was saved with
    rl.ema_decay, so model.safetensors is the average), else from model.safetensors. The average
    goes on from the saved one, or starts at the policy when rl.ema_decay was turned on at resume
    (turned off, the average is dropped and the policy is handed on from then)."""
    own = Path(ckpt) / POLICY_FILE
    ckpt_io.load_weights(ckpt, policy, "cpu", POLICY_FILE if own.is_file() else "model.safetensors")
    if avg is not None:
        if own.is_file():
            ckpt_io.load_weights(ckpt, avg.model, "cpu")
        else:
            avg.model.load_state_dict(policy.state_dict())
