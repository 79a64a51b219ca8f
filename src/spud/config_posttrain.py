"""Config sections of the text post-training stages: `spud sft` (SFTConfig), `spud rl` (RLConfig)
and `spud dpo` (DPOConfig). spud.config assembles them with the other sections into `Config`."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from spud.config_base import StrictModel


# ------------------------------------------------------------------------------------------ sft
class SFTConfig(StrictModel):
    """Supervised fine-tuning into a chat model (`spud sft`). Its schedule and batch settings are
    copied into `train` of the chat run, so the pretraining loop runs SFT unchanged."""

    data: list[str] = Field(
        default_factory=list,
        description="Chat files as 'path.jsonl[:weight]' (OpenAI messages per line); 'builtin' = "
        "the generated chat data.",
    )
    base_run: str | None = Field(None, description="Run directory the chat model starts from (set by spud sft).")
    base_checkpoint: str | None = Field(None, description="Checkpoint of base_run loaded at step 0 (set by spud sft).")
    max_steps: int = Field(300, gt=0)
    lr: float | None = Field(None, gt=0, description="None = lr_ratio × the base run's train.lr.")
    lr_ratio: float = Field(0.3, gt=0, le=10, description="SFT peak LR as a share of pretraining's.")
    warmup_steps: int = Field(10, ge=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    schedule: Literal["cosine", "wsd", "constant"] = "cosine"
    micro_batch_size: int = Field(16, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    val_fraction: float = Field(0.05, ge=0, lt=0.5, description="Share of conversations held out (by hash).")
    max_bad_fraction: float = Field(0.05, ge=0, le=1, description="Error out above this share of bad lines.")
    builtin_conversations: int = Field(20000, gt=0, description="Conversations generated for 'builtin'.")
    tool_share: float = Field(
        0.1, ge=0, le=1, description="Share of the 'builtin' conversations that offer the calculator tool "
        "(3 in 4 of them call it); the rest is the plain chat data. 0 = no tool data.")
    eval_every: int = Field(50, gt=0)
    eval_batches: int = Field(8, gt=0)
    checkpoint_every: int = Field(100, gt=0)
    sample_prompts: list[str] = Field(
        default_factory=lambda: ["What is 12 plus 7?", "Who are you?"],
        description="User messages answered in chat format at the end of SFT (logged as samples).",
    )


class RLConfig(StrictModel):
    """On-policy RL from verifiable rewards (`spud rl`; see spud.posttrain.rl for the method)."""

    tasks: list[str] = Field(default_factory=lambda: ["arithmetic"],
                             description="Built-in tasks (arithmetic, program) or problem .jsonl files.")
    source: Literal["chat", "base"] = Field("chat", description="Which model of the run RL starts from.")
    base_run: str | None = Field(None, description="Run RL started from (set by spud rl).")
    base_checkpoint: str | None = Field(None, description="Checkpoint loaded at step 0 (set by spud rl).")
    steps: int = Field(40, gt=0, description="Optimizer steps; each one is a fresh batch of rollouts.")
    prompts_per_step: int = Field(16, gt=0)
    group: int = Field(8, gt=1, description="Completions sampled per prompt (the GRPO group).")
    max_tokens: int = Field(64, gt=0, description="Longest completion sampled.")
    temperature: float = Field(1.0, gt=0)
    lr: float = Field(3e-5, gt=0, description="AdamW LR. 3e-4 wrecked an older demo chat model in 12 steps; "
                      "1e-4 gave both the best and the worst runs on the untied demo's dev split (docs/rl.md).")
    warmup_steps: int = Field(3, ge=0)
    schedule: Literal["constant", "cosine", "wsd"] = Field(
        "constant", description="LR after the warm-up, over rl.steps: constant, cosine, or wsd (hold, then "
        "decay linearly over the last decay_fraction of the steps; anneals a run that has a fixed budget).")
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="cosine/wsd: the LR the decay ends at, × rl.lr.")
    decay_fraction: float = Field(0.2, gt=0, le=1, description="wsd: share of rl.steps spent decaying.")
    advantage: Literal["drgrpo", "grpo"] = Field(
        "drgrpo", description="drgrpo: reward minus group mean; grpo: also divided by the group std.")
    negative_weight: float = Field(1.0, ge=0, description="Scale of negative advantages (answers worse than "
                                   "their group's mean); < 1 leans the update on the right answers.")
    clip_low: float = Field(0.2, gt=0, lt=1)
    clip_high: float = Field(0.28, gt=0, description="Upper ratio clip (DAPO clip-higher).")
    ppo_epochs: int = Field(1, gt=0, description="Gradient passes over each batch of rollouts.")
    kl: float = Field(0.0, ge=0, description="KL penalty to the starting model (k3 estimator); 0 = off.")
    entropy_weight: float = Field(0.0, ge=-1, le=1, description="Per-token entropy term of the loss: > 0 is "
                                  "PPO's entropy bonus (keeps sampling varied), < 0 minimises entropy "
                                  "(sharpens the policy); 0 = off.")
    ema_decay: float = Field(0.0, ge=0, lt=1, description="Hand on an exponential moving average of the "
                             "policy's weights (updated every step with this decay; 0.98 ≈ the last 50 steps) "
                             "instead of the last step's weights; 0 = off (spud.posttrain.rl_average).")
    format_weight: float = Field(0.1, ge=0, le=1, description="Reward bonus for a well-placed answer.")
    step_weight: float = Field(0.0, ge=0, le=1, description="Reward bonus when the answer writes at least one "
                               "'a op b = c' step and every such step is right (a process reward for arithmetic); 0 = off.")
    micro_batch_size: int = Field(32, gt=0, description="Sequences per forward in the update.")
    grad_clip: float = Field(1.0, gt=0)
    train_problems: int = Field(4000, gt=0, description="Problems generated per built-in task.")
    heldout_problems: int = Field(200, gt=0, description="Held-out problems per built-in task.")
    eval_every: int = Field(10, gt=0, description="Held-out pass@1 every this many steps.")
    eval_samples: int = Field(1, gt=0, description="Completions per problem at those evaluations: 1 = greedy "
                              "pass@1; more = sampled at rl.temperature, pass@1 their mean (pass@k too).")
    keep_best: bool = Field(False, description="Hand on the evaluated model at its best in-run pass@1 "
                            "(ties: the later), not the last step's; use with eval_split=dev "
                            "(spud.posttrain.rl_average).")
    checkpoint_every: int = Field(20, gt=0)
    keep_checkpoints: int = Field(2, gt=0)
    verifier_timeout_s: float = Field(5.0, gt=0)
    dynamic_sampling: bool = Field(
        True, description="DAPO dynamic sampling: groups whose rewards are all equal are dropped and "
        "more prompts drawn until the step has prompts_per_step groups with signal (or max_sample_rounds).")
    max_sample_rounds: int = Field(3, ge=1, description="Rollout rounds per step with dynamic sampling.")
    carry_surplus: bool = Field(False, description="Groups with signal that dynamic sampling finds beyond "
                                "prompts_per_step are trained on at the next step (weighted by their "
                                "sampling policy's log-probs) instead of dropped (spud.posttrain.rl_carry).")
    drop_solved: bool = Field(False, description="A training problem whose whole group was correct is not "
                              "drawn again (saved with the checkpoint for exact resume).")
    min_level: int = Field(1, ge=1, description="Easiest problem level drawn (built-in arithmetic: 1 one "
                           "operation, 2 word problem, 3 word problem with number words and distractors).")
    max_level: int | None = Field(None, ge=1, description="Hardest level drawn; None = the hardest there is.")
    curriculum_steps: int = Field(0, ge=0, description="Steps over which the hardest level drawn rises "
                                  "linearly from min_level to max_level; 0 = every level from the start.")
    eval_split: Literal["heldout", "dev"] = Field(
        "heldout", description="Split of the periodic pass@1: heldout (test) or dev (to choose settings on).")


class DPOConfig(StrictModel):
    """Direct preference optimisation (`spud dpo`; see spud.posttrain.dpo)."""

    data: list[str] = Field(default_factory=list, description="Preference .jsonl files, or 'verifier:TASK'.")
    source: Literal["chat", "base", "rl"] = Field("chat", description="Which model of the run DPO starts from.")
    base_run: str | None = None
    base_checkpoint: str | None = None
    beta: float = Field(0.1, gt=0, description="Strength of the implicit KL to the reference model.")
    lr: float = Field(1e-4, gt=0)
    epochs: int = Field(2, gt=0)
    batch_size: int = Field(16, gt=0)
    pairs_per_task: int = Field(256, gt=0, description="Pairs sampled for each 'verifier:TASK' entry.")
    samples_per_prompt: int = Field(8, gt=1, description="Completions sampled to find a right and a wrong one.")
    max_tokens: int = Field(64, gt=0)
    max_bad_fraction: float = Field(0.05, ge=0, le=1)
