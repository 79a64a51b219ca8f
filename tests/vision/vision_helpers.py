"""Shared settings of the vision tests (a plain module: `from conftest import` is ambiguous)."""

MODEL = {"d_model": 32, "n_layers": 1, "n_heads": 2, "max_seq_len": 160}
FONTS = ("default",)  # machine-independent pictures
# spud vlm on the tiny run: a few steps of each stage, a small vision tower, few pictures (the
# tower stage off: tests/vision/test_vlm_tower.py turns it on)
VLM_OVERRIDES = ["vlm.tower_steps=0", "vlm.align_steps=3", "vlm.steps=4", "vlm.micro_batch_size=4",
                 "vlm.builtin_images=60",
                 "vlm.val_images=8", "vlm.eval_every=2", "vlm.eval_batches=1", "vlm.checkpoint_every=2",
                 "sft.builtin_conversations=60", "model.vision.vit_dim=16", "model.vision.vit_layers=1",
                 "model.vision.vit_heads=2", "model.vision.image_size=16", "model.vision.patch_size=4",
                 "train.threads=1"]
