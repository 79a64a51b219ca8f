"""Post-training: supervised fine-tuning of a pretrained run into a chat model (`spud sft`)."""
