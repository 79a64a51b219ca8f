"""Overrides that make the `tiny` recipe fast enough for tests (shared by fixtures and test modules;
a plain module because `from conftest import ...` is ambiguous with several conftest.py files)."""

TINY_OVERRIDES = [
    "data.total_tokens=60000",
    "tokenizer.vocab_size=400",
    "tokenizer.train_bytes=200000",
    "train.max_steps=12",
    "train.eval_every=4",
    "train.checkpoint_every=4",
    "train.eval_batches=2",
    "train.micro_batch_size=4",
    "model.max_seq_len=32",
]
