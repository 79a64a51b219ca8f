"""Named model sizes. Pure data (no torch import) so configs can resolve presets cheaply.

A preset fills every model field it names; fields given explicitly in a recipe or on the command
line win. Vocabulary size is not part of a preset: it comes from the run's tokenizer.
The `~params` comments are at vocab 32768 with tied embeddings; `spud info --model NAME` prints
exact figures.
"""

PRESETS: dict[str, dict] = {
    # CPU demo sizes
    "nano": dict(d_model=128, n_layers=4, n_heads=4, max_seq_len=256),  # ~0.8M non-embedding
    "micro": dict(d_model=192, n_layers=6, n_heads=6, n_kv_heads=2, max_seq_len=256),
    "mini": dict(d_model=256, n_layers=6, n_heads=4, max_seq_len=512),
    # GPU sizes
    "small-25m": dict(d_model=512, n_layers=8, n_heads=8, n_kv_heads=4, max_seq_len=1024),
    "gpt2-124m": dict(
        d_model=768, n_layers=12, n_heads=12, mlp="gelu", max_seq_len=1024, tie_embeddings=True
    ),
    "llama-124m": dict(d_model=768, n_layers=12, n_heads=12, n_kv_heads=4, max_seq_len=1024),
    "350m": dict(d_model=1024, n_layers=24, n_heads=16, n_kv_heads=8, max_seq_len=2048),
    "1b": dict(
        d_model=2048, n_layers=16, n_heads=32, n_kv_heads=8, mlp_hidden=8192,
        max_seq_len=2048, rope_theta=500000.0,
    ),
}
