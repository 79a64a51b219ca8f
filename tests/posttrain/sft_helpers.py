"""Shared settings of the SFT tests."""

# small SFT runs: a few steps, frequent evals and checkpoints
SFT_OVERRIDES = ["sft.max_steps=8", "sft.micro_batch_size=4", "sft.builtin_conversations=240",
                 "sft.eval_every=4", "sft.eval_batches=2", "sft.checkpoint_every=4",
                 "sft.val_fraction=0.1", "train.sample_tokens=4", "train.threads=1"]
